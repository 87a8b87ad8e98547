"""`mlx-listen steer sweep`: choose α on a calibration split, test it on a disjoint split.

The splits are stratified by task and drawn with a recorded seed; each split is an ordinary
resumable `eval` run folder with one condition per α (and per α for each random-head control:
`headset.control_sets`, matched to the heads' layer profile, the experiment's policy), so
everything `eval` gives (predictions, official-format files, tables) holds for the sweep too.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ListenError
from ..eval import mmau
from ..eval.conditions import baseline, steered
from ..eval.evaluate import EvalSpec, run_eval, select_items
from ..headset import HeadSet, check_heads, control_sets
from ..interp.steering import SteerConfig
from ..load import ModelRef
from ..plots import curve_plot
from ..records import file_sha256, read_predictions, write_json
from ..stats import paired_mean_diff


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
    """α = 0 adds exact zeros: it is the baseline, answered once, under the name "base"."""
    if alpha == 0:
        return "base"
    return f"alpha={alpha:g}" + (f"-random{control}" if control is not None else "")


def sweep(spec: EvalSpec, config: SteerConfig, alphas: Sequence[float], *, calib_fraction: float = 0.5,
          seed: int = 0, n_random: int = 1, progress: bool = True) -> dict:
    """Accuracy per α on the calibration split (heads and random-head control), the best α (ties: the
    smallest |α|), then baseline vs that α on the test split. Every condition of a split is answered
    from one prefill per item (`conditions.Answerer`)."""
    items = select_items(replace(spec, ids=None))
    calib, test = split_ids(items, calib_fraction, seed)
    out = spec.out
    out.mkdir(parents=True, exist_ok=True)
    n_layers, n_heads = ModelRef.of(spec.model).shape
    check_heads(config.heads, n_layers, n_heads)  # before any run folder is written
    config.validate(n_layers, n_heads=n_heads)
    controls = [HeadSet(c) for c in (control_sets(config.heads, n_layers, n_heads, n_random, seed + 1)
                                     if n_random else [])]
    conds = [baseline()] + [steered(replace(config, alpha=a), _name(a)) for a in alphas if a != 0]
    conds += [steered(replace(config, alpha=a, layers=c.layers, heads=c.heads), _name(a, i))
              for i, c in enumerate(controls) for a in alphas if a != 0]
    cal_spec = replace(spec, out=out / "calibration", ids=set(calib), conditions=conds, limit=None)
    cal = run_eval(cal_spec, progress=progress)
    acc = {c.name: cal[c.name].to_dict()["accuracy"] for c in conds}
    best = max(alphas, key=lambda a: (acc[_name(a)]["overall"], -abs(a)))
    test_conds = [baseline()] + ([steered(replace(config, alpha=best), _name(best))] if best != 0 else [])
    tst_spec = replace(spec, out=out / "test", ids=set(test), conditions=test_conds, limit=None)
    tst = run_eval(tst_spec, progress=progress)
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
                                         read_predictions(out / "test" / _name(best) if best != 0 else out / "test"))},
        "data_sha256": file_sha256(spec.data), "model": str(spec.model), "prompt": spec.prompt,
    }
    if spec.score != "generate":  # the graded effect: the correct option's log-prob margin, paired per item
        margins = {c.name: _margins(cal_spec.dir_for(c)) for c in conds}
        result["calibration"]["margin_shift"] = {
            "heads": {f"{a:g}": _shift(margins["base"], margins[_name(a)]) for a in alphas},
            "random": [{f"{a:g}": _shift(margins["base"], margins[_name(a, i)]) for a in alphas}
                       for i in range(n_random)]}
        result["test"]["margin_shift"] = _shift(_margins(tst_spec.dir_for(test_conds[0])),
                                                _margins(tst_spec.dir_for(test_conds[-1])))
    write_json(out / "sweep.json", result)
    _plot(result, out / "sweep.png")
    if "margin_shift" in result["calibration"]:
        _plot_margin(result, out / "sweep_margin.png")
    return result


def _margins(run_dir: Path) -> dict:
    """id -> the correct option's log-prob margin, for the items this condition scored."""
    return {r["id"]: r["margin"] for r in read_predictions(run_dir) if "margin" in r}


