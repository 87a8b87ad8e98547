"""`mlx-listen experiment`: the paper's protocol, cross-fitted, with controls that can carry a claim
(arXiv 2603.06854; shared/design/method.md §4: k-fold cross-fitting on MMAU, stratified by task).

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
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from . import mmau, stats
from .ablation import Ablation, condition, parse_mode
from .conditions import Answerer, baseline, steered
from .errors import ListenError
from .evaluate import EvalSpec, audio_problems
from .load import load, resolve, weights_fingerprint
from .plots import curve_plot, hist_plot, rank_plot, roc_plot
from .prompt import prepare
from .records import append_jsonl, claim, locked, read_jsonl, write_atomic, write_json
from .steering import SteerConfig, Steerer

BASELINE, SPECIALIST, MEAN = "baseline", "specialist", "mean-vector"


@dataclass
class Settings:
    folds: int = 2
    seed: int = 0
    k: int = 20
    alphas: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 3.0)
    random_sets: int = 10
    prompt: str = mmau.DEFAULT_PRESET
    max_tokens: int = 256
    center: str = "none"  # "none": the paper's pooled Pearson; "task": within-task, length partialled out
    n_perm: int = 200
    n_boot: int = 200
    ablate: bool = True
    ablate_mode: str = "zero"  # zero | scale:F | audio (mask the heads off the audio)
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

    @property
    def n_ablate_random(self) -> int:
        return self.random_sets if self.ablate_sets is None else min(self.ablate_sets, self.random_sets)

    def to_json(self) -> dict:
        d = asdict(self)
        d["alphas"] = list(self.alphas)
        return d


def random_name(i: int) -> str:
    return f"random-{i + 1}"


def tuned(name: str, alpha: float) -> str:
    return f"{name}@{alpha:g}"


# -- the backend: how an item gets answered --------------------------------------------------------

class ModelBackend:
    """The MLX model: base answers, directions and answers under conditions, one item at a time."""

    def __init__(self, model_path, audio_dir: Path, settings: Settings):
        self.model, self.processor = load(model_path)
        self.audio_dir, self.settings = Path(audio_dir), settings
        self.shape = (len(self.model.layers), self.model.config.text_config.num_attention_heads)
        self._base = Answerer(self.model, self.processor, [baseline()], max_tokens=settings.max_tokens,
                              audio_mass=True)
        self._answerer = (None, None)  # (the condition list it was built for, the Answerer)

    def _prompt(self, item):
        return prepare(self.model, self.processor, [self.audio_dir / item["audio_id"]],
                       mmau.build_prompt(item, self.settings.prompt))

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
        """Rows of `path` for `ids`, computing the missing ones with `work(item) -> row` (fsync'd, in
        order); an item whose work raises ListenError is recorded with its `error`."""
        path.parent.mkdir(parents=True, exist_ok=True)
        done = {r["id"]: r for r in read_jsonl(path, repair=True)}
        todo = [i for i in ids if i not in done]
        for i in tqdm(todo, desc=desc, unit="item", file=sys.stderr, disable=not self.progress or not todo):
            item = self.by_id[i]
            tic = time.perf_counter()
            try:
                row = {"id": i, "task": item["task"], **work(item)}
            except ListenError as e:
                row = {"id": i, "task": item["task"], "error": str(e)}
            row["seconds"] = round(time.perf_counter() - tic, 4)
            append_jsonl(path, row)
            done[i] = row
        return {i: done[i] for i in ids}

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
        fold.random_sets = stats.matched_random_sets(fold.heads, n_layers, n_heads, n_sets=s.random_sets,
                                                     seed=s.seed + 1000 * (fold.index + 1))

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
                lo, hi = mmau.wilson(int(ok.sum()), len(ok))
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
            audio = s.ablate_mode == "audio"
            mode, factor = ("zero", 0.0) if audio else parse_mode(s.ablate_mode)
            conds.append(condition(Ablation(fold.heads, mode=mode, factor=factor, audio=audio), "ablate-specialist"))
            conds += [condition(Ablation(rs, mode=mode, factor=factor, audio=audio), f"ablate-{random_name(i)}")
                      for i, rs in enumerate(fold.random_sets[: s.n_ablate_random])]
        return conds


# -- the report ---------------------------------------------------------------------------------------

def condition_names(s: Settings) -> list[str]:
    names = [BASELINE, SPECIALIST, MEAN] + [random_name(i) for i in range(s.random_sets)]
    if s.ablate:
        names += ["ablate-specialist"] + [f"ablate-{random_name(i)}" for i in range(s.n_ablate_random)]
    return names


def build_report(s: Settings, items: list[dict], base: dict, folds: list) -> dict:
    """Everything report.md shows, machine-readable. Each item's result under each condition comes
    from its own fold's test pass (the baseline from the base pass)."""
    names = condition_names(s)
    results: dict[str, dict[str, bool]] = {n: {} for n in names}
    failed = {}
    fold_of = {}
    for fold, test in folds:
        for i in fold.test_ids:
            fold_of[i] = fold.index
            row, b = test[i], base[i]
            if "error" in b or "error" in row:
                failed[i] = b.get("error") or row.get("error")
                continue
            results[BASELINE][i] = bool(b["correct"])
            for n in names[1:]:
                results[n][i] = bool(row["results"][n]["correct"])
    ids = [it["id"] for it in items if it["id"] in results[BASELINE]]
    tasks = {it["id"]: it["task"] for it in items}
    base_ok = np.array([results[BASELINE][i] for i in ids], bool)
    conditions = {}
    for n in names:
        ok = np.array([results[n][i] for i in ids], bool)
        lo, hi = mmau.wilson(int(ok.sum()), len(ok))
        entry = {"n": len(ok), "correct": int(ok.sum()), "accuracy": float(ok.mean()) if len(ok) else None,
                 "ci95": [lo, hi],
                 "per_task": {t: _acc([results[n][i] for i in ids if tasks[i] == t]) for t in mmau.TASKS}}
        if n != BASELINE and len(ok):
            entry["vs_baseline"] = stats.paired_accuracy(base_ok, ok, tasks=[tasks[i] for i in ids],
                                                         min_group=s.min_group)
        conditions[n] = entry
    gain = {n: conditions[n]["accuracy"] - conditions[BASELINE]["accuracy"] for n in names[1:] if ids}
    randoms = [random_name(i) for i in range(s.random_sets)]
    controls = {}
    if ids:
        controls["steering"] = stats.compare_to_controls(gain[SPECIALIST], [gain[r] for r in randoms])
        if s.ablate and s.n_ablate_random:
            drops = [-gain[f"ablate-{r}"] for r in randoms[: s.n_ablate_random]]
            controls["ablation"] = stats.compare_to_controls(-gain["ablate-specialist"], drops)
    report = {
        "settings": s.to_json(),
        "n_items": len(items), "n_tested": len(ids), "failed": [{"id": i, "error": e} for i, e in failed.items()],
        "folds": [_fold_json(fold) for fold, _ in folds],
        "conditions": conditions,
        "gains": gain,
        "controls": controls,
        "head_overlap_across_folds": _pairwise_jaccard([f.heads for f, _ in folds]),
        "validation": _validation(s, items, base, [f for f, _ in folds]),
        "coverage": {"every_item_tested_once": sorted(fold_of) == sorted(it["id"] for it in items),
                     "calibration_test_disjoint": all(not set(f.calibration_ids) & set(f.test_ids) for f, _ in folds)},
    }
    report["verdict"] = verdict(report)
    return report


