"""Audio–silence steering against the PyTorch implementation (forward hooks) on the tiny models."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import soundfile as sf
from support import SR, tone

from mlx_listen.errors import ListenError
from mlx_listen.eval.conditions import Answerer, baseline, steered
from mlx_listen.generate import generate
from mlx_listen.hooks import RESID, run_with_cache
from mlx_listen.interp.steering import Silence, SteerConfig, Steerer
from mlx_listen.method.directions import load_vector, save_vector, steer_config
from mlx_listen.prompt import prepare

Q = "Describe the audio."


@pytest.mark.parametrize("at", ["all", "prompt"])
def test_steered_logits_and_tokens_match_pytorch(tiny, at):
    from mlx_listen_convert.reference.hf import run_steered

    clip, layers, alpha = tone(2.5), [0, 1], 1.5
    ref = run_steered(tiny.hf_model, tiny.hf_processor, [clip], Q, layers=layers, alpha=alpha, at=at,
                      max_new_tokens=24)
    model, processor = tiny.mlx
    prompt = prepare(model, processor, [clip], Q)
    st = Steerer(model, SteerConfig(layers=layers, alpha=alpha, at=at))
    d = np.array(st.direction(prompt))
    assert np.abs(d - ref["steer_direction"]).max() <= 1e-4 * max(1, np.abs(ref["steer_direction"]).max())
    with st.applied(prompt):
        logits = last_logits(model, prompt)
    assert np.abs(logits - ref["steered_logits_last"]).max() <= 1e-4
    unsteered = tiny.reference("greedy-steer", [clip], Q)["logits"][-1]
    assert np.abs(logits - unsteered).max() > 0.05, "steering had no visible effect: a weak test"
    eos = set(processor.tokenizer.eos_token_ids)
    hf = ref["steered_greedy_tokens"].tolist()
    hf = hf[: next((i for i, t in enumerate(hf) if t in eos), len(hf))]
    assert st.generate(processor, prompt, max_tokens=24).tokens == hf


def last_logits(model, prompt) -> np.ndarray:
    return np.array(run_with_cache(model, prompt, [])[0][0])


def test_alpha_zero_is_bit_identical(tiny_gqa):
    model, processor = tiny_gqa.mlx
    prompt = prepare(model, processor, [tone(2.0)], Q)
    base = last_logits(model, prompt)
    st = Steerer(model, SteerConfig(layers=[0, 1], alpha=0.0))
    with st.applied(prompt):
        steered = last_logits(model, prompt)
    assert np.array_equal(base, steered)
    assert st.generate(processor, prompt, max_tokens=16).tokens == generate(model, processor, prompt, max_tokens=16).tokens
    assert model.hooks.active() == []


@pytest.mark.parametrize("n", [321, 16001, 40003, 77777])
def test_equal_length_silence_gives_same_tokens_for_odd_lengths(tiny_gqa, n):
    model, processor = tiny_gqa.mlx
    audio = np.random.default_rng(n).standard_normal(n).astype(np.float32) * 0.1
    a = prepare(model, processor, [audio], Q)
    s = prepare(model, processor, [np.zeros(n, np.float32)], Q)
    assert a.ids == s.ids and a.n_audio_tokens == s.n_audio_tokens
    silence = Silence(model)
    cached = silence.features(a.clips[0].n_frames)
    assert np.array_equal(np.array(cached), np.array(model.encode_audio(s.clips[0].mel, s.clips[0].n_frames)))
    assert np.array_equal(np.array(silence.prompt(a).embeddings), np.array(s.embeddings))


def test_short_silence_pass_equals_full_pass(tiny_gqa):
    """The silence pass runs only blocks 0..max(L*): the same residuals as the whole model's run."""
    model, processor = tiny_gqa.mlx
    clip = tone(3.1)
    prompt = prepare(model, processor, [clip], Q)
    silent = prepare(model, processor, [np.zeros_like(clip)], Q)
    _, cap = run_with_cache(model, silent, [RESID.format(0), RESID.format(1)])
    for layers in ([0], [0, 1], [1]):
        short = Steerer(model, SteerConfig(layers=layers)).silence_residuals(prompt)
        for l in layers:
            full = np.array(cap.resid(l, silent.last).astype(mx.float32))
            assert np.array_equal(np.array(short[l]), full)