def _shift(base: dict, treat: dict) -> dict:
    """Mean margin change (treat − base) over the items both scored, with its paired 95% CI."""
    ids = sorted(base.keys() & treat.keys())
    return paired_mean_diff([base[i] for i in ids], [treat[i] for i in ids])


def _plot(result: dict, path: Path):
    alphas = result["alphas"]
    series = {}
    for task in ("overall", *mmau.TASKS):
        series[f"heads: {task}"] = [result["calibration"]["heads"][f"{a:g}"][task] for a in alphas]
    for i, r in enumerate(result["calibration"]["random"]):
        series[f"random heads #{i}: overall"] = [r[f"{a:g}"]["overall"] for a in alphas]
    curve_plot(alphas, series, path, "alpha", "accuracy (calibration split)",
               f"Accuracy vs steering strength; chosen alpha = {result['chosen_alpha']:g}")


def _plot_margin(result: dict, path: Path):
    alphas, shift = result["alphas"], result["calibration"]["margin_shift"]
    series, bands = {}, {}
    for name, per_alpha in [("specialist heads", shift["heads"])] + \
            [(f"random heads #{i}", r) for i, r in enumerate(shift["random"])]:
        rows = [per_alpha[f"{a:g}"] for a in alphas]
        series[name] = [r["difference"] if r["difference"] is not None else np.nan for r in rows]
        if all(r["ci95"] for r in rows):
            bands[name] = ([r["ci95"][0] for r in rows], [r["ci95"][1] for r in rows])
    curve_plot(alphas, series, path, "alpha", "margin change vs alpha 0 (calibration split)",
               "Correct option's log-prob margin, steered minus unsteered (95% paired CI)", bands=bands)


def sweep_lines(res: dict) -> list[str]:
    """The terminal summary of a sweep."""
    grid = res["alphas"]
    lines = [f"calibration split ({len(res['splits']['calibration'])} items): accuracy by alpha"]
    for a in grid:
        r = res["calibration"]["heads"][f"{a:g}"]
        ctl = "  ".join(f"random#{i} {c[f'{a:g}']['overall']:.1%}" for i, c in enumerate(res["calibration"]["random"]))
        lines.append(f"  alpha {a:>5g}: {r['overall']:.1%}  {ctl}")
    t, c = res["test"], res["test"]["compare"]["overall"]
    lines.append(f"chosen alpha {res['chosen_alpha']:g}; test split ({len(res['splits']['test'])} items): "
                 f"base {t['base']['overall']:.1%} -> steered {t['steered']['overall']:.1%} "
                 f"(flips +{c['wrong_to_right']} / -{c['right_to_wrong']}, McNemar p {c['p_mcnemar']:.3g})")
    if "margin_shift" in res["calibration"]:
        lines.append("log-prob margin of the correct option, change vs alpha 0 (mean, 95% paired CI):")
        for a in grid:
            cells = [_shift_text(res["calibration"]["margin_shift"]["heads"][f"{a:g}"])]
            cells += [f"random#{i} {_shift_text(r[f'{a:g}'])}" for i, r in enumerate(res["calibration"]["margin_shift"]["random"])]
            lines.append(f"  alpha {a:>5g}: " + "  ".join(cells))
        lines.append(f"  test split, chosen alpha: {_shift_text(t['margin_shift'])}")
    return lines


def _shift_text(r: dict) -> str:
    if r["difference"] is None:
        return "no item scored"
    ci = f" [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]" if r["ci95"] else " (too few items for a CI)"
    return f"{r['difference']:+.3f}{ci}"