def _acc(vals) -> dict:
    n, c = len(vals), int(sum(vals))
    lo, hi = mmau.wilson(c, n)
    return {"n": n, "correct": c, "accuracy": c / n if n else None, "ci95": [lo, hi]}


def _fold_json(fold: Fold) -> dict:
    return {
        "index": fold.index, "calibration_ids": fold.calibration_ids, "test_ids": fold.test_ids,
        "heads": [[int(l), int(h), round(float(fold.scores[l, h]), 6)] for l, h in fold.heads],
        "layers": sorted({l for l, _ in fold.heads}),
        "calibration_accuracy": fold.calibration_accuracy,
        "null": {k: v for k, v in (fold.null or {}).items() if k != "null_topk"},
        "stability": fold.stability, "other_center": fold.other_center,
        "random_sets": [[list(h) for h in rs] for rs in fold.random_sets],
        "alpha": fold.alpha, "tuning": fold.tuning,
        "mean_vector_norm": float(np.linalg.norm(fold.mean_vector)) if hasattr(fold, "mean_vector") else None,
    }


def _pairwise_jaccard(sets) -> list[dict]:
    return [{"folds": [a, b], "jaccard": stats.jaccard(sets[a], sets[b])}
            for a in range(len(sets)) for b in range(a + 1, len(sets))]


