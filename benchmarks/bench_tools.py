"""Cost of each causal tool per item, against one plain prefill of the same prompt.

The random real-width model of `bench_conditions.py` (decoder 4096 wide, 32 heads, FFN 11008;
encoder 1280 wide), few layers, bf16, the byte-level tokenizer padded to `--vocab`; one 10 s clip
and a four-option question. Each trial runs every variant (order reversed on every other trial),
after a warm-up on a 1 s clip; times are this process's CPU seconds, medians over trials, and the
ratio is the median of per-trial ratios to the plain prefill timed in the same trial.

- plain prefill: `generate.prefill(model, prompt)`, the prompt into a KV cache and the logits at T;
- capture: the same with every head's audio mass at T (`audio_mass=True`, what `heads` records);
- option scoring: `Answerer([baseline()]).respond(prompt, options, generate=False)`, four options,
  and the same for baseline + 5 α (one prefill and one silence pass for all six; the silence
  side warm for the clip's length, as after a run's first item of that length);
- ablation: zero-ablating `--k` heads, scored the same way (an ablated condition has its own
  prefill inside its hooks);
- patching: `patch_map.patch_prompt` with the four options (every layer × position group and every
  head at T), and with `first_diff`;
- lens: `inspect.inspect_direction` of the head set on one item (its audio and silence passes to L*,
  then the three lenses); the item's own prepare (log-mel, encoder) is timed apart and taken off.

    python benchmarks/bench_tools.py                    # 2+2 layers, 2 trials (~15 min, 2-core CPU)
    python benchmarks/bench_tools.py --layers 4 --trials 3
    python benchmarks/bench_tools.py --quick            # tiny widths, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_conditions import Rows, build_model, clip, measure, tiny_processor  # noqa: E402

from mlx_listen import presets  # noqa: E402
from mlx_listen.answers import prefill  # noqa: E402
from mlx_listen.audio import SAMPLE_RATE  # noqa: E402
from mlx_listen.eval.conditions import Answerer, ablated, baseline, steered  # noqa: E402
from mlx_listen.headset import HeadSet, random_heads  # noqa: E402
from mlx_listen.interp import scoring  # noqa: E402
from mlx_listen.interp.ablation import Ablation  # noqa: E402
from mlx_listen.method.directions import from_heads  # noqa: E402
from mlx_listen.method.inspect import inspect_direction  # noqa: E402
from mlx_listen.method.patch_map import PatchConfig, patch_prompt  # noqa: E402
from mlx_listen.prompt import prepare  # noqa: E402

CHOICES = ["a dog barking", "a cat meowing", "a car horn", "rain on a roof"]
ITEM = {"id": "bench-0", "audio_id": "bench.wav", "question": "Which sound is it?", "choices": CHOICES,
        "answer": CHOICES[0], "task": "sound", "difficulty": "easy"}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="bfloat16")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (real model: 32)")
    p.add_argument("--encoder-layers", type=int, default=2, help="encoder layers (real: 32)")
    p.add_argument("--vocab", type=int, default=32000, help="vocab size (real: 156032)")
    p.add_argument("--k", type=int, default=20, help="heads in the head set (steering, ablation, lens)")
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--clip-seconds", type=float, default=10.0)
    p.add_argument("--quick", action="store_true", help="tiny widths: checks the script runs")
    p.add_argument("--json", metavar="OUT")
    return p.parse_args()


def main():
    a = parse_args()
    if a.quick:
        a.layers, a.encoder_layers, a.vocab, a.trials, a.clip_seconds = 2, 1, 1024, 1, 2.0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        processor = tiny_processor(a.vocab, tmp / "tok")
        model = build_model(a, a.layers, a.encoder_layers, processor.audio_token_id)
        n_layers, n_heads = model.n_layers, model.n_heads
        heads = HeadSet(random_heads(n_layers, n_heads, min(a.k, n_layers * n_heads), 0))
        audio = clip(a.clip_seconds)
        sf.write(tmp / ITEM["audio_id"], audio, SAMPLE_RATE)
        text = presets.build_prompt(ITEM, presets.DEFAULT_PRESET)
        rows = Rows()

        def item(seconds):
            p = prepare(model, processor, [clip(seconds)], text)
            mx.eval(p.embeddings)
            return p

        cfg = from_heads(heads, alpha=1.0)
        scorer = Answerer(model, processor, [baseline()])
        six = Answerer(model, processor, [baseline()] + [steered(replace(cfg, alpha=al), f"alpha={al:g}")
                                                         for al in (0.5, 1, 2, 3, 4)], silence=scorer.silence)
        ablating = Answerer(model, processor, [ablated(Ablation(heads.heads, mode="zero"), "ablated")])
        variants = {
            "plain prefill": lambda p, o: prefill(model, p),
            "capture: every head's audio mass at T": lambda p, o: prefill(model, p, audio_mass=True),
            "option scoring, 4 options": lambda p, o: scorer.respond(p, o, generate=False),
            "option scoring, 4 options x (baseline + 5 α)": lambda p, o: six.respond(p, o, generate=False),
            f"ablation (zero, {len(heads.heads)} heads), 4 options": lambda p, o: ablating.respond(p, o, generate=False),
            "patching, 4 options (layers x groups, heads at T)":
                lambda p, o: patch_prompt(model, processor, p, choices=CHOICES, silence=scorer.silence),
            "patching, 4 options, first_diff":
                lambda p, o: patch_prompt(model, processor, p, choices=CHOICES, silence=scorer.silence,
                                          config=PatchConfig(first_diff=True)),
            "lens of the head set's direction, one item (prepare taken off)":
                lambda p, o: inspect_direction(model, processor, headset=heads, items=[ITEM], audio_dir=tmp,
                                               silence=scorer.silence),
        }
        warm = item(1.0)
        rows.n_prompt = len(warm.ids)
        wopts = scoring.option_ids(processor, warm, CHOICES, presets.DEFAULT_PRESET)
        for fn in variants.values():
            fn(warm, wopts)
        # the steady state of a run: the silence encoding and prefix cache of this clip length are
        # warm after its first item (here from another question)
        scorer.silence.residuals(prepare(model, processor, [audio], "What is it?"), cfg.layers)
        res = {n: [] for n in variants}
        prep = []
        for trial in range(a.trials):
            cpu = time.process_time()
            prompt = item(a.clip_seconds)
            prep.append(time.process_time() - cpu)
            opts = scoring.option_ids(processor, prompt, CHOICES, presets.DEFAULT_PRESET)
            rows.n_prompt = len(prompt.ids)
            names = list(variants) if trial % 2 == 0 else list(variants)[::-1]
            for n in names:
                m = measure(lambda: variants[n](prompt, opts), rows, n_layers)
                m.pop("out")
                if n.startswith("lens"):
                    m["cpu"] -= prep[-1]  # inspect_direction prepares the item itself
                res[n].append(m)
                print(f"  trial {trial}: {n:<62} cpu {m['cpu']:7.1f} s  wall {m['s']:7.1f} s  "
                      f"prompt rows {m['layer0']:>5} (full-depth {m['equiv']:7.1f})", flush=True)
    base = [m["cpu"] for m in res["plain prefill"]]
    out = {"config": {k: v for k, v in vars(a).items() if k != "json"}, "prompt_tokens": len(prompt.ids),
           "audio_tokens": prompt.n_audio_tokens, "prepare_cpu_s": statistics.median(prep),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, mlx {mx.__version__}", "variants": {}}
    for n, ms in res.items():
        t = [m["cpu"] for m in ms]
        out["variants"][n] = {"cpu_s": statistics.median(t), "ratio": statistics.median(x / y for x, y in zip(t, base)),
                              "prompt_rows_layer0": ms[0]["layer0"], "rows_full_depth": ms[0]["equiv"],
                              "peak_gb": max(m["peak_gb"] for m in ms)}
    print(f"\n{a.dtype}, decoder {a.layers} layers, encoder {a.encoder_layers}, vocab {a.vocab}; "
          f"{out['prompt_tokens']}-token prompt ({out['audio_tokens']} audio tokens), {len(heads.heads)} heads over "
          f"{len(heads.layers)} layers; prepare {out['prepare_cpu_s']:.1f} CPU s (not in the rows); "
          f"medians of {a.trials} trials; {out['machine']}\n")
    print("| tool | CPU time | ratio to a plain prefill | prompt rows (layer 0) | full-depth equiv. | peak memory |")
    print("|---|---|---|---|---|---|")
    for n, v in out["variants"].items():
        print(f"| {n} | {v['cpu_s']:.1f} s | {v['ratio']:.2f}× | {v['prompt_rows_layer0']} | "
              f"{v['rows_full_depth']:.0f} | {v['peak_gb']:.2f} GB |")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2, default=float))


if __name__ == "__main__":
    main()
