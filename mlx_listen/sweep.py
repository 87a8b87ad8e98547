"""`mlx-listen steer sweep` and `steer build`: choose α on a calibration split, test it on a
disjoint split; average per-input directions into a fixed vector.

The splits are stratified by task and drawn with a recorded seed; each split is an ordinary
resumable `eval` run folder with one condition per α (and per α for the random-head control),
so everything `eval` gives (predictions, official-format files, tables) holds for the sweep too.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np

from . import mmau
from .errors import ListenError
from .evaluate import EvalSpec, baseline, read_predictions, run_eval, steered, write_atomic
from .heads import HeadSet, random_heads
from .steering import SteerConfig


def split_ids(items: Sequence[dict], calib_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Disjoint (calibration, test) id lists, stratified by task, reproducible from the seed."""
    rng = np.random.default_rng(seed)
    calib, test = [], []
    for task in mmau.TASKS:
        ids = [it["id"] for it in items if it["task"] == task]
        ids = [ids[i] for i in rng.permutation(len(ids))]
        k = int(round(calib_fraction * len(ids)))
        calib += ids[:k]
        test += ids[k:]
    if not calib or not test:
        raise ListenError("the split left the calibration or the test part empty; use more items")
    return calib, test


def _name(alpha: float, control: int | None = None) -> str:
    return f"alpha={alpha:g}" + (f"-random{control}" if control is not None else "")


def sweep(spec: EvalSpec, config: SteerConfig, alphas: Sequence[float], *, calib_fraction: float = 0.5,
          seed: int = 0, n_random: int = 1, n_layers: int, n_heads: int, progress: bool = True) -> dict:
    """Accuracy per α on the calibration split (heads and random-head control), the best α (ties: the
    smallest |α|), then baseline vs that α on the test split."""
    items = [it for it in mmau.load_items(spec.data) if it["task"] in spec.tasks][: spec.limit]
    calib, test = split_ids(items, calib_fraction, seed)
    assert not set(calib) & set(test)
    out = spec.out
    out.mkdir(parents=True, exist_ok=True)
    k = len(config.heads)
    controls = [HeadSet(random_heads(n_layers, n_heads, k, seed + 1 + i)) for i in range(n_random)]
    conds = [steered(replace(config, alpha=a), _name(a)) for a in alphas]
    conds += [steered(replace(config, alpha=a, layers=c.layers, heads=c.heads), _name(a, i))
              for i, c in enumerate(controls) for a in alphas]
    cal = run_eval(replace(spec, out=out / "calibration", ids=set(calib), conditions=conds, limit=None),
                   progress=progress)
    acc = {c.name: cal[c.name].to_dict()["accuracy"] for c in conds}
    best = max(alphas, key=lambda a: (acc[_name(a)]["overall"], -abs(a)))
    chosen = steered(replace(config, alpha=best), _name(best))
    tst = run_eval(replace(spec, out=out / "test", ids=set(test), conditions=[baseline(), chosen], limit=None),
                   progress=progress)
    result = {
        "alphas": list(alphas), "seed": seed, "calib_fraction": calib_fraction,
        "splits": {"calibration": calib, "test": test},
        "heads": [list(h) for h in config.heads], "layers": config.layers,
        "random_controls": [{"heads": [list(h) for h in c.heads], "layers": c.layers} for c in controls],
        "calibration": {"heads": {f"{a:g}": acc[_name(a)] for a in alphas},
                        "random": [{f"{a:g}": acc[_name(a, i)] for a in alphas} for i in range(n_random)]},
        "chosen_alpha": best,
        "test": {"base": tst["base"].to_dict()["accuracy"], "steered": tst[_name(best)].to_dict()["accuracy"],
                 "compare": mmau.compare(read_predictions(out / "test"),
                                         read_predictions(out / "test" / _name(best)))},
        "data_sha256": mmau.file_sha256(spec.data), "model": spec.model, "prompt": spec.prompt,
    }
    write_atomic(out / "sweep.json", json.dumps(result, indent=2))
    _plot(result, out / "sweep.png")
    return result


def _plot(result: dict, path: Path):
    from .plots import curve_plot

    alphas = result["alphas"]
    series = {}
    for task in ("overall", *mmau.TASKS):
        series[f"heads: {task}"] = [result["calibration"]["heads"][f"{a:g}"][task] for a in alphas]
    for i, r in enumerate(result["calibration"]["random"]):
        series[f"random heads #{i}: overall"] = [r[f"{a:g}"]["overall"] for a in alphas]
    curve_plot(alphas, series, path, "alpha", "accuracy (calibration split)",
               f"Accuracy vs steering strength; chosen alpha = {result['chosen_alpha']:g}")


def build_vector(model, processor, items: Sequence[dict], audio_dir: Path, config: SteerConfig, prompt_preset: str,
                 progress: bool = True) -> tuple[np.ndarray, int]:
    """The mean of the per-input directions d(x) over `items` (float32), and how many items went in."""
    import sys

    from tqdm import tqdm

    from .audio import audio_features, load_audio
    from .generate import prepare
    from .steering import Steerer

    st = Steerer(model, config)
    total, n = None, 0
    for item in tqdm(items, desc="direction", unit="item", file=sys.stderr, disable=not progress):
        feats = audio_features(load_audio(audio_dir / item["audio_id"]), item["audio_id"])
        d = np.array(st.direction(prepare(model, processor, [feats], mmau.build_prompt(item, prompt_preset))))
        total = d if total is None else total + d
        n += 1
    if not n:
        raise ListenError("no items to build the direction from")
    return (total / n).astype(np.float32), n