def _validation(s: Settings, items, base: dict, folds: list[Fold]) -> dict:
    """Does the listening score of the fold's heads rise on its test items when the audio changes the
    chosen option (audio vs silence)? Unparsable answers are their own category."""
    groups = {"changed": [], "unchanged": [], "unparsable": []}
    random_groups: list[dict] = [{"changed": [], "unchanged": []} for _ in range(s.random_sets)]
    for fold in folds:
        for i in fold.test_ids:
            b = base[i]
            if "error" in b:
                continue
            mass = np.asarray(b["audio_mass"])
            L = float(np.mean([mass[l, h] for l, h in fold.heads]))
            a, z = b["choice"], b["silence"]["choice"]
            g = "unparsable" if a is None or z is None else ("changed" if a != z else "unchanged")
            groups[g].append(L)
            if g != "unparsable":
                for r, rs in zip(random_groups, fold.random_sets):
                    r[g].append(float(np.mean([mass[l, h] for l, h in rs])))
    out = {k: len(v) for k, v in groups.items()}
    out["auc"] = stats.auc_ci(groups["changed"], groups["unchanged"], seed=s.seed, min_group=s.min_group)
    out["mean_diff"] = stats.mean_diff_ci(groups["changed"], groups["unchanged"], seed=s.seed, min_group=s.min_group)
    rand = [stats.auc(r["changed"], r["unchanged"]) if r["changed"] and r["unchanged"] else None for r in random_groups]
    out["random_auc"] = rand
    ok = [x for x in rand if x is not None]
    if out["auc"]["auc"] is not None and ok:
        out["auc_vs_random"] = stats.compare_to_controls(out["auc"]["auc"], ok)
    out["scores"] = {k: v for k, v in groups.items()}
    out["definition"] = ("changed: the option the official matcher reads differs between the audio and the silence "
                         "answer; unparsable: either answer picks no option (left out of the AUC)")
    return out


def verdict(r: dict) -> list[str]:
    """Plain sentences a reader can check against the tables."""
    lines = []
    c, g = r["conditions"], r["gains"]
    if not r["n_tested"]:
        return ["No item could be tested."]
    spec = c[SPECIALIST]["vs_baseline"]
    ci = spec["ci95"]
    lines.append(f"Specialist steering changed accuracy by {100 * g[SPECIALIST]:+.1f} points (95% CI "
                 + (f"{100 * ci[0]:+.1f} to {100 * ci[1]:+.1f}" if ci else "n/a: too few items")
                 + f", McNemar p = {spec['mcnemar_p']:.3g}) on {r['n_tested']} held-out items.")
    ctl = r["controls"].get("steering")
    if ctl:
        beats = ctl["empirical_p"] <= 0.05
        lines.append(f"Matched random head sets gained {100 * ctl['mean']:+.1f} points on average (range "
                     f"{100 * ctl['min']:+.1f} to {100 * ctl['max']:+.1f}); the specialist gain's empirical p among "
                     f"them is {ctl['empirical_p']:.3g} (smallest possible {ctl['min_possible_p']:.3g}): "
                     + ("the specialist heads beat the random sets." if beats else
                        "the specialist gain is not distinguishable from the random sets."))
    lines.append(f"The dataset-mean vector changed accuracy by {100 * g[MEAN]:+.1f} points.")
    null = [f["null"] for f in r["folds"]]
    beating = [n.get("n_beating_null", 0) for n in null]
    lines.append("Heads above the permutation null's family-wise 5% threshold, per fold: "
                 + ", ".join(str(b) for b in beating)
                 + (" — no head beats the null." if not any(beating) else "."))
    ab = r["controls"].get("ablation")
    if ab:
        lines.append(f"Ablating the specialist heads lowered accuracy by {100 * ab['specialist']:+.1f} points; matched "
                     f"random ablations by {100 * ab['mean']:+.1f} on average (empirical p {ab['empirical_p']:.3g}).")
    v = r["validation"]
    auc = v["auc"]
    if auc["auc"] is None or auc["too_small"]:
        lines.append(f"Listening validation: too few items ({v['changed']} changed, {v['unchanged']} unchanged, "
                     f"{v['unparsable']} unparsable) for an interval.")
    else:
        lines.append(f"Listening validation: AUC {auc['auc']:.3f} (95% CI {auc['ci95'][0]:.3f} to "
                     f"{auc['ci95'][1]:.3f}) for items whose option changed with silence ({v['changed']}) against "
                     f"unchanged ones ({v['unchanged']}); {v['unparsable']} unparsable left out.")
    return lines


