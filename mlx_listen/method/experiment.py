"""`mlx-listen experiment`: the paper's protocol, cross-fitted, with controls that can carry a claim
(arXiv 2603.06854, with k-fold cross-fitting on MMAU, stratified by task).

Folds are drawn (stratified by task, seeded); with `repeats` R > 1 the whole cross-fitting is
repeated over R fold seeds (seed, seed + 1, ...), so the reported intervals average over splits
instead of being conditional on one. For each fold f of each repeat, everything that selects is
fitted on the other folds' items (its calibration items) and reported only on fold f (its test
items), so every item is a test item exactly once per repeat and never helped choose what it is
tested with:

1. base (shared by every fold and repeat): every item answered greedily with the audio (its
   correctness, every head's audio mass at T from the same prefill, the correct option's
   log-prob margin, the clip and question lengths) and with equal-length silence (the option it
   picks then).
2. heads: top-k heads by the within-task partial r with clip and question length partialled out
   (`center="task"`, the default; `"none"`: the paper's pooled Pearson r) on the calibration
   records, with a permutation null, bootstrap stability with its null reference, the overlap with
   the other centering; matched random head sets, distinct by layer set (`headset.control_sets`).
3. directions: d(x) of the specialist layers for every calibration item; their mean is the
   dataset-mean vector; a random unit direction (seeded per fold) scaled per input to |d(x)| is the
   norm-matched random-direction control.
4. tune: each condition's α chosen separately on the calibration items by one rule for all
   (specialist, mean vector, random direction, every random set): `tune="margin"` (default) the
   largest mean correct-option log-prob margin (every condition at every α scored from one prefill,
   no decoding), `tune="accuracy"` the best greedy accuracy (every condition decoded at every α);
   ties: the smallest |α|; α = 0 (the baseline) may be in the grid.
5. test: fold f answered under every condition at its α (one prefill and batched decodes, option
   log-probs from the same prefill), plus ablation of the specialist heads and of matched random
   head sets, in each ablation mode (zero and audio masking by default; each its own prefill).

Every stage is a JSONL of fsync'd rows: killed at any moment, a rerun continues where it stopped.
Every setting is checked (and the model's shape from its config) before the folder is bound to
anything. `report.json`, `report.md` (with PNGs) and `predictions/` (one file per condition that
`eval score` reads) come last (`report.py`, `report_md.py`).

The model is behind a small backend (`ModelBackend`); tests drive the same protocol with a
simulated one, where the truth is known (`tests/support/sim_backend.py`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import presets, stats
from ..errors import ListenError, ListenWarning
from ..eval import mmau
from ..eval.conditions import ablated, steered
from ..eval.evaluate import EvalSpec, audio_problems
from ..headset import control_sets
from ..interp.ablation import Ablation, parse_mode
from ..interp.steering import SteerConfig
from ..load import ModelRef
from ..records import Stage, claim, file_sha256, locked, provisional, write_json
from .backend import ModelBackend, outcome  # noqa: F401 (outcome: what an answer becomes in the records)
from .heads import covariates
from .names import MEAN, RANDOM_DIRECTION, SPECIALIST, ablate_name, random_name, tuned
from .report import build_report
from .report_md import write_predictions, write_report_md

TUNE_RULES = ("margin", "accuracy")


@dataclass
class Settings:
    folds: int = 2
    seed: int = 0
    repeats: int = 1  # cross-fittings over fold seeds seed..seed+R-1 (1: intervals conditional on one split)
    k: int = 20
    alphas: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 3.0)
    random_sets: int = 99  # matched random head sets, distinct by layer set (fewer when fewer exist)
    tune: str = "margin"  # the one rule every condition's alpha is chosen by: "margin" | "accuracy"
    prompt: str = presets.DEFAULT_PRESET
    max_tokens: int = 256
    center: str = "task"  # "task": within task, clip and question length partialled out; "none": pooled Pearson
    n_perm: int = 200
    n_boot: int = 200
    random_direction: bool = True  # the norm-matched random-direction control
    ablate: bool = True
    ablate_modes: tuple[str, ...] = ("zero", "audio")  # as `--ablate-mode`: zero | scale:F | audio
    ablate_sets: int = 20  # random-head ablations per mode (the first random sets; 20: the fewest for p < 0.05)
    min_group: int = 10

    def __post_init__(self):
        self.alphas = tuple(float(a) for a in self.alphas)
        if isinstance(self.ablate_modes, str):
            self.ablate_modes = tuple(m.strip() for m in self.ablate_modes.split(",") if m.strip())
        self.ablate_modes = tuple(self.ablate_modes)
        if self.folds < 2:
            raise ListenError("an experiment needs at least 2 folds")
        if self.repeats < 1:
            raise ListenError("--repeats must be at least 1")
        if not self.alphas or not all(math.isfinite(a) for a in self.alphas):
            raise ListenError("the alpha grid needs finite strengths")
        if len(set(self.alphas)) != len(self.alphas):
            raise ListenError(f"the alpha grid repeats a value: {list(self.alphas)}")
        if not any(self.alphas):
            raise ListenError("the alpha grid needs at least one non-zero strength (alpha 0 is the baseline)")
        if self.k < 1 or self.random_sets < 1:
            raise ListenError("k and the number of random sets must be at least 1")
        if self.tune not in TUNE_RULES:
            raise ListenError(f"tune must be one of {', '.join(TUNE_RULES)}, not {self.tune!r}")
        if self.center not in ("none", "task"):
            raise ListenError(f"center must be none or task, not {self.center!r}")
        if self.ablate and not self.ablate_modes:
            raise ListenError("--ablate needs at least one ablation mode")
        if len(set(self.ablate_modes)) != len(self.ablate_modes):
            raise ListenError(f"an ablation mode is repeated: {list(self.ablate_modes)}")
        for m in self.ablate_modes:
            if parse_mode(m)[0] == "mean":
                raise ListenError("the experiment ablates with zero, scale:F or audio (mean ablation needs a means "
                                  "file fitted per fold)")
        if self.ablate_sets < 0 or self.min_group < 1 or self.n_perm < 1 or self.n_boot < 1:
            raise ListenError("ablate_sets, min_group, n_perm and n_boot must be positive")

    @property
    def n_ablate_random(self) -> int:
        return min(self.ablate_sets, self.random_sets)

    def check_model(self, n_layers: int, n_heads: int):
        """What the model's shape decides, from its config (before any model work)."""
        if self.k > n_layers * n_heads:
            raise ListenError(f"--k {self.k} is more heads than this model has ({n_layers} layers x {n_heads} heads)")
        if self.k == n_layers * n_heads:
            raise ListenError(f"--k {self.k} selects every head of this model: nothing is left to compare with")

    def to_json(self) -> dict:
        d = asdict(self)
        d["alphas"], d["ablate_modes"] = list(self.alphas), list(self.ablate_modes)
        return d


