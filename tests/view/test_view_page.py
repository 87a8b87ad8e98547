"""The viewer (`mlx_listen.view`): the record is the library's own numbers, the page is
self-contained and safe to embed any text in, and it renders in a real browser (headless
Chromium) with every panel and no script error."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf
from support import SR, tone

from mlx_listen.headset import HeadSet
from mlx_listen.hooks import AUDIO_MASS, PATTERN, run_with_cache
from mlx_listen.interp.scoring import option_logprobs
from mlx_listen.prompt import prepare
from mlx_listen.view import render, write
from mlx_listen.view.record import attention_rows, build

Q = "What is making this sound?"
CHOICES = ["a dog", "a cat", "rain"]
HEADS = HeadSet([(0, 1), (1, 2)])
PANELS = ("clip", "answer", "attention", "mass", "compare")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("view") / "clip.wav"
    sf.write(path, tone(3.0), SR)
    return path


@pytest.fixture(scope="module")
def record(tiny_gqa, clip):
    return build(tiny_gqa.mlx, clip, Q, heads=HEADS, choices=CHOICES, max_tokens=8)


def test_record_holds_the_library_numbers(tiny_gqa, clip, record):
    """Every number of the record is the one the library's tested paths give for the same prompt."""
    from mlx_listen.asking import ask

    model, processor = tiny_gqa.mlx
    prompt = prepare(model, processor, [clip], Q)
    ans = ask(model, processor, [clip], Q, heads=HEADS, max_tokens=8)
    got = record["answers"]["audio"]
    assert [t["id"] for t in got["tokens"]] == ans.tokens and got["text"] == ans.text
    assert [t["listening"] for t in got["tokens"]] == pytest.approx(ans.listening_tokens, abs=1e-6)
    assert record["listening"]["at_T"] == pytest.approx(ans.listening, abs=1e-6)
    _, cap = run_with_cache(model, prompt, AUDIO_MASS.format("*"))
    assert np.abs(np.array(record["audio_mass"]["data"]) - cap.audio_mass(prompt.last)).max() < 1e-6
    lp = option_logprobs(model, processor, prompt, CHOICES, "r1-aqa")[0]
    assert got["option_logprobs"] == pytest.approx(lp.tolist(), abs=1e-5)
    assert set(record["answers"]) == {"audio", "silence", "steered", "ablated"}
    assert all(len(a["option_logprobs"]) == len(CHOICES) for a in record["answers"].values())
    # where each answer token looked: the mean of the heads' attention rows onto the audio positions
    rows = np.array(record["attention"]["data"])
    assert rows.shape == (len(ans.tokens), prompt.n_audio_tokens)
    assert (rows >= 0).all() and (rows.sum(1) <= 1 + 1e-6).all()
    _, cap = run_with_cache(model, prompt, [PATTERN.format(0), PATTERN.format(1)])  # row T only
    at_T = np.mean([np.array(cap.get(PATTERN.format(l))[0, 0, h])[prompt.audio_positions] for l, h in HEADS.heads], 0)
    assert np.abs(rows[0] - at_T).max() < 1e-6
    assert np.allclose(attention_rows(model, prompt, ans.tokens, HEADS.heads), rows, atol=1e-6)
    clip_rec = record["clip"]
    assert clip_rec["audio_tokens"] == prompt.n_audio_tokens and clip_rec["mel"]["frames"] == prompt.clips[0].n_frames
    assert max(map(abs, clip_rec["waveform"]["max"] + clip_rec["waveform"]["min"])) == pytest.approx(1.0)


def test_page_is_self_contained_and_embeds_any_text(tmp_path):
    hostile = {"title": "</script><script>alert(1)</script>", "question": "<b>x</b> </script>",
               "provenance": {"model": "m"}}
    page = render(hostile)
    assert page.count("</script>") == 2  # the two script elements of the page, none from the record
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page), "the page loads nothing from a network"
    data = page.split("window.RECORD = ", 1)[1].split(";</script>", 1)[0]
    assert json.loads(data.replace("<\\/", "</")) == hostile
    out = write(hostile, tmp_path / "v.html")
    assert out.read_text(encoding="utf-8") == page