def test_silence_prefix_cache_gives_the_full_passes_residuals(tiny_gqa):
    """The silent prompt's KV up to the end of its clips is kept per (ids, clip lengths) and reused
    by other questions: every read, hit or miss, shallower or deeper, equals a full run's."""
    model, processor = tiny_gqa.mlx
    silence = Silence(model, prefix_size=2)

    def check(clips, question, layers):
        prompt = prepare(model, processor, clips, question)
        silent = prepare(model, processor, [np.zeros_like(c) for c in clips], question)
        _, cap = run_with_cache(model, silent, [RESID.format(l) for l in layers])
        got = silence.residuals(prompt, layers)
        for l in layers:
            full = np.array(cap.resid(l, silent.last).astype(mx.float32))
            np.testing.assert_allclose(np.array(got[l]), full, rtol=1e-5, atol=1e-5)

    a, b = tone(2.0), tone(3.3, 330)
    check([a], Q, [0])                                   # miss, depth 1
    assert len(silence._prefixes) == 1
    check([a], "Which instrument plays, and how fast?", [0])  # hit: another question, same length
    check([a], "What is it?", [0, 1])                    # deeper: recomputed in place of the shallower
    check([a], Q, [0])                                   # shallower hit from the deeper entry
    assert len(silence._prefixes) == 1 and len(next(iter(silence._prefixes.values()))) == 2
    check([b], Q, [1])                                   # another length: its own entry
    check([a, b], Q, [0, 1])                             # two clips: keyed on both lengths
    assert len(silence._prefixes) == 2                   # the oldest dropped
    check([a], Q, [0, 1])                                # and it still works after being dropped
    silence = Silence(model, prefix_size=0)              # keeps nothing: every read a miss
    check([a], Q, [0, 1])
    check([a], Q, [1])
    assert not silence._prefixes


def test_vector_file_round_trip_and_width_check(tiny_gqa, tmp_path):
    model, processor = tiny_gqa.mlx
    hidden = model.config.text_config.hidden_size
    v = np.random.default_rng(0).standard_normal(hidden).astype(np.float32)
    path = tmp_path / "v.safetensors"
    save_vector(path, v, apply_layer=len(model.layers) - 1, hidden_size=hidden,
                meta={"layers": [0, 1], "coeff": 0.5, "source": "dataset_mean"})
    back, layer, md = load_vector(path, hidden, len(model.layers))
    assert np.array_equal(back, v) and layer == len(model.layers) - 1
    assert md["hidden_size"] == str(hidden) and json.loads(md["layers"]) == [0, 1]
    with pytest.raises(ListenError, match="hidden size"):
        load_vector(path, hidden * 2, len(model.layers))
    # the file's stored strength is what --vector uses without --alpha
    cfg, settings = steer_config(None, path)
    assert cfg.alpha == 0.5 and cfg.layers == [] and settings["vector_sha256"]
    assert steer_config(None, path, alpha=2.0)[0].alpha == 2.0
    # a fixed vector steers without any silence pass
    prompt = prepare(model, processor, [tone(1.0)], Q)
    st = Steerer(model, cfg)
    with st.applied(prompt):
        steered = last_logits(model, prompt)
    h = run_with_cache(model, prompt, RESID.format(len(model.layers) - 1))[1].resid(len(model.layers) - 1, prompt.last)
    lm = model.language_model
    expect = lm.lm_head(lm.model.norm(h + 0.5 * mx.array(v)))
    assert np.abs(steered - np.array(expect)).max() <= 1e-5


def test_shared_prefill_gives_the_tokens_of_each_steered_answer(tiny):
    """Baseline, several alphas, prompt-only steering, a random-layer set, a vector and listening
    strength answered together (one prefill, one silence pass, one batched decode) give, row for
    row, the tokens and text of each answered alone through hooks."""
    model, processor = tiny.mlx
    prompt = prepare(model, processor, [tone(2.5)], Q)
    v = np.random.default_rng(1).standard_normal(model.config.text_config.hidden_size).astype(np.float32)
    mass = run_with_cache(model, prompt, "decoder.blocks.*.attn.hook_audio_mass")[1].audio_mass(prompt.last)
    heads = [(0, 1), (1, 2)]
    configs = {f"a{a}": SteerConfig(layers=[0, 1], alpha=a) for a in (0.5, 1.0, 2.0, 4.0)}
    configs["prompt"] = SteerConfig(layers=[0, 1], alpha=3.0, at="prompt")
    configs["layer0"] = SteerConfig(layers=[0], alpha=2.0)
    configs["vector"] = SteerConfig(vector=v, alpha=0.3)
    configs["listening"] = SteerConfig(layers=[1], alpha=1.0, strength="listening", heads=heads,
                                       listening_mean=float(mass[0, 1] + mass[1, 2]))  # 2x L(x): alpha doubled
    conds = [baseline()] + [steered(c, name) for name, c in configs.items()]
    answerer = Answerer(model, processor, conds, max_tokens=20)
    calls = []
    real = answerer.silence.residuals
    answerer.silence.residuals = lambda *a: calls.append(a[1]) or real(*a)
    together = answerer(prompt)
    assert calls == [[0, 1]], "one silence pass over the union of the read layers"
    assert together["base"].tokens == generate(model, processor, prompt, max_tokens=20).tokens
    changed = 0
    for name, cfg in configs.items():
        alone = Steerer(model, cfg).generate(processor, prompt, max_tokens=20)
        assert together[name].tokens == alone.tokens, name
        assert together[name].text == alone.text and together[name].finish_reason == alone.finish_reason
        changed += together[name].tokens != together["base"].tokens
    assert changed >= 1, "steering changed no answer: a weak test"
    assert together["a1.0"].timing["batch"] == len(conds)