# -- the protocol ------------------------------------------------------------------------------------

@dataclass
class Fold:
    repeat: int
    index: int
    calibration_ids: list[str]
    test_ids: list[str]
    heads: list[tuple[int, int]] = field(default_factory=list)
    scores: np.ndarray | None = None
    null: dict | None = None
    stability: dict | None = None
    other_center: dict | None = None
    partialled_out: list[str] = field(default_factory=list)
    random_sets: list[list[tuple[int, int]]] = field(default_factory=list)
    alpha: dict[str, float] = field(default_factory=dict)
    tuning: dict[str, dict] = field(default_factory=dict)
    calibration_accuracy: float | None = None
    mean_vector: np.ndarray | None = field(default=None, repr=False)
    random_vector: np.ndarray | None = field(default=None, repr=False)
    zero_directions: int = 0

    @property
    def layers(self) -> list[int]:
        return sorted({l for l, _ in self.heads})


class Experiment:
    def __init__(self, settings: Settings, items: list[dict], out: Path, backend, *, progress: bool = True):
        self.s, self.items, self.out, self.backend, self.progress = settings, items, Path(out), backend, progress
        self.by_id = {it["id"]: it for it in items}
        ids, tasks = [it["id"] for it in items], [it["task"] for it in items]
        self.fold_ids = [stats.stratified_folds(ids, tasks, settings.folds, settings.seed + r)
                         for r in range(settings.repeats)]

    def _dir(self, repeat: int, fold: int) -> Path:
        return self.out / (f"fold{fold}" if repeat == 0 else f"repeat{repeat}/fold{fold}")

    def _stage(self, path: Path, ids: Sequence[str], work, desc: str) -> dict[str, dict]:
        """Rows of `path` for `ids` by id, the missing ones computed with `work(item)` (`records.Stage`)."""
        rows = Stage(path).run([self.by_id[i] for i in ids], work, desc=desc, progress=self.progress, seconds=True)
        return {r["id"]: r for r in rows}

    def run(self) -> dict:
        s, out = self.s, self.out
        ids = [it["id"] for it in self.items]
        base = self._stage(out / "base.jsonl", ids, self.backend.base, "base")
        folds = []
        for r in range(s.repeats):
            for f, test_ids in enumerate(self.fold_ids[r]):
                fold = Fold(r, f, [i for i in ids if i not in set(test_ids)], list(test_ids))
                self._fit_heads(fold, base)
                self._tune(fold, base)
                conds = self._test_conditions(fold)
                test = self._stage(self._dir(r, f) / "test.jsonl", fold.test_ids,
                                   lambda item: {"results": self.backend.answer(item, conds)},
                                   f"{'' if s.repeats == 1 else f'repeat {r} '}fold {f} test")
                folds.append((fold, test))
        report = build_report(s, self.items, base, folds)
        write_json(out / "report.json", report)
        write_predictions(report, self.items, base, folds, out)
        write_report_md(report, out)
        return report

    def _usable(self, rows: dict, ids) -> list[dict]:
        return [rows[i] for i in ids if "error" not in rows[i]]

    def _fit_heads(self, fold: Fold, base: dict):
        s = self.s
        cal = self._usable(base, fold.calibration_ids)
        if len(cal) < 3:
            raise ListenError(f"fold {fold.index}: {len(cal)} usable calibration items; need more")
        mass = np.array([r["audio_mass"] for r in cal], np.float64)
        correct = np.array([r["correct"] for r in cal], bool)
        tasks = [r["task"] for r in cal]
        seed = s.seed + 17 * fold.index + 7919 * fold.repeat

        def fit(center):
            cov, partialled = covariates(cal, center)
            kw = dict(center=center, tasks=tasks, covariates=cov)
            scores = stats.head_scores(mass, correct, **kw)
            return scores, stats.top_k(scores, s.k), kw, partialled

        fold.scores, top, kw, fold.partialled_out = fit(s.center)
        fold.heads = [tuple(h) for h in top.heads]
        fold.calibration_accuracy = float(correct.mean())
        fold.null = stats.permutation_null(mass, correct, k=s.k, n_perm=s.n_perm, seed=seed, **kw)
        freq = stats.bootstrap_stability(mass, correct, k=s.k, n_boot=s.n_boot, seed=seed + 14, **kw)
        ref = stats.null_stability(mass, correct, k=s.k, n_boot=s.n_boot, seed=seed + 15, n_shuffles=2, **kw)
        fold.stability = {"frequency": [float(freq[l, h]) for l, h in fold.heads], "n_boot": s.n_boot,
                          "mean": float(np.mean([freq[l, h] for l, h in fold.heads])), "null_reference": ref,
                          "nonpositive": [list(h) for h in top.nonpositive]}
        other = "task" if s.center == "none" else "none"
        _, other_top, _, _ = fit(other)
        fold.other_center = {"center": other, "heads": [list(h) for h in other_top.heads],
                             **stats.set_overlap(fold.heads, other_top.heads)}
        n_layers, n_heads = self.backend.shape
        fold.random_sets = control_sets(fold.heads, n_layers, n_heads, s.random_sets,
                                        seed=s.seed + 1000 * (fold.index + 1) + 100_003 * fold.repeat)

    def _tune(self, fold: Fold, base: dict):
        s, out = self.s, self._dir(fold.repeat, fold.index)
        layers = fold.layers
        dirs = self._stage(out / "directions.jsonl", fold.calibration_ids,
                           lambda item: {"direction": np.round(self.backend.direction(item, layers), 7).tolist()},
                           f"fold {fold.index} directions")
        good = [np.asarray(r["direction"], np.float32) for r in dirs.values() if "error" not in r]
        if not good:
            raise ListenError(f"fold {fold.index}: no calibration item gave a direction")
        fold.zero_directions = sum(not np.any(d) for d in good)
        if fold.zero_directions:
            warnings.warn(f"fold {fold.index}: {fold.zero_directions} of {len(good)} calibration items gave an all-zero "
                          "direction (audio and silence identical at the heads' layers)", ListenWarning, stacklevel=2)
        fold.mean_vector = np.mean(good, axis=0).astype(np.float32)
        rng = np.random.default_rng(s.seed + 31_337 + fold.index + 1000 * fold.repeat)
        v = rng.standard_normal(fold.mean_vector.size)
        fold.random_vector = (v / np.linalg.norm(v)).astype(np.float32)
        conds = self._tune_conditions(fold)
        work = self.backend.score if s.tune == "margin" else self.backend.answer
        tune = self._stage(out / "tune.jsonl", fold.calibration_ids, lambda item: {"results": work(item, conds)},
                           f"fold {fold.index} tune")
        rows = [r for r in tune.values() if "error" not in r and "error" not in base[r["id"]]]
        key = "margin" if s.tune == "margin" else "correct"
        base_vals = {r["id"]: base[r["id"]].get(key) for r in rows}
        for name in self.tuned_names(fold):
            curve = {}
            for a in s.alphas:
                vals = [base_vals[r["id"]] if a == 0 else r["results"][tuned(name, a)].get(key) for r in rows]
                vals = np.array([float(v) for v in vals if v is not None], np.float64)
                entry = {"n": int(vals.size), "value": float(vals.mean()) if vals.size else None}
                if key == "correct":
                    entry["ci95"] = list(stats.wilson(int(vals.sum()), int(vals.size)))
                curve[f"{a:g}"] = entry
            best = max(s.alphas, key=lambda a: (_value(curve[f"{a:g}"]["value"]), -abs(a)))
            fold.alpha[name] = best
            fold.tuning[name] = {"curve": curve, "rule": s.tune,
                                 "baseline": float(np.mean([float(v) for v in base_vals.values() if v is not None]))
                                 if base_vals else None}

    def tuned_names(self, fold: Fold) -> list[str]:
        return ([SPECIALIST, MEAN] + ([RANDOM_DIRECTION] if self.s.random_direction else [])
                + [random_name(i) for i in range(len(fold.random_sets))])

    def _steer(self, fold: Fold, name: str, alpha: float, label: str):
        if name == SPECIALIST:
            cfg = SteerConfig(layers=fold.layers, alpha=alpha)
        elif name == MEAN:
            cfg = SteerConfig(vector=fold.mean_vector, alpha=alpha)
        elif name == RANDOM_DIRECTION:
            cfg = SteerConfig(vector=fold.random_vector, layers=fold.layers, match_norm=True, alpha=alpha)
        else:
            rs = fold.random_sets[int(name.rsplit("-", 1)[1]) - 1]
            cfg = SteerConfig(layers=sorted({l for l, _ in rs}), alpha=alpha)
        return steered(cfg, label)

    def _tune_conditions(self, fold: Fold) -> list:
        return [self._steer(fold, name, a, tuned(name, a)) for a in self.s.alphas if a != 0
                for name in self.tuned_names(fold)]

    def _test_conditions(self, fold: Fold) -> list:
        s = self.s
        conds = [self._steer(fold, name, fold.alpha[name], name) for name in self.tuned_names(fold)
                 if fold.alpha[name] != 0]  # alpha 0 is the baseline: the base pass answered it
        if s.ablate:
            for mode in s.ablate_modes:
                m, factor, audio = parse_mode(mode)
                spec = Ablation(fold.heads, mode=m, factor=factor, audio=audio)
                conds.append(ablated(spec, ablate_name(mode, SPECIALIST)))
                conds += [ablated(Ablation(rs, mode=m, factor=factor, audio=audio), ablate_name(mode, random_name(i)))
                          for i, rs in enumerate(fold.random_sets[: s.n_ablate_random])]
        return conds


