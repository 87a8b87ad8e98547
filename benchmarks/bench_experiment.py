"""Wall time of `mlx-listen experiment` per item and per condition, on the synthetic demo set.

A random model answers gibberish, so every item would be wrong and head scores undefined; this
script counts an answer as right when its text and the key have lengths of the same parity (the
rule `tests/method/test_method_experiment.py` uses), which follows both the item and what the model says. Only
the timings mean anything. Each stage's rows carry their seconds; the table divides them by the
items and by the answers each item gets in that stage.

    python benchmarks/bench_experiment.py                       # 4-layer tiny model, 28 items
    python benchmarks/bench_experiment.py --layers 8 --hidden 256 --max-tokens 32
    python benchmarks/bench_experiment.py --per-kind 2          # 14 items, ~1 min (1 per kind is too few:
                                                                # a fold's calibration gets one outcome)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--per-kind", type=int, default=4, help="demo items per kind (7 kinds)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--random-sets", type=int, default=3)
    p.add_argument("--tune", choices=["margin", "accuracy"], default="margin")
    p.add_argument("--ablate-sets", type=int, default=2)
    p.add_argument("--alphas", default="1,2")
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()

    from mlx_listen.eval import mmau
    from mlx_listen.eval.demo_set import make_demo_set
    from mlx_listen.method.experiment import Settings, run_experiment
    from mlx_listen_convert.convert import convert
    from mlx_listen_convert.reference.tiny import build_tiny

    work = a.out or Path(tempfile.mkdtemp(prefix="bench-exp-"))
    build_tiny(work / "hf", layers=a.layers, heads=a.heads, kv_heads=max(1, a.heads // 2), hidden=a.hidden,
               intermediate=2 * a.hidden, init_range=0.1, seed=3)
    model = convert(str(work / "hf"), str(work / "mlx"), progress=False)
    data = make_demo_set(work / "demo", n_per_kind=a.per_kind)
    mmau.string_match = lambda answer, prediction, choices: (len(prediction) + len(answer)) % 2 == 0
    alphas = tuple(float(x) for x in a.alphas.split(","))
    s = Settings(k=a.k, alphas=alphas, random_sets=a.random_sets, max_tokens=a.max_tokens, n_perm=100, tune=a.tune,
                 ablate_sets=a.ablate_sets)
    tic = time.perf_counter()
    run_experiment(s, data, data.parent, model, work / "exp", progress=False)
    total = time.perf_counter() - tic

    n_items = len(json.loads(data.read_text()))
    n_tune = len(alphas) * (3 + a.random_sets)  # specialist, mean vector, random direction, random sets
    n_test = 3 + a.random_sets + 2 * (1 + min(a.ablate_sets, a.random_sets))  # steering rows + ablations (own prefills)
    rows = []
    for name, path, answers in [("base", work / "exp" / "base.jsonl", 2)] + [
            (f"fold{f} {stage}", work / "exp" / f"fold{f}" / f"{stage}.jsonl", k)
            for f in range(s.folds) for stage, k in (("directions", 0), ("tune", n_tune), ("test", n_test))]:
        secs = [json.loads(x)["seconds"] for x in path.read_text().splitlines()]
        rows.append((name, len(secs), sum(secs), answers))
    print(f"model: {a.layers} layers, hidden {a.hidden}, {a.heads} heads; {n_items} demo items; "
          f"max {a.max_tokens} tokens; alphas {alphas}; {a.random_sets} random sets; tune by {a.tune}")
    print(f"{'stage':<18} {'items':>5} {'s/item':>8} {'answers/item':>13} {'s/answer':>9}")
    for name, n, tot, k in rows:
        per = tot / n if n else 0.0
        print(f"{name:<18} {n:>5} {per:>8.3f} {k:>13} {per / k if k else float('nan'):>9.4f}")
    print(f"whole experiment: {total:.1f} s ({total / n_items:.2f} s per item, all stages and folds)")
    print(f"output: {work / 'exp'}")


if __name__ == "__main__":
    main()