def write_report_md(r: dict, out: Path):
    """report.md with its PNGs: the verdict first, then the tables behind it."""
    s = r["settings"]
    md = ["# Experiment report\n", f"{r['n_tested']} of {r['n_items']} items tested, {s['folds']} folds (seed "
          f"{s['seed']}), k = {s['k']}, center = {s['center']}, alphas {s['alphas']}, {s['random_sets']} matched "
          f"random head sets, prompt {s['prompt']}, greedy, max {s['max_tokens']} tokens.\n", "## Verdict\n"]
    md += [f"- {line}" for line in r["verdict"]]
    md += ["", "## Accuracy on the held-out items\n",
           "| condition | n | accuracy | 95% CI | vs baseline | 95% CI | McNemar p | sound | music | speech |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for name, c in r["conditions"].items():
        vb = c.get("vs_baseline")
        d = f"{100 * vb['difference']:+.1f}" if vb else ""
        ci = (f"{100 * vb['ci95'][0]:+.1f} to {100 * vb['ci95'][1]:+.1f}" if vb and vb["ci95"] else ("" if not vb else "n/a"))
        p = f"{vb['mcnemar_p']:.3g}" if vb else ""
        tasks = " | ".join(f"{100 * c['per_task'][t]['accuracy']:.1f}" if c["per_task"][t]["accuracy"] is not None else "-"
                           for t in mmau.TASKS)
        acc = "-" if c["accuracy"] is None else f"{100 * c['accuracy']:.1f}"
        md.append(f"| {name} | {c['n']} | {acc} | {100 * c['ci95'][0]:.1f}–{100 * c['ci95'][1]:.1f} | {d} | {ci} | {p} "
                  f"| {tasks} |")
    spec = r["conditions"][SPECIALIST].get("vs_baseline", {})
    if spec.get("per_task"):
        md += ["", "Specialist vs baseline per task (Holm-adjusted McNemar p): "
               + ", ".join(f"{t['task']} {100 * t['difference']:+.1f} (p {t['p_holm']:.3g})" for t in spec["per_task"])]
    md += ["", "## Folds\n", "| fold | calibration | test | heads (layer.head, r) | layers | beat null | p (set) | "
           "stability (mean) | overlap with center=" + ("task" if s["center"] == "none" else "none") + " | alpha |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for f in r["folds"]:
        heads = ", ".join(f"{l}.{h} ({sc:+.2f})" for l, h, sc in f["heads"][:8]) + (" …" if len(f["heads"]) > 8 else "")
        stab = np.mean(f["stability"]["frequency"]) if f["stability"]["frequency"] else float("nan")
        alphas = ", ".join(f"{k} {v:g}" for k, v in f["alpha"].items() if not k.startswith("random-")) \
            + f", random sets {sorted({v for k, v in f['alpha'].items() if k.startswith('random-')})}"
        md.append(f"| {f['index']} | {len(f['calibration_ids'])} | {len(f['test_ids'])} | {heads} | {f['layers']} | "
                  f"{f['null'].get('n_beating_null')} (r > {f['null'].get('fwer_threshold', float('nan')):.3f}) | "
                  f"{f['null'].get('p_set', float('nan')):.3g} | {stab:.2f} | {f['other_center']['jaccard']:.2f} | {alphas} |")
    md += ["", "Head sets across folds (Jaccard): " + ", ".join(f"{o['folds']}: {o['jaccard']:.2f}"
                                                                 for o in r["head_overlap_across_folds"])]
    # plots
    pngs = []
    for f in r["folds"]:
        series, bands = {}, {}
        for name in (SPECIALIST, MEAN):
            curve = f["tuning"][name]["curve"]
            series[name] = [curve[f"{a:g}"]["accuracy"] for a in s["alphas"]]
            bands[name] = ([curve[f"{a:g}"]["ci95"][0] for a in s["alphas"]], [curve[f"{a:g}"]["ci95"][1] for a in s["alphas"]])
        rnd = [[f["tuning"][k]["curve"][f"{a:g}"]["accuracy"] for a in s["alphas"]] for k in f["tuning"] if k.startswith("random-")]
        if rnd:
            series["random sets (mean)"] = list(np.mean(np.array(rnd, float), axis=0))
        base = f["tuning"][SPECIALIST]["baseline"]
        if base is not None:
            series["baseline"] = [base] * len(s["alphas"])
        path = out / f"alpha_fold{f['index']}.png"
        curve_plot(s["alphas"], series, path, "alpha", "calibration accuracy",
                   f"Fold {f['index']}: accuracy vs steering strength on its calibration items", bands=bands)
        pngs.append(path.name)
        n = f["null"]
        if n.get("observed_r"):
            path = out / f"heads_fold{f['index']}.png"
            rank_plot(n["observed_r"], {"null median": n["rank_q50"], "null 95%": n["rank_q95"]}, path,
                      f"Fold {f['index']}: top-{s['k']} head scores against the permutation null")
            pngs.append(path.name)
    ctl = r["controls"].get("steering")
    if ctl:
        path = out / "random_gains.png"
        hist_plot(ctl["values"], path, "test gain over baseline (accuracy)", "Matched random head sets vs specialist",
                  marker=ctl["specialist"], marker_label="specialist")
        pngs.append(path.name)
    v = r["validation"]
    if v["scores"]["changed"] and v["scores"]["unchanged"]:
        path = out / "listening_roc.png"
        roc_plot({"specialist heads": (v["scores"]["changed"], v["scores"]["unchanged"])}, path,
                 "Listening score: option changed with silence vs unchanged")
        pngs.append(path.name)
    md += ["", "## Plots\n"] + [f"![{p}]({p})" for p in pngs]
    if r["failed"]:
        md += ["", f"## Failed items ({len(r['failed'])})\n"] + [f"- {f['id']}: {f['error']}" for f in r["failed"][:50]]
    md += ["", "Coverage: every item tested exactly once: " + str(r["coverage"]["every_item_tested_once"])
           + "; calibration and test disjoint in every fold: " + str(r["coverage"]["calibration_test_disjoint"]) + "."]
    write_atomic(out / "report.md", "\n".join(md) + "\n")


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
        fingerprint = weights_fingerprint(resolve(model))
    else:
        fingerprint = getattr(backend, "fingerprint", "simulated")
    out = Path(out)
    identity = {"model_fingerprint": fingerprint, "data_sha256": mmau.file_sha256(data), "tasks": list(tasks),
                "limit": limit, **settings.to_json()}
    with locked(out):
        claim(out / "experiment.json", identity, extra={"model": str(model), "data": str(data)})
        backend = backend or ModelBackend(model, audio_dir, settings)
        return Experiment(settings, items, out, backend, progress=progress).run()
