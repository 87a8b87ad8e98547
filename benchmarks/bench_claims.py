"""How often the experiment's claims go wrong, on simulated records with a known truth (issue 19's
before -> after table): not a speed benchmark, a rate one. Record level, no model; ~5 min.

1. circular world: heads that track correctness only, the audio changing the answer mostly when the
   model is right. Pooled validation (the old rule) vs within strata (the new one).
2. misleading heads: 6 real heads (mass rises on right answers within task) beside heads that only
   track the task, the clip length or the question length (each predicts correctness). Which heads
   the paper's pooled Pearson, the old `--center task` (clip length only) and the new default pick,
   and how many real heads beat the permutation null.
3. null worlds: the specialist is one more random set. How often "the specialist heads beat the
   random sets" is said, and said without a significant gain of its own: the old rule (empirical p
   <= 0.05 alone, at 19 sets) vs the new one (own gain significant and empirical p < 0.05, 99 sets).
4. interval and p on the same line: Newcombe's interval beside the exact McNemar p (old) vs Tango's
   interval with the McNemar score test (new), on null worlds at n = 200.
5. random sets that are one intervention: distinct layer sets among 10 drawn sets for a specialist
   set in one layer of a 32 x 32 model, old policy (distinct head sets) vs new (distinct layer sets).

    python benchmarks/bench_claims.py [--worlds 40]
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "method")]  # the simulators the tests use


def circular(a):
    from test_method_validation import circular_rows

    from mlx_listen.headset import HeadSet
    from mlx_listen.method.validation import validate

    pooled = within = 0
    auc_p, auc_w = [], []
    for seed in range(a.worlds):
        rep = validate(HeadSet([(2, 1), (4, 5), (5, 3)]), circular_rows(seed), seed=seed, n_random=39)
        pooled += rep["pooled"]["passes"]
        within += rep["passes"]
        auc_p.append(rep["pooled"]["auc"])
        auc_w.append(rep["within_strata"]["auc"])
    print(f"1. circular world, {a.worlds} worlds (n = 400, 39 random sets): pooled validation passes {pooled}/{a.worlds} "
          f"(AUC {np.mean(auc_p):.3f}); within strata {within}/{a.worlds} (AUC {np.mean(auc_w):.3f})")


def misleading(a):
    from mlx_listen import stats

    rng = np.random.default_rng(0)
    real = [(l, 0) for l in (3, 7, 11, 15, 19, 23)]
    task_h = [(l, 1) for l in range(2, 22, 2)]
    ql_h = [(l, 2) for l in range(1, 21, 2)]
    clip_h = [(l, 3) for l in range(4, 24, 4)]
    counts = {k: np.zeros(5) for k in ("none", "clip", "task")}
    for w in range(a.worlds // 2):
        n, L, H = 600, 32, 8
        tasks = np.array(["sound", "music", "speech"])[np.arange(n) % 3]
        code = np.arange(n) % 3
        text = rng.integers(40, 140, n)
        audio = rng.integers(50, 750, n)
        logit = np.array([1.0, 0.0, -1.0])[code] - 1.5 * (text - 90) / 50 + 1.0 * (audio - 400) / 350
        correct = rng.random(n) < 1 / (1 + np.exp(-logit))
        mass = 0.1 + 0.02 * rng.standard_normal((n, L, H))
        for l, h in real:
            mass[:, l, h] += 0.012 * correct
        for l, h in task_h:
            mass[:, l, h] += np.array([0.03, 0.015, 0.0])[code]
        for l, h in ql_h:
            mass[:, l, h] += 0.04 * (1 - (text - 40) / 100)
        for l, h in clip_h:
            mass[:, l, h] += 0.04 * (audio - 50) / 700
        cov_clip = stats.length_covariate(audio)
        cov_both = stats.length_covariates(audio, text)
        for name, kw in (("none", dict(center="none")), ("clip", dict(center="task", covariates=cov_clip)),
                         ("task", dict(center="task", covariates=cov_both))):
            top = set(stats.top_k(stats.head_scores(mass, correct, tasks=tasks, **kw), 20).heads)
            null = stats.permutation_null(mass, correct, k=20, n_perm=100, seed=w, tasks=tasks, **kw)
            beating = {tuple(h) for h, r in zip(null["observed_heads"], null["observed_r"]) if r > null["fwer_threshold"]}
            mis = set(task_h) | set(ql_h) | set(clip_h)
            counts[name] += [len(beating & set(real)), len(top & set(task_h)), len(top & set(ql_h)),
                             len(top & set(clip_h)), len(beating & mis)]
    m = a.worlds // 2
    for name, label in (("none", "pooled Pearson (--center none)"), ("clip", "old --center task (clip length only)"),
                        ("task", "new default (task, clip and question length)")):
        c = counts[name] / m
        print(f"2. {label}: real heads beating the null {c[0]:.1f} of 6; in the top 20: task-only {c[1]:.1f} of "
              f"10, question-length {c[2]:.1f} of 10, clip-length {c[3]:.1f} of 5; misleading heads beating the null "
              f"{c[4]:.1f} ({m} worlds, n = 600)")


def nulls(a):
    from test_method_experiment import null_world

    from mlx_listen import stats
    from mlx_listen.method.verdict import steering_claim

    for n in (200, 1000):
        new = new_without = old = old_without = disagree_old = disagree_new = 0
        worlds = a.worlds * 25
        for seed in range(worlds):
            cond, ctl = null_world(10_000 + seed, n=n, n_random=99)
            own = cond["specialist"]["vs_baseline"]
            ok = steering_claim(cond, ctl)
            new += ok
            new_without += ok and not (own["p"] < 0.05 and own["difference"] > 0)
            gains = ctl["steering"]["accuracy"]["values"][:19]  # the old rule needed 19 sets to be possible at all
            ep = (1 + sum(g >= ctl["steering"]["accuracy"]["specialist"] - 1e-12 for g in gains)) / 20
            old_claim = ep <= 0.05
            old += old_claim
            old_without += old_claim and own["mcnemar_exact_p"] >= 0.05
            if n == 200:
                lo, hi = stats.newcombe_paired_ci(own["both_right"], own["wrong_to_right"], own["right_to_wrong"],
                                                  own["both_wrong"])
                disagree_old += ((lo > 0 or hi < 0) != (own["mcnemar_exact_p"] < 0.05))
                disagree_new += ((own["ci95"][0] > 0 or own["ci95"][1] < 0) != (own["p"] < 0.05))
        print(f"3. null worlds, n = {n}, {worlds} worlds: old rule (empirical p <= 0.05 alone, 19 sets; impossible with "
              f"the old default of 10) claims {old} ({100 * old / worlds:.1f}%), {old_without} of them without a "
              f"significant own gain; new rule (99 sets) claims {new} ({100 * new / worlds:.1f}%), {new_without} "
              "without a significant own gain")
        if n == 200:
            print(f"4. interval and p disagree on the same line (null worlds, n = 200): Newcombe + exact McNemar "
                  f"{disagree_old}/{worlds} ({100 * disagree_old / worlds:.1f}%); Tango + score test "
                  f"{disagree_new}/{worlds}")


def layer_sets(a):
    from mlx_listen import stats

    old_src = subprocess.run(["git", "show", "eecce85:mlx_listen/stats/controls.py"], cwd=ROOT, capture_output=True,
                             text=True).stdout
    tmp = Path(tempfile.mkdtemp()) / "mlx_listen" / "stats"
    tmp.mkdir(parents=True)
    (tmp / "old_controls.py").write_text(old_src.replace("from ..errors", "from mlx_listen.errors")
                                         .replace("from ._common", "from mlx_listen.stats._common"))
    spec = importlib.util.spec_from_file_location("old_controls", tmp / "old_controls.py")
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    heads = [(5, h) for h in range(20)]  # 20 specialist heads in one layer of 32 x 32
    dup_old = dup_new = 0
    distinct_old, distinct_new = [], []
    for seed in range(a.worlds * 5):
        o = old.matched_random_sets(heads, 32, 32, n_sets=10, seed=seed)
        nw = stats.matched_random_sets(heads, 32, 32, n_sets=10, seed=seed)
        lo, ln = {frozenset(l for l, _ in s) for s in o}, {frozenset(l for l, _ in s) for s in nw}
        distinct_old.append(len(lo))
        distinct_new.append(len(ln))
        dup_old += len(lo) < 10
        dup_new += len(ln) < 10
    w = a.worlds * 5
    print(f"5. 10 random sets for 20 heads in one layer of 32 x 32, {w} draws: some layer set twice in {dup_old}/{w} "
          f"(old: {np.mean(distinct_old):.1f} distinct interventions of 10 on average), new {dup_new}/{w} "
          f"({np.mean(distinct_new):.1f})")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", type=int, default=40)
    a = p.parse_args()
    circular(a)
    misleading(a)
    nulls(a)
    layer_sets(a)


if __name__ == "__main__":
    main()
