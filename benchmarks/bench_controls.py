"""What many controls cost the experiment, per item, against one base answer (issue 19).

One random Qwen2-Audio checkpoint (a 12-layer decoder, so that 99 matched random head sets on
distinct layer sets exist for a 3-layer specialist set), one 10 s clip with an MMAU-style question,
and the work `mlx-listen experiment` does for one item in each stage, through the same code
(`eval.conditions.Answerer`, what `method.backend.ModelBackend` calls):

- base: the greedy answer with every head's audio mass and the options' log-probs (one prefill),
  and the answer with equal-length silence;
- tune by margin (the default): every condition at every alpha (specialist, mean vector, random
  direction, R random sets; 5 alphas) scored on the options from one prefill, no decoding;
- tune by accuracy: the same conditions decoded (the old rule; batched in rows of 32);
- test: each condition at its alpha, decoded and scored;
- ablation: the specialist heads and 20 matched random sets, zero and audio masking (each its own
  prefill and answer).

CPU seconds (`time.process_time`) of one trial; the machine is shared, so read ratios, not times.
The byte-level test tokenizer (262 tokens) makes the unembedding ~600x cheaper than Qwen's 152k
vocabulary, which flatters option scoring; the random model never emits eos, so every row decodes
`--max-tokens` tokens (real answers stop at `</answer>`).

    python benchmarks/bench_controls.py                 # R = 10 and 99
    python benchmarks/bench_controls.py --sets 99 --hidden 512
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--sets", default="10,99", help="random head sets to time, comma-separated")
    p.add_argument("--accuracy-sets", type=int, default=10, help="also time tuning by accuracy with this many sets")
    p.add_argument("--work", type=Path, default=None)
    a = p.parse_args()

    from mlx_listen import presets
    from mlx_listen.eval.conditions import Answerer, ablated, baseline, steered
    from mlx_listen.headset import control_sets
    from mlx_listen.interp.ablation import Ablation
    from mlx_listen.interp.scoring import option_ids
    from mlx_listen.interp.steering import SteerConfig
    from mlx_listen.load import load
    from mlx_listen.prompt import prepare
    from mlx_listen_convert.convert import convert
    from mlx_listen_convert.reference.tiny import build_tiny

    work = a.work or Path(tempfile.mkdtemp(prefix="bench-controls-"))
    if not (work / "mlx").exists():
        build_tiny(work / "hf", layers=a.layers, heads=a.heads, kv_heads=a.heads, hidden=a.hidden,
                   intermediate=2 * a.hidden, init_range=0.1, seed=3)
        convert(str(work / "hf"), str(work / "mlx"), progress=False)
    model, processor = load(work / "mlx")
    rng = np.random.default_rng(0)
    clip = (0.1 * rng.standard_normal(160_000)).astype(np.float32)
    item = {"question": "Which sound event happens first in the recording, and how many times does it repeat?",
            "choices": ["A dog barks twice", "A car horn sounds once", "A door slams three times", "Rain falls"],
            "answer": "A dog barks twice"}
    prompt = prepare(model, processor, [clip], presets.build_prompt(item, "r1-aqa"))
    options = option_ids(processor, prompt, item["choices"], "r1-aqa")
    heads = [(2, 1), (2, 5), (6, 0), (9, 3)]  # the specialist set: layers {2, 6, 9}
    layers = sorted({l for l, _ in heads})
    alphas = (0.5, 1.0, 1.5, 2.0, 3.0)
    v = rng.standard_normal(model.hidden_size).astype(np.float32)

    def timed(fn, repeat: int = 1) -> float:
        fn()  # warm: the silence encoding and prefix cache, as for every item after the first of its length
        tic = time.process_time()
        for _ in range(repeat):
            fn()
        return (time.process_time() - tic) / repeat

    base = Answerer(model, processor, [baseline()], max_tokens=a.max_tokens, audio_mass=True)

    def base_pass():
        base.respond(prompt, options)
        base.respond(base.silence.prompt(prompt))

    t_base = timed(base_pass)
    print(f"decoder {a.layers} layers x {a.heads} heads, hidden {model.hidden_size}; prompt {len(prompt.ids)} tokens "
          f"({prompt.n_audio_tokens} audio); {a.max_tokens} decode steps per row; specialist layers {layers}")
    print(f"{'stage (one item)':<44} {'rows':>5} {'CPU s':>8} {'x base':>7}")
    print(f"{'base: answer + silence answer (2 prefills)':<44} {2:>5} {t_base:>8.2f} {1.0:>7.2f}")

    def conds(n_sets: int, alpha_list, tag=""):
        sets = control_sets(heads, model.n_layers, model.n_heads, n_sets, seed=1)
        out = []
        for al in alpha_list:
            out.append(steered(SteerConfig(layers=layers, alpha=al), f"spec{tag}@{al}"))
            out.append(steered(SteerConfig(vector=v, alpha=al), f"mean{tag}@{al}"))
            out.append(steered(SteerConfig(vector=v, layers=layers, match_norm=True, alpha=al), f"rdir{tag}@{al}"))
            out += [steered(SteerConfig(layers=sorted({l for l, _ in s}), alpha=al), f"r{i}{tag}@{al}")
                    for i, s in enumerate(sets)]
        return out, sets

    rows = {}
    for n in [int(x) for x in a.sets.split(",")]:
        tune, sets = conds(n, alphas)
        t = timed(lambda: Answerer(model, processor, tune, silence=base.silence).respond(prompt, options,
                                                                                           generate=False))
        rows[("tune-margin", n)] = (len(tune), t)
        test, _ = conds(n, (1.0,))
        t = timed(lambda: Answerer(model, processor, test, max_tokens=a.max_tokens,
                                   silence=base.silence).respond(prompt, options))
        rows[("test", n)] = (len(test), t)
        print(f"{f'tune by margin, {n} random sets':<44} {len(tune):>5} {rows[('tune-margin', n)][1]:>8.2f} "
              f"{rows[('tune-margin', n)][1] / t_base:>7.2f}")
        print(f"{f'test, {n} random sets (decode + scores)':<44} {len(test):>5} {t:>8.2f} {t / t_base:>7.2f}")
    if a.accuracy_sets:
        n = a.accuracy_sets
        tune, _ = conds(n, alphas)
        t = timed(lambda: Answerer(model, processor, tune, max_tokens=a.max_tokens,
                                   silence=base.silence).respond(prompt))
        rows[("tune-accuracy", n)] = (len(tune), t)
        print(f"{f'tune by accuracy, {n} random sets (decode)':<44} {len(tune):>5} {t:>8.2f} {t / t_base:>7.2f}")
    sets = control_sets(heads, model.n_layers, model.n_heads, 20, seed=1)
    abl = [ablated(Ablation(heads, audio=audio), f"spec-{audio}")
           for audio in (False, True)] + [ablated(Ablation(s, audio=audio), f"r{i}-{audio}")
                                          for audio in (False, True) for i, s in enumerate(sets)]
    t_abl = timed(lambda: Answerer(model, processor, abl, max_tokens=a.max_tokens).respond(prompt, options))
    print(f"{'ablation: (1 + 20) x zero, audio (own prefills)':<44} {len(abl):>5} {t_abl:>8.2f} {t_abl / t_base:>7.2f}")
    one_zero = timed(lambda: Answerer(model, processor, abl[:1], max_tokens=a.max_tokens).respond(prompt, options))
    # per item over a 2-fold experiment: the base pass once, a calibration item once (direction + tune),
    # a test item once (test + ablation); the direction pass costs about one silence pass + prefill
    t_dir = timed(lambda: Answerer(model, processor, [steered(SteerConfig(layers=layers), "d")],
                                   silence=base.silence).respond(prompt, options, generate=False))
    if ("tune-margin", 99) in rows and ("tune-accuracy", a.accuracy_sets) in rows:
        new = t_base + t_dir + rows[("tune-margin", 99)][1] + rows[("test", 99)][1] + t_abl
        old_test = rows[("test", a.accuracy_sets)][1]
        old = t_base + t_dir + rows[("tune-accuracy", a.accuracy_sets)][1] + old_test + one_zero * (1 + a.accuracy_sets)
        print(f"whole experiment per item, new defaults (99 sets, tune by margin, zero+audio ablation x 21): "
              f"{new:.1f} s = {new / t_base:.1f}x base; old defaults ({a.accuracy_sets} sets, tune by accuracy, zero "
              f"ablation x {1 + a.accuracy_sets}): {old:.1f} s = {old / t_base:.1f}x base; new / old {new / old:.2f}")


if __name__ == "__main__":
    main()
