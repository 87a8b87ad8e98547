"""Head ablation and audio masking (`interp/ablation.py`) against PyTorch forward hooks on the tiny
models (fp32), zero-strength edits, mean files, the options, and the planted head."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
from support import SR, invoke, ok, tone

from mlx_listen.answers import generate
from mlx_listen.errors import ListenError
from mlx_listen.headset import parse_heads
from mlx_listen.hooks import AUDIO_MASS, run_with_cache
from mlx_listen.interp.ablation import Ablation, head_means, load_means, parse_mode, save_means
from mlx_listen.presets import build_prompt
from mlx_listen.prompt import prepare

Q = "Describe the audio."
HEADS = [(0, 1), (1, 0), (1, 3)]


def hf_last_logits_and_tokens(model, processor, clips, n_tokens):
    import torch

    from mlx_listen_convert.reference.hf import hf_inputs

    inputs = hf_inputs(processor, clips, Q)
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1].float().numpy()
        gen = model.generate(**inputs, max_new_tokens=n_tokens, do_sample=False)
    toks = gen[0, inputs["input_ids"].shape[1]:].tolist()
    eos = set(model.generation_config.eos_token_id or [])
    return logits, toks[: next((i for i, t in enumerate(toks) if t in eos), len(toks))]


def mlx_last_logits(model, prompt):
    return np.array(run_with_cache(model, prompt, [])[0][0])


CASES = [
    ("zero", dict(mode="zero")),
    ("scale", dict(mode="scale", factor=0.3)),
    ("mean", dict(mode="mean")),
    ("audio", dict(audio=True)),
]


@pytest.mark.torch
@pytest.mark.slow
@pytest.mark.parametrize("name,kw", CASES, ids=[c[0] for c in CASES])
def test_ablation_matches_pytorch(tiny, hf_eager, name, kw):
    from mlx_listen_convert.reference.ablation import ablated, head_means_hf

    model, processor = tiny.mlx
    hf, hp = hf_eager
    clip = tone(2.5)
    prompt = prepare(model, processor, [clip], Q)
    means = None
    if kw.get("mode") == "mean":
        calib = [([tone(1.5, 330.0, 7)], "What is it?"), ([tone(3.0, 880.0, 8)], Q)]
        means = head_means(model, [prepare(model, processor, c, q) for c, q in calib], layers=[0, 1])
        ref_means = head_means_hf(hf, hp, calib, [0, 1])
        for l in (0, 1):
            assert np.abs(means[l] - ref_means[l]).max() <= 1e-5
    spec = Ablation(HEADS, means=means, **kw)
    with spec.hooks(model, prompt):
        ours = mlx_last_logits(model, prompt)
        ours_tokens = generate(model, processor, prompt, max_tokens=16).tokens
    with ablated(hf, HEADS, mode=kw.get("mode", "zero"), factor=kw.get("factor", 0.0), means=means,
                 audio_positions=prompt.audio_positions if kw.get("audio") else None):
        ref, ref_tokens = hf_last_logits_and_tokens(hf, hp, [clip], 16)
    print(f"{tiny.name} {name}: logits max abs error {np.abs(ours - ref).max():.2g}")
    assert np.abs(ours - ref).max() <= 1e-4, np.abs(ours - ref).max()
    assert ours_tokens == ref_tokens
    plain = mlx_last_logits(model, prompt)
    assert np.abs(ours - plain).max() > 1e-3, "the ablation changed nothing: a weak test"
    assert model.hooks.active() == []


def test_audio_masking_removes_the_heads_audio_attention(tiny_gqa):
    """Masked heads put exactly 0 attention on the audio (capture sees the mask attention used);
    the other heads of a masked layer keep what they had."""
    model, processor = tiny_gqa.mlx
    prompt = prepare(model, processor, [tone(2.0)], Q)
    T = prompt.last
    b = run_with_cache(model, prompt, AUDIO_MASS.format("*"))[1].audio_mass(T)
    with Ablation([(0, 1), (0, 2)], audio=True).hooks(model, prompt):
        a = run_with_cache(model, prompt, AUDIO_MASS.format("*"))[1].audio_mass(T)
    assert a[0, 1] == 0 and a[0, 2] == 0 and b[0, 1] > 0.05 and b[0, 2] > 0.05
    assert np.abs(a[0, [0, 3]] - b[0, [0, 3]]).max() <= 1e-6  # layer 0's other heads: untouched input
    assert np.abs(a[1] - b[1]).max() > 1e-5  # later layers see the change


def test_identity_edits_are_bit_identical(tiny_gqa):
    model, processor = tiny_gqa.mlx
    prompt = prepare(model, processor, [tone(2.0)], Q)
    plain = mlx_last_logits(model, prompt)
    with Ablation(HEADS, mode="scale", factor=1.0).hooks(model, prompt):
        same = mlx_last_logits(model, prompt)
    assert np.array_equal(plain, same)


def test_means_file_round_trip_and_checks(tiny_gqa, tmp_path):
    model, processor = tiny_gqa.mlx
    prompt = prepare(model, processor, [tone(1.0)], Q)
    means = head_means(model, [prompt])
    path = tmp_path / "means.safetensors"
    save_means(path, means, {"n_prompts": 1})
    back = load_means(path)
    assert sorted(back) == sorted(means) and all(np.array_equal(back[l], means[l]) for l in means)
    bad = {l: v[:, :3] for l, v in means.items()}
    with pytest.raises(ListenError, match="another model"):
        Ablation(HEADS, mode="mean", means=bad).check(model)
    with pytest.raises(ListenError, match="do not exist"):
        Ablation([(9, 0)]).check(model)


def test_parse_options(tmp_path):
    assert parse_heads("3.7, 12.0") == [(3, 7), (12, 0)]
    assert parse_mode("scale:0.5") == ("scale", 0.5, False) and parse_mode("zero") == ("zero", 0.0, False)
    assert parse_mode("audio") == ("zero", 0.0, True) and parse_mode("mean") == ("mean", 0.0, False)
    for bad in ("scale:nan", "scale:", "half"):
        with pytest.raises(ListenError):
            parse_mode(bad)
    with pytest.raises(ListenError, match="neither"):
        parse_heads("nope.json")
    with pytest.raises(ListenError, match="at least one head"):
        Ablation([])


# -- the command line and the planted head --------------------------------------------------------


def test_ask_with_ablation(tiny_gqa, tmp_path):

    from support import invoke, ok

    clip = tmp_path / "a.wav"
    sf.write(clip, tone(2.0), SR)
    r = ok(invoke("ask", clip, Q, "--model", tiny_gqa.mlx_path, "-m", 8, "--ablate", "0.1,1.0,1.3", "--json"))
    got = json.loads(r.stdout.strip().splitlines()[-1])
    model, processor = tiny_gqa.mlx
    prompt = prepare(model, processor, [clip], Q)
    with Ablation(HEADS).hooks(model, prompt):
        want = generate(model, processor, prompt, max_tokens=8).tokens
    assert got["tokens"] == want and got["ablation"] == {"heads": [list(h) for h in HEADS], "mode": "zero"}
    assert "Ablation: zero of heads" in r.stderr
    for bad, why in ((["--ablate", "9.9"], "do not exist"), (["--ablate-mode", "scale:x", "--ablate", "0.1"], "scale:F"),
                     (["--ablate-audio"], "need --ablate")):
        res = invoke("ask", clip, Q, "--model", tiny_gqa.mlx_path, "-m", 2, *bad)
        assert res.exit_code in (1, 2) and why in res.output and "Traceback" not in res.output, res.output


@pytest.mark.slow
def test_eval_ablation_conditions_and_matched_controls(tiny_gqa, tmp_path):


    from mlx_listen.eval.demo_set import make_demo_set

    demo = make_demo_set(tmp_path / "demo", n_per_kind=1)
    out = tmp_path / "run"
    means = tmp_path / "means.safetensors"
    ok(invoke("ablate", "means", "--data", demo, "--audio-dir", demo.parent, "--model", tiny_gqa.mlx_path,
              "--limit", 3, "--out", means))
    assert sorted(load_means(means)) == [0, 1]
    r = ok(invoke("eval", "--data", demo, "--audio-dir", demo.parent, "--model", tiny_gqa.mlx_path, "--out", out,
                  "-m", 3, "--limit", 4, "--ablate", "1.0,1.3", "--ablate-mode", "mean", "--ablate-means", means,
                  "--ablate-controls", 2, "--compare"))
    # One policy for every random control (`headset.control_sets`): distinct layer sets, and a 2-layer model
    # has one other layer, so one control of the two asked for, said in one warning.
    assert "only 1 distinct layer sets" in r.stderr and "instead of 2 random sets" in r.stderr
    assert r.stdout.count("McNemar") == 2  # baseline vs the ablation and vs the control
    runs = json.loads((out / "run.json").read_text())["conditions"]
    assert list(runs) == ["base", "ablated", "ablate-random-1"]
    spec_heads = runs["ablated"]["ablation"]["heads"]
    ctl = runs["ablate-random-1"]["ablation"]
    assert ctl["mode"] == "mean" and len(ctl["heads"]) == len(spec_heads)
    assert {l for l, _ in ctl["heads"]} == {0}  # matched: one layer, not the specialist one
    for name in ("ablated", "ablate-random-1"):
        rows = [json.loads(x) for x in (out / name / "predictions.jsonl").read_text().splitlines()]
        assert len(rows) == 4 and all(r["condition"] == name for r in rows)


def test_ablating_the_planted_head_flips_the_answer(planted, tmp_path):
    """The planted model answers "x" with its clip, "y" with silence: `--ablate` of its one head
    (zero, and audio masking) gives "y"; ablating another head of that layer changes nothing; the
    answer comes through the eval condition and the command line alike."""
    from mlx_listen.interp.scoring import option_logprobs

    model, processor, layer, head, info = planted
    prompt = prepare(model, processor, [info["clip"]], build_prompt(info["item"], info["preset"]))

    def pick(ablation=None):
        if ablation is None:
            return info["choices"][int(np.argmax(option_logprobs(model, processor, prompt, info["choices"], info["preset"])[0]))]
        with ablation.hooks(model, prompt):
            return pick()

    assert pick() == "x"
    assert pick(Ablation([(layer, head)])) == "y"
    assert pick(Ablation([(layer, head)], audio=True)) == "y"  # the head cannot read the audio any more
    other = (head + 1) % model.config.text_config.num_attention_heads
    assert pick(Ablation([(layer, other)])) == "x"
    out = tmp_path / "run"
    ok(invoke("eval", "--data", info["data"], "--audio-dir", info["audio_dir"], "--model", info["mlx_path"], "--out",
              out, "--prompt", info["preset"], "--score", "logprob", "--ablate", f"{layer}.{head}", "--compare"))
    base = json.loads((out / "predictions.jsonl").read_text().splitlines()[0])
    abl = json.loads((out / "ablated" / "predictions.jsonl").read_text().splitlines()[0])
    assert (base["model_output"], abl["model_output"]) == ("x", "y")
