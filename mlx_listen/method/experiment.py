"""`mlx-listen experiment`: the paper's protocol, cross-fitted, with controls that can carry a claim
(arXiv 2603.06854, with k-fold cross-fitting on MMAU, stratified by task).

Folds are drawn once (stratified by task, seeded). For each fold f, everything that selects is
fitted on the other folds' items (its calibration items) and reported only on fold f (its test
items), so every item is a test item exactly once and never helped choose what it is tested with:

1. base: every item answered once, greedy, with the audio (its correctness, and every head's
   audio mass at T from the same prefill) and with equal-length silence (the option it picks
   then). Shared by all folds: the baseline condition of fold f is these answers on fold f.
2. heads: top-k heads by Pearson r (or the within-task partial r, `center="task"`) on the
   calibration records, with a permutation null, bootstrap stability and (both centerings) the
   overlap of the two head sets; matched random head sets (same heads per layer, other layers).
3. directions: d(x) of the specialist layers for every calibration item; their mean is the
   dataset-mean vector.
4. tune: every calibration item answered under specialist, mean-vector and each random set at
   every α of the grid (one prefill and one batched decode per item); each condition's α is the
   one with the best calibration accuracy (ties: the smallest |α|), chosen separately.
5. test: fold f answered under every condition at its chosen α, plus specialist-head and
   random-head ablation.

Every stage is a JSONL of fsync'd rows: killed at any moment, a rerun continues where it stopped
and nothing is redone or duplicated. `report.json` and `report.md` (with PNGs) come last.

The model is behind a small backend (`ModelBackend`); tests drive the same protocol with a
simulated one, where the truth is known.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import presets, stats
from ..errors import ListenError
from ..eval import mmau
from ..eval.conditions import Answerer, ablated, baseline, steered
from ..eval.evaluate import EvalSpec, audio_problems
from ..headset import control_sets
from ..interp.ablation import Ablation, parse_mode
from ..interp.steering import SteerConfig, Steerer
from ..load import ModelRef
from ..prompt import prepare
from ..records import Stage, claim, file_sha256, locked, write_json
from .report import MEAN, SPECIALIST, build_report, random_name, tuned, write_report_md


@dataclass
class Settings:
    folds: int = 2
    seed: int = 0
    k: int = 20
    alphas: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 3.0)
    random_sets: int = 10
    prompt: str = presets.DEFAULT_PRESET
    max_tokens: int = 256
    center: str = "none"  # "none": the paper's pooled Pearson; "task": within-task, length partialled out
    n_perm: int = 200
    n_boot: int = 200
    ablate: bool = True
    ablate_mode: str = "zero"  # zero | scale:F | audio (mask the heads off the audio); as `--ablate-mode`
    ablate_sets: int | None = None  # random-head ablations (default: as many as random sets)
    min_group: int = 10

    def __post_init__(self):
        self.alphas = tuple(float(a) for a in self.alphas)
        if self.folds < 2:
            raise ListenError("an experiment needs at least 2 folds")
        if not self.alphas or not all(math.isfinite(a) and a != 0 for a in self.alphas):
            raise ListenError("the alpha grid needs finite, non-zero strengths")
        if self.k < 1 or self.random_sets < 1:
            raise ListenError("k and the number of random sets must be at least 1")
        if self.center not in ("none", "task"):
            raise ListenError(f"center must be none or task, not {self.center!r}")
        if parse_mode(self.ablate_mode)[0] == "mean":
            raise ListenError("the experiment ablates with zero, scale:F or audio (mean ablation needs a means file "
                              "fitted per fold)")

    @property
    def n_ablate_random(self) -> int:
        return self.random_sets if self.ablate_sets is None else min(self.ablate_sets, self.random_sets)

    def to_json(self) -> dict:
        d = asdict(self)
        d["alphas"] = list(self.alphas)
        return d


# -- the backend: how an item gets answered --------------------------------------------------------

class ModelBackend:
    """The MLX model: base answers, directions and answers under conditions, one item at a time."""

    def __init__(self, model, audio_dir: Path, settings: Settings):
        self.model, self.processor = ModelRef.of(model).get()
        self.audio_dir, self.settings = Path(audio_dir), settings
        self.shape = (self.model.n_layers, self.model.n_heads)
        self._base = Answerer(self.model, self.processor, [baseline()], max_tokens=settings.max_tokens,
                              audio_mass=True)
        self._answerer = (None, None)  # (the condition list it was built for, the Answerer)

    def _prompt(self, item):
        return prepare(self.model, self.processor, [self.audio_dir / item["audio_id"]],
                       presets.build_prompt(item, self.settings.prompt))

    def base(self, item) -> dict:
        prompt = self._prompt(item)
        ans = self._base(prompt)["base"]
        sil = self._base(self._base.silence.prompt(prompt))["base"]
        return {**outcome(item, ans.text), "audio_tokens": prompt.n_audio_tokens,
                "audio_mass": np.round(ans.audio_mass.astype(np.float64), 7).tolist(),
                "silence": outcome(item, sil.text)}

    def direction(self, item, layers: Sequence[int]) -> np.ndarray:
        st = Steerer(self.model, SteerConfig(layers=list(layers)), self._base.silence)
        return np.array(st.direction(self._prompt(item)))

    def answer(self, item, conditions: list) -> dict[str, dict]:
        if self._answerer[0] is not conditions:  # a new stage: a fold's tuning or test conditions
            self._answerer = (conditions, Answerer(self.model, self.processor, conditions,
                                                   max_tokens=self.settings.max_tokens, silence=self._base.silence))
        answers = self._answerer[1](self._prompt(item))
        return {name: outcome(item, a.text) for name, a in answers.items()}


def outcome(item: dict, text: str) -> dict:
    """What the report needs of one answer: the extracted answer, whether it parsed, the option
    the official matcher reads in it (None: no option or several), and whether it is right."""
    answer, parsed = mmau.extract_answer(text)
    return {"answer": answer, "parsed": parsed, "choice": mmau.matched_choice(answer, item["choices"]),
            "correct": mmau.string_match(item["answer"], answer, item["choices"])}


# -- the protocol ------------------------------------------------------------------------------------

@dataclass
class Fold:
    index: int
    calibration_ids: list[str]
    test_ids: list[str]
    heads: list[tuple[int, int]] = field(default_factory=list)
    scores: np.ndarray | None = None
    null: dict | None = None
    stability: dict | None = None
    other_center: dict | None = None
    random_sets: list[list[tuple[int, int]]] = field(default_factory=list)
    alpha: dict[str, float] = field(default_factory=dict)
    tuning: dict[str, dict] = field(default_factory=dict)
    calibration_accuracy: float | None = None
    mean_vector: np.ndarray | None = field(default=None, repr=False)


class Experiment:
    def __init__(self, settings: Settings, items: list[dict], out: Path, backend, *, progress: bool = True):
        self.s, self.items, self.out, self.backend, self.progress = settings, items, Path(out), backend, progress
        self.by_id = {it["id"]: it for it in items}
        ids, tasks = [it["id"] for it in items], [it["task"] for it in items]
        self.fold_ids = stats.stratified_folds(ids, tasks, settings.folds, settings.seed)

    # -- stages ----------------------------------------------------------------------------------
    def _stage(self, path: Path, ids: Sequence[str], work, desc: str) -> dict[str, dict]:
        """Rows of `path` for `ids` by id, the missing ones computed with `work(item)` (`records.Stage`)."""
        rows = Stage(path).run([self.by_id[i] for i in ids], work, desc=desc, progress=self.progress, seconds=True)
        return {r["id"]: r for r in rows}

    def run(self) -> dict:
        s, out = self.s, self.out
        ids = [it["id"] for it in self.items]
        base = self._stage(out / "base.jsonl", ids, self.backend.base, "base")
        folds = []
        for f, test_ids in enumerate(self.fold_ids):
            fold = Fold(f, [i for i in ids if i not in set(test_ids)], list(test_ids))
            self._fit_heads(fold, base)
            self._tune(fold, base)
            conds = self._test_conditions(fold)
            fold_test = self._stage(out / f"fold{f}" / "test.jsonl", fold.test_ids,
                                    lambda item: {"results": self.backend.answer(item, conds)}, f"fold {f} test")
            folds.append((fold, fold_test))
        report = build_report(s, self.items, base, folds)
        write_json(out / "report.json", report)
        write_report_md(report, out)
        return report

    def _usable(self, rows: dict, ids) -> list[dict]:
        return [rows[i] for i in ids if "error" not in rows[i]]

    def _fit_heads(self, fold: Fold, base: dict):
        s = self.s
        cal = self._usable(base, fold.calibration_ids)
        if len(cal) < 2:
            raise ListenError(f"fold {fold.index}: {len(cal)} usable calibration items; need more")
        mass = np.array([r["audio_mass"] for r in cal], np.float64)
        correct = np.array([r["correct"] for r in cal], bool)
        tasks = [r["task"] for r in cal]
        cov = stats.length_covariate([r["audio_tokens"] for r in cal])

        def fit(center):
            kw = dict(center=center, tasks=tasks, covariates=cov if center == "task" else None)
            scores = stats.head_scores(mass, correct, **kw)
            return scores, stats.top_k(scores, s.k), kw

        fold.scores, top, kw = fit(s.center)
        fold.heads = [tuple(h) for h in top.heads]
        fold.calibration_accuracy = float(correct.mean())
        fold.null = stats.permutation_null(mass, correct, k=s.k, n_perm=s.n_perm, seed=s.seed + 17 * fold.index, **kw)
        freq = stats.bootstrap_stability(mass, correct, k=s.k, n_boot=s.n_boot, seed=s.seed + 31 * fold.index, **kw)
        fold.stability = {"frequency": [float(freq[l, h]) for l, h in fold.heads], "n_boot": s.n_boot,
                          "nonpositive": [list(h) for h in top.nonpositive]}
        other = "task" if s.center == "none" else "none"
        _, other_top, _ = fit(other)
        fold.other_center = {"center": other, "heads": [list(h) for h in other_top.heads],
                             **stats.set_overlap(fold.heads, other_top.heads)}
        n_layers, n_heads = self.backend.shape
        fold.random_sets = control_sets(fold.heads, n_layers, n_heads, s.random_sets, seed=s.seed + 1000 * (fold.index + 1))

    def _layers(self, heads) -> list[int]:
        return sorted({l for l, _ in heads})

    def _tune(self, fold: Fold, base: dict):
        s, out = self.s, self.out / f"fold{fold.index}"
        layers = self._layers(fold.heads)
        dirs = self._stage(out / "directions.jsonl", fold.calibration_ids,
                           lambda item: {"direction": np.round(self.backend.direction(item, layers), 7).tolist()},
                           f"fold {fold.index} directions")
        good = [np.asarray(r["direction"], np.float32) for r in dirs.values() if "error" not in r]
        if not good:
            raise ListenError(f"fold {fold.index}: no calibration item gave a direction")
        fold.mean_vector = np.mean(good, axis=0).astype(np.float32)
        conds = self._tune_conditions(fold)
        tune = self._stage(out / "tune.jsonl", fold.calibration_ids,
                           lambda item: {"results": self.backend.answer(item, conds)}, f"fold {fold.index} tune")
        rows = [r for r in tune.values() if "error" not in r and "error" not in base[r["id"]]]
        base_acc = float(np.mean([base[r["id"]]["correct"] for r in rows])) if rows else None
        for name in [SPECIALIST, MEAN] + [random_name(i) for i in range(s.random_sets)]:
            curve = {}
            for a in s.alphas:
                ok = np.array([r["results"][tuned(name, a)]["correct"] for r in rows], bool)
                lo, hi = stats.wilson(int(ok.sum()), len(ok))
                curve[f"{a:g}"] = {"accuracy": float(ok.mean()) if len(ok) else None, "ci95": [lo, hi], "n": len(ok)}
            best = max(s.alphas, key=lambda a: ((curve[f"{a:g}"]["accuracy"] or 0.0), -abs(a)))
            fold.alpha[name] = best
            fold.tuning[name] = {"curve": curve, "baseline": base_acc}

    def _steer(self, layers_or_vector, alpha: float, name: str):
        if isinstance(layers_or_vector, np.ndarray):
            return steered(SteerConfig(vector=layers_or_vector, alpha=alpha), name)
        return steered(SteerConfig(layers=list(layers_or_vector), alpha=alpha), name)

    def _tune_conditions(self, fold: Fold) -> list:
        conds = []
        for a in self.s.alphas:
            conds.append(self._steer(self._layers(fold.heads), a, tuned(SPECIALIST, a)))
            conds.append(self._steer(fold.mean_vector, a, tuned(MEAN, a)))
            conds += [self._steer(self._layers(rs), a, tuned(random_name(i), a)) for i, rs in enumerate(fold.random_sets)]
        return conds

    def _test_conditions(self, fold: Fold) -> list:
        s = self.s
        conds = [self._steer(self._layers(fold.heads), fold.alpha[SPECIALIST], SPECIALIST),
                 self._steer(fold.mean_vector, fold.alpha[MEAN], MEAN)]
        conds += [self._steer(self._layers(rs), fold.alpha[random_name(i)], random_name(i))
                  for i, rs in enumerate(fold.random_sets)]
        if s.ablate:
            mode, factor, audio = parse_mode(s.ablate_mode)
            conds.append(ablated(Ablation(fold.heads, mode=mode, factor=factor, audio=audio), "ablate-specialist"))
            conds += [ablated(Ablation(rs, mode=mode, factor=factor, audio=audio), f"ablate-{random_name(i)}")
                      for i, rs in enumerate(fold.random_sets[: s.n_ablate_random])]
        return conds


# -- the command ------------------------------------------------------------------------------------

def run_experiment(settings: Settings, data: Path, audio_dir: Path, model, out: Path, *, limit: int | None = None,
                   tasks: Sequence[str] = mmau.TASKS, backend=None, progress: bool = True) -> dict:
    """`mlx-listen experiment` (resumable: rerun the same command to continue)."""
    items = [it for it in mmau.load_items(data) if it["task"] in tasks][:limit]
    if len(items) < 2 * settings.folds:
        raise ListenError(f"{len(items)} items for {settings.folds} folds: use more items")
    if backend is None:  # the model's run (a simulated backend brings its own items and identity)
        problems = audio_problems(EvalSpec(Path(data), Path(audio_dir), str(model), Path(out)), items)
        if problems:
            shown = ", ".join(f"{a} ({why})" for a, why in problems[:5])
            raise ListenError(f"{len(problems)} audio files are missing or unreadable under {audio_dir}, e.g. {shown}")
        fingerprint = ModelRef.of(model).fingerprint()
    else:
        fingerprint = getattr(backend, "fingerprint", "simulated")
    out = Path(out)
    identity = {"model_fingerprint": fingerprint, "data_sha256": file_sha256(data), "tasks": list(tasks),
                "limit": limit, **settings.to_json()}
    with locked(out):
        claim(out / "experiment.json", identity, extra={"model": str(ModelRef.of(model)), "data": str(data)})
        backend = backend or ModelBackend(model, audio_dir, settings)
        return Experiment(settings, items, out, backend, progress=progress).run()