def _value(v):
    return -math.inf if v is None else v


# -- the command ------------------------------------------------------------------------------------

def run_experiment(settings: Settings, data: Path, audio_dir: Path, model, out: Path, *, limit: int | None = None,
                   tasks: Sequence[str] = mmau.TASKS, backend=None, progress: bool = True) -> dict:
    """`mlx-listen experiment` (resumable: rerun the same command to continue). Every input is
    checked (the data, the audio, the model's shape from its config) before the folder is bound."""
    items = [it for it in mmau.load_items(data) if it["task"] in tasks][:limit]
    if len(items) < 2 * settings.folds:
        raise ListenError(f"{len(items)} items for {settings.folds} folds: use more items")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ListenError(f"--out {out} is a file, not a folder")
    if backend is None:  # the model's run (a simulated backend brings its own items and identity)
        problems = audio_problems(EvalSpec(Path(data), Path(audio_dir), str(model), out), items)
        if problems:
            shown = ", ".join(f"{a} ({why})" for a, why in problems[:5])
            raise ListenError(f"{len(problems)} audio files are missing or unreadable under {audio_dir}, e.g. {shown}")
        ref = ModelRef.of(model)
        settings.check_model(*ref.shape)
        fingerprint = ref.fingerprint()
    else:
        settings.check_model(*backend.shape)
        fingerprint = getattr(backend, "fingerprint", "simulated")
    identity = {"model_fingerprint": fingerprint, "data_sha256": file_sha256(data), "tasks": list(tasks),
                "limit": limit, **settings.to_json()}
    with locked(out), provisional(out / "experiment.json"):
        claim(out / "experiment.json", identity, extra={"model": str(ModelRef.of(model)), "data": str(data)})
        backend = backend or ModelBackend(model, audio_dir, settings)
        return Experiment(settings, items, out, backend, progress=progress).run()