def test_rows_leave_the_batch_at_eos(tiny_gqa, monkeypatch):
    """Rows that end early (eos) leave the batch; the others go on with the same tokens."""
    model, processor = tiny_gqa.mlx
    prompt = prepare(model, processor, [tone(2.5)], Q)
    conds = [baseline()] + [steered(SteerConfig(layers=[0, 1], alpha=a), f"a{a}") for a in (1.0, 4.0)]
    free = Answerer(model, processor, conds, max_tokens=16)(prompt)
    stop = free["a4.0"].tokens[3]  # make a token of one row an eos: that row ends there
    eos = set(processor.tokenizer.eos_token_ids) | {stop}
    monkeypatch.setattr(type(processor.tokenizer), "eos_token_ids", property(lambda self: eos), raising=False)
    ended = Answerer(model, processor, conds, max_tokens=16)(prompt)
    for name, ans in free.items():
        cut = next((i for i, t in enumerate(ans.tokens) if t in eos), None)
        want = ans.tokens if cut is None else ans.tokens[:cut]
        assert ended[name].tokens == want, name
        assert ended[name].finish_reason == ("length" if cut is None else "stop")
        alone = (generate(model, processor, prompt, max_tokens=16) if name == "base"
                 else Steerer(model, conds[[c.name for c in conds].index(name)].steer).generate(
                     processor, prompt, max_tokens=16))
        assert alone.tokens == want, name
    assert ended["a4.0"].finish_reason == "stop"


def test_listening_of_a_steered_answer_is_the_clips(tiny_gqa):
    """`ask --listen --steer`: the listening score is the clip's, not the silence pass's (issue 10.1)."""
    from mlx_listen.ask import ask
    from mlx_listen.headset import HeadSet

    model, processor = tiny_gqa.mlx
    clip = tone(2.0)
    prompt = prepare(model, processor, [clip], Q)
    hs = HeadSet([(0, 1), (1, 3)])
    true = hs.listening(run_with_cache(model, prompt, "decoder.blocks.*.attn.hook_audio_mass")[1].audio_mass(prompt.last))
    silent = Silence(model).prompt(prompt)
    sil = hs.listening(run_with_cache(model, silent, "decoder.blocks.*.attn.hook_audio_mass")[1].audio_mass(prompt.last))
    assert abs(true - sil) > 1e-4, "silence and audio give the same score: a weak fixture"
    for alpha in (0.0, 2.0):
        ans = ask(model, processor, [clip], Q, heads=hs, steer=SteerConfig(layers=[0, 1], alpha=alpha), max_tokens=6)
        assert ans.listening == pytest.approx(true, abs=1e-6)
        assert len(ans.listening_tokens) == len(ans.tokens)
    batch = Answerer(model, processor, [baseline(), steered(SteerConfig(layers=[0, 1], alpha=2.0))], max_tokens=6,
                     listen_heads=hs.heads)(prompt)
    assert batch["steered"].listening == pytest.approx(true, abs=1e-6)
    assert batch["steered"].listening_tokens == pytest.approx(ans.listening_tokens, abs=1e-5)


def test_bad_configs_are_refused(tiny_gqa):
    model, _ = tiny_gqa.mlx
    with pytest.raises(ListenError):
        Steerer(model, SteerConfig(layers=[7]))
    with pytest.raises(ListenError):
        Steerer(model, SteerConfig(layers=[0], at="everywhere"))
    with pytest.raises(ListenError):
        Steerer(model, SteerConfig())
    with pytest.raises(ListenError, match="before the deepest read layer"):
        Steerer(model, SteerConfig(layers=[1], apply_layer=0))
    with pytest.raises(ListenError, match="does not exist"):
        Steerer(model, SteerConfig(layers=[0], apply_layer=5))