def _chromium(*args, timeout=90):
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("MLX_LISTEN_REQUIRE_BROWSER"):
            pytest.fail("chromium is required here (MLX_LISTEN_REQUIRE_BROWSER) but not installed")
        pytest.skip("headless Chromium is not installed (CI installs Debian's chromium)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--enable-logging=stderr", "--v=0"]
    return subprocess.run([exe, *flags, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_page_renders_in_chromium(record, tmp_path):
    """A person's view: the page in headless Chromium has every panel drawn, no script error, and a
    screenshot that is not blank."""
    page = write(record, tmp_path / "view.html")
    profile = tmp_path / "profile"
    dom = _chromium(f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-rendered="yes"' in dom.stdout, "the script did not finish"
    for panel in PANELS:
        assert f'id="{panel}"' in dom.stdout, f"panel {panel} missing"
    assert dom.stdout.count('class="tok"') == len(record["answers"]["audio"]["tokens"])
    errors = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not errors, errors
    shot = tmp_path / "view.png"
    r = _chromium(f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1000,1700", page.as_uri())
    assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]
    from matplotlib.image import imread

    pixels = imread(shot)[..., :3]
    assert pixels.std() > 0.05, "the screenshot is blank"


@pytest.mark.slow
def test_a_broken_page_is_caught_by_the_browser_check(tmp_path):
    """The console check can fail: a record the script cannot draw raises in the browser."""
    page = write({"title": "x", "clip": {"name": "c"}}, tmp_path / "broken.html")
    dom = _chromium(f"--user-data-dir={tmp_path / 'p'}", "--virtual-time-budget=3000", "--dump-dom", page.as_uri())
    assert 'data-rendered="yes"' not in dom.stdout
    assert any("Uncaught" in line for line in dom.stderr.splitlines()), dom.stderr[-1500:]


def test_view_command(M, clip, tmp_path):
    from support import invoke, ok

    heads = tmp_path / "H.json"
    HEADS.save(heads)
    out = tmp_path / "v.html"
    r = ok(invoke("view", clip, Q, "--model", M, "--out", out, "--heads", heads, "--choice", "dog", "--choice", "cat",
                  "-m", 4))
    assert out.exists() and "window.RECORD" in out.read_text() and str(out) in r.stderr
    bad = invoke("view", clip, Q, "--model", M, "--out", tmp_path / "v.txt")
    assert bad.exit_code == 2 and ".html" in bad.output
    one = invoke("view", clip, Q, "--model", M, "--out", out, "--choice", "dog")
    assert one.exit_code == 2 and "two --choice" in one.output


def test_views_of_an_eval_run(M, demo_set, tmp_path):
    """An eval folder gets views/index.html linking one page per item; a rerun keeps the pages."""
    from support import invoke, ok

    run = tmp_path / "run"
    ok(invoke("eval", "--data", demo_set, "--audio-dir", demo_set.parent, "--model", M, "--out", run,
              "--limit", 3, "-m", 4))
    heads = tmp_path / "H.json"
    HEADS.save(heads)
    r = ok(invoke("view", "--run", run, "--audio-dir", demo_set.parent, "--heads", heads, "--limit", 2, "-m", 3))
    index = run / "views" / "index.html"
    assert str(index) in r.stderr
    text = index.read_text()
    pages = sorted((run / "views").glob("*.html"))
    assert len(pages) == 3 and text.count("<tr>") == 1 + 2  # header + the first two items
    for p in pages:
        if p.name != "index.html":
            assert f'href="{p.name}"' in text and "window.RECORD" in p.read_text()
    before = {p: p.stat().st_mtime_ns for p in pages if p.name != "index.html"}
    ok(invoke("view", "--run", run, "--audio-dir", demo_set.parent, "--heads", heads, "--limit", 2))
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # kept, not recomputed
    bad = invoke("view", "--run", run)
    assert bad.exit_code == 2 and "--audio-dir" in bad.output
    nothing = invoke("view", "--run", tmp_path, "--audio-dir", demo_set.parent)
    assert nothing.exit_code == 1 and "neither an eval run" in nothing.output
