"""The listening score while answering (`mlx_listen.asking`): `ask(heads=...)`, `ask --listen` and the
`attention` command agree, and with steering the score is the clip's, not the silence pass's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
from support import invoke, ok, tone
from support.cli import MAXT, Q, last_json
from support.heads import MAX_TOKENS, QUESTION, K, assert_png, one_line_error, strict_json

from mlx_listen.eval.conditions import Answerer, baseline, steered
from mlx_listen.hooks import run_with_cache
from mlx_listen.interp.steering import Silence, SteerConfig
from mlx_listen.prompt import prepare

STEER_Q = "Describe the audio."


def test_listening_of_a_steered_answer_is_the_clips(tiny_gqa):
    """`ask --listen --steer`: the listening score is the clip's, not the silence pass's."""
    from mlx_listen.asking import ask
    from mlx_listen.headset import HeadSet

    model, processor = tiny_gqa.mlx
    clip = tone(2.0)
    prompt = prepare(model, processor, [clip], STEER_Q)
    hs = HeadSet([(0, 1), (1, 3)])
    true = hs.listening(run_with_cache(model, prompt, "decoder.blocks.*.attn.hook_audio_mass")[1].audio_mass(prompt.last))
    silent = Silence(model).prompt(prompt)
    sil = hs.listening(run_with_cache(model, silent, "decoder.blocks.*.attn.hook_audio_mass")[1].audio_mass(prompt.last))
    assert abs(true - sil) > 1e-4, "silence and audio give the same score: a weak fixture"
    for alpha in (0.0, 2.0):
        ans = ask(model, processor, [clip], STEER_Q, heads=hs, steer=SteerConfig(layers=[0, 1], alpha=alpha), max_tokens=6)
        assert ans.listening == pytest.approx(true, abs=1e-6)
        assert len(ans.listening_tokens) == len(ans.tokens)
    batch = Answerer(model, processor, [baseline(), steered(SteerConfig(layers=[0, 1], alpha=2.0))], max_tokens=6,
                     listen_heads=hs.heads)(prompt)
    assert batch["steered"].listening == pytest.approx(true, abs=1e-6)
    assert batch["steered"].listening_tokens == pytest.approx(ans.listening_tokens, abs=1e-5)


@pytest.mark.parametrize("alpha", ["0", "1"])
def test_ask_listen_with_steer_reports_the_clips_score(M, files, tmp_path, alpha):
    H = files["H"]
    ok(invoke("attention", files["a"], Q, "--model", M, "--json", tmp_path / "a.json", "--heads", H))
    want = json.loads((tmp_path / "a.json").read_text())["listening"]
    ok(invoke("attention", files["silence"], Q, "--model", M, "--json", tmp_path / "s.json", "--heads", H))
    silence = json.loads((tmp_path / "s.json").read_text())["listening"]
    assert abs(silence - want) > 1e-4, "the clip and its silence score alike: the test could not tell them apart"
    plain = last_json(ok(invoke("ask", files["a"], Q, "--model", M, "-m", MAXT, "--heads", H, "--json")).stdout)
    assert plain["listening"] == pytest.approx(want, abs=1e-6)

    res = ok(invoke("ask", files["a"], Q, "--model", M, "-m", MAXT, "--listen", "--steer", H, "--alpha", alpha,
                    "--json"))
    got = last_json(res.stdout)["listening"]
    assert got == pytest.approx(want, abs=1e-6), f"steered listening {got} (clip {want}, silence {silence})"
    assert f"Listening: {want:.4f}" in res.stderr


def test_attention_json_and_png(demo, tiny_gqa, heads_run, tmp_path, shape):
    from mlx_listen.hooks import AUDIO_MASS, run_with_cache
    from mlx_listen.prompt import prepare

    clip = demo[0] / demo[2][0]["audio_id"]
    out, png = tmp_path / "sub" / "att.json", tmp_path / "att.png"
    res = ok(invoke("attention", clip, QUESTION, "--model", tiny_gqa.mlx_path, "--json", out,
                    "--heads", heads_run[0], "--png", png))
    att = strict_json(out)
    assert set(att) == {"layers", "heads", "audio_mass", "listening", "audio_tokens"}
    assert (att["layers"], att["heads"]) == shape
    mass = np.array(att["audio_mass"])
    assert mass.shape == shape and ((mass > 0) & (mass < 1)).all()
    heads = json.loads(heads_run[0].read_text())["heads"]
    assert att["listening"] == pytest.approx(np.mean([mass[l, h] for l, h in heads]), abs=1e-6)
    assert f"listening score {att['listening']:.4f}" in res.stderr
    assert_png(png)

    model, processor = tiny_gqa.mlx
    prompt = prepare(model, processor, [clip], QUESTION)
    _, cap = run_with_cache(model, prompt, AUDIO_MASS.format("*"))
    assert att["audio_tokens"] == prompt.n_audio_tokens > 0
    assert np.abs(mass - cap.audio_mass(len(prompt.ids) - 1)).max() < 1e-6

    ok(invoke("attention", clip, QUESTION, "--model", tiny_gqa.mlx_path, "--json", tmp_path / "plain.json"))
    plain = strict_json(tmp_path / "plain.json")
    assert plain["listening"] is None and plain["audio_mass"] == att["audio_mass"]


def test_attention_refuses_heads_outside_the_model(tiny_gqa, tmp_path, shape):

    clip = tmp_path / "a.wav"
    sf.write(clip, tone(1.0), 16000)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"heads": [[0, 0], [shape[0], 0]]}))
    err = one_line_error(invoke("attention", clip, QUESTION, "--model", tiny_gqa.mlx_path,
                                "--json", tmp_path / "o.json", "--heads", bad))
    assert "do not exist in this model" in err and not (tmp_path / "o.json").exists()
    err = one_line_error(invoke("ask", clip, QUESTION, "--model", tiny_gqa.mlx_path, "--listen", "--heads", bad))
    assert "do not exist in this model" in err


@pytest.mark.slow
def test_ask_listen_equals_the_attention_command(demo, tiny_gqa, heads_run, tmp_path):

    clips = [demo[0] / demo[2][5]["audio_id"], tmp_path / "tone.wav"]
    sf.write(clips[1], tone(2.3, 880.0, 5), 16000)
    for clip in clips:
        ok(invoke("attention", clip, QUESTION, "--model", tiny_gqa.mlx_path, "--json", tmp_path / "a.json",
                  "--heads", heads_run[0]))
        want = json.loads((tmp_path / "a.json").read_text())["listening"]
        res = ok(invoke("ask", clip, QUESTION, "--model", tiny_gqa.mlx_path, "-m", MAX_TOKENS, "--listen",
                        "--heads", heads_run[0], "--json"))
        got = json.loads(res.stdout.rstrip("\n").splitlines()[-1])
        assert got["listening"] == pytest.approx(want, abs=1e-6)
        assert 1 <= got["generation_tokens"] <= MAX_TOKENS
        assert f"Listening: {got['listening']:.4f} (mean audio attention of {K} heads" in res.stderr
        quiet = ok(invoke("ask", clip, QUESTION, "--model", tiny_gqa.mlx_path, "-m", MAX_TOKENS, "--listen",
                          "--heads", heads_run[0], "-q"))
        assert quiet.stdout.strip() == got["text"].strip() and f"Listening: {want:.4f}" in quiet.stderr

    res = invoke("ask", clips[1], QUESTION, "--model", tiny_gqa.mlx_path, "--listen")
    assert res.exit_code == 2 and "--listen needs --heads" in res.stderr
    plain = ok(invoke("ask", clips[1], QUESTION, "--model", tiny_gqa.mlx_path, "-m", MAX_TOKENS, "--json"))
    assert "listening" not in json.loads(plain.stdout.splitlines()[-1]) and "Listening" not in plain.stderr