def test_steering_in_reference_bundle(tiny_gqa, tmp_path):
    """The reference run records the PyTorch steering; `parity` recomputes and checks it."""
    from mlx_listen.parity import parity
    from mlx_listen_convert.reference.run import make_bundle, read_items

    sf.write(tmp_path / "a.wav", tone(2.2), SR)
    (tmp_path / "items.json").write_text(json.dumps([{"audio": "a.wav", "question": Q}]))
    path = make_bundle(str(tiny_gqa.hf_path), read_items(tmp_path / "items.json", None), tmp_path / "b",
                       max_new_tokens=12, progress=False, heads=[(0, 1), (1, 2)],
                       steering={"layers": [0, 1], "alpha": 2.0, "at": "all"})
    report = parity(path, tiny_gqa.mlx_path, progress=False)
    assert report.ok, report.table()
    got = {r.quantity: r for r in report.rows}
    assert got["steered_logits_last"].max_abs < 1e-4 and got["steer_direction"].max_abs < 1e-4
    assert got["steered_greedy_tokens"].note == "identical"


def _split_rows(run):
    from mlx_listen.records import read_predictions

    return {r["id"] for r in read_predictions(run)}


def test_eval_compare_and_sweep_keep_splits_disjoint(tiny_gqa, tmp_path):
    from click.testing import CliRunner

    from mlx_listen.cli import main
    from mlx_listen.eval.demo_set import make_demo_set

    demo = make_demo_set(tmp_path / "demo", n_per_kind=2)
    heads = tmp_path / "H.json"
    heads.write_text(json.dumps({"heads": [[0, 1], [1, 3]], "k": 2}))
    common = ["--data", str(demo), "--audio-dir", str(demo.parent), "--model", str(tiny_gqa.mlx_path), "-m", "3"]
    r = CliRunner().invoke(main, ["eval", *common, "--out", str(tmp_path / "run"), "--steer", str(heads),
                                  "--alpha", "2", "--compare"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "predictions.jsonl").exists() and (tmp_path / "run" / "steered" / "summary.json").exists()
    assert _split_rows(tmp_path / "run") == _split_rows(tmp_path / "run" / "steered")
    assert "McNemar" in r.output and "wrong->right" in r.output
    summary = json.loads((tmp_path / "run" / "steered" / "summary.json").read_text())
    assert summary["settings"]["steering"]["alpha"] == 2.0 and summary["settings"]["heads_sha256"]

    r = CliRunner().invoke(main, ["steer", "sweep", "--heads", str(heads), *common, "--out", str(tmp_path / "sw"),
                                  "--alphas", "0,1", "--seed", "3"])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    calib, test = set(res["splits"]["calibration"]), set(res["splits"]["test"])
    assert calib and test and not calib & test and len(calib | test) == 14
    assert _split_rows(tmp_path / "sw" / "calibration") == calib
    assert _split_rows(tmp_path / "sw" / "test") == test
    assert (tmp_path / "sw" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from mlx_listen.eval.mmau import load_items
    from mlx_listen.method.sweep import split_ids

    assert split_ids(load_items(demo), 0.5, 3) == (res["splits"]["calibration"], res["splits"]["test"])


def test_sweep_with_logprob_scoring_gives_a_graded_margin_curve(tiny_gqa, tmp_path):
    """--score both: per α (and per random control) the paired change of the correct option's
    margin against α = 0, from the rows the runs wrote; α = 0 is exactly no change."""
    from click.testing import CliRunner

    from mlx_listen.cli import main
    from mlx_listen.eval.demo_set import make_demo_set
    from mlx_listen.records import read_predictions
    from mlx_listen.stats import paired_mean_diff

    demo = make_demo_set(tmp_path / "demo", n_per_kind=2)
    heads = tmp_path / "H.json"
    heads.write_text(json.dumps({"heads": [[0, 1], [1, 3]], "k": 2}))
    out = tmp_path / "sw"
    r = CliRunner().invoke(main, ["steer", "sweep", "--heads", str(heads), "--data", str(demo), "--audio-dir",
                                  str(demo.parent), "--model", str(tiny_gqa.mlx_path), "-m", "3", "--out", str(out),
                                  "--alphas", "0,4", "--score", "both"])
    assert r.exit_code == 0, r.output
    assert "margin of the correct option" in r.output
    res = json.loads((out / "sweep.json").read_text())
    shift = res["calibration"]["margin_shift"]
    zero = shift["heads"]["0"]
    assert zero["difference"] == 0.0 and zero["n"] == len(res["splits"]["calibration"])
    base = {r["id"]: r["margin"] for r in read_predictions(out / "calibration")}
    for got, folder in ((shift["heads"]["4"], "alpha=4"), (shift["random"][0]["4"], "alpha=4-random0")):
        treat = {r["id"]: r["margin"] for r in read_predictions(out / "calibration" / folder)}
        ids = sorted(base)
        want = paired_mean_diff([base[i] for i in ids], [treat[i] for i in ids])
        assert got == pytest.approx(want) and got["difference"] != 0.0  # α = 4 moves the margins
    assert res["test"]["margin_shift"]["n"] == len(res["splits"]["test"])
    assert (out / "sweep_margin.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
