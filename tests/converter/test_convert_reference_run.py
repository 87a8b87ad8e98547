"""`mlx-listen-reference` (`mlx_listen_convert.reference.run`) on bad inputs: one `Error:` line,
exit 1, checked before the model loads, and never a half-written bundle (written to a temporary
sibling and renamed at the end)."""

from __future__ import annotations

import json

import pytest
import soundfile as sf
from click.testing import CliRunner
from support import SR, tone
from support.cli import Q, user_error

from mlx_listen.bundle import load_bundle
from mlx_listen_convert.reference.run import main

pytestmark = pytest.mark.torch  # the reference side itself


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    """Items, clips and HEADS files, good and bad."""
    d = tmp_path_factory.mktemp("refrun")
    sf.write(d / "ok.wav", tone(0.6), SR)
    sf.write(d / "short.wav", tone(0.01), SR)  # 160 samples: no audio token
    (d / "junk.wav").write_text("not audio")
    (d / "adir").mkdir()
    files = {
        "ok.json": [{"audio": "ok.wav", "question": "What is this sound?"}],
        "short.json": [{"audio": "ok.wav", "question": "q?"}, {"audio": "short.wav", "question": "q?"}],
        "junk.json": [{"audio": "junk.wav", "question": "q?"}],
        "notlist.json": {"audio": "ok.wav", "question": "q?"},
        "empty.json": [],
        "strings.json": ["ok.wav"],
        "missing.json": [{"audio": "missing.wav", "question": "q?"}],
        "isdir.json": [{"audio": "adir", "question": "q?"}],
        "noquestion.json": [{"audio": "ok.wav"}],
        "H.json": {"heads": [[0, 1], [1, 3]]},
        "emptyheads.json": {"heads": []},
        "farheads.json": {"heads": [[5, 0]]},
        "listheads.json": [[0, 1]],
    }
    for name, data in files.items():
        (d / name).write_text(json.dumps(data))
    (d / "badheads.json").write_text('{"heads": [[0, 1]')
    (d / "notjson.json").write_text("[{")
    return d


@pytest.fixture(scope="module")
def q4(tiny_gqa, tmp_path_factory):
    from mlx_listen_convert.convert import convert

    return convert(str(tiny_gqa.hf_path), str(tmp_path_factory.mktemp("q") / "q4"), quantize=True, q_bits=4,
                   progress=False)


def reference(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error(result, match: str, code: int = 1):
    """Exit `code`, exactly one `Error:` line (naming `match`), no traceback."""
    assert result.exit_code == code, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and match in errors[0], result.output
    assert "Traceback" not in result.output
    if code == 1:  # a ListenError: nothing but that line
        assert [line for line in result.output.splitlines() if line.strip()] == errors, result.output
    return errors[0]


def nothing_left(out):
    assert not out.exists(), f"{out} was left behind"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], list(out.parent.iterdir())


def args(tiny_gqa, d, out, *extra, items="ok.json", model=None):
    return [*(["--model", model or tiny_gqa.hf_path]), "--items", d / items, "--out", out, "--device", "cpu",
            "--max-new-tokens", "0", *extra]


@pytest.mark.parametrize("items, match", [
    ("short.json", "clip too short (160 samples, 0.010 s)"),
    ("junk.json", "is not a readable audio file"),
    ("notlist.json", "expected a non-empty JSON list of items, got dict"),
    ("empty.json", "expected a non-empty JSON list of items, got list (empty)"),
    ("strings.json", "item 0 is a str, not an object"),
    ("missing.json", "missing.wav not found"),
    ("isdir.json", "adir is not a file"),
    ("noquestion.json", "item 0 has neither audio+question nor MMAU fields"),
    ("notjson.json", "cannot read items file"),
])
def test_bad_items(tiny_gqa, d, tmp_path, items, match):
    out = tmp_path / "b"
    one_error(reference(*args(tiny_gqa, d, out, items=items)), match)
    nothing_left(out)


@pytest.mark.parametrize("heads, match", [
    ("badheads.json", "is not a HEADS.json file"),
    ("listheads.json", "is not a HEADS.json file"),
    ("emptyheads.json", "selects no heads"),
    ("farheads.json", "heads [(5, 0)] do not exist in this model (2 layers x 4 heads)"),
])
def test_bad_heads(tiny_gqa, d, tmp_path, heads, match):
    out = tmp_path / "b"
    one_error(reference(*args(tiny_gqa, d, out, "--heads", d / heads)), match)
    nothing_left(out)


def test_steer_needs_heads(tiny_gqa, d, tmp_path):
    one_error(reference(*args(tiny_gqa, d, tmp_path / "b", "--steer")), "--steer needs --heads")


def test_bad_device(tiny_gqa, d, tmp_path):
    import torch

    out = tmp_path / "b"
    one_error(reference(*args(tiny_gqa, d, out, "--device", "gpu")), "--device gpu: not a torch device")
    if not torch.cuda.is_available():
        one_error(reference(*args(tiny_gqa, d, out, "--device", "cuda")), "--device cuda: CUDA is not available here")
    if not torch.backends.mps.is_available():
        one_error(reference(*args(tiny_gqa, d, out, "--device", "mps")), "--device mps: MPS is not available here")
    nothing_left(out)


def test_mlx_folder_is_not_a_transformers_checkpoint(tiny_gqa, q4, d, tmp_path):
    out = tmp_path / "b"
    err = one_error(reference(*args(tiny_gqa, d, out, model=q4)), "is an MLX model folder")
    assert '"quantization" block' in err and "pass the Hugging Face folder or repo id" in err
    err = one_error(reference(*args(tiny_gqa, d, out, model=tiny_gqa.mlx_path)), "is an MLX model folder")
    assert '{"format": "mlx"} metadata' in err
    # MLX conv layout alone (metadata stripped) is enough to tell
    folder = tmp_path / "mlx-no-meta"
    folder.mkdir()
    import mlx.core as mx

    for f in tiny_gqa.mlx_path.iterdir():
        if f.suffix == ".safetensors":
            mx.save_safetensors(str(folder / f.name), mx.load(str(f)))
        elif f.is_file():
            (folder / f.name).write_bytes(f.read_bytes())
    one_error(reference(*args(tiny_gqa, d, out, model=folder)), "conv weights are in MLX layout")
    nothing_left(out)


@pytest.mark.parametrize("model, match", [
    ("./nothere", "folder not found (and it is not a hub repo id"),
    ("Org/not-cached-anywhere", "could not get Org/not-cached-anywhere from the Hugging Face hub"),
])
def test_bad_model(tiny_gqa, d, tmp_path, model, match):
    out = tmp_path / "b"
    one_error(reference(*args(tiny_gqa, d, out, model=model)), match)
    nothing_left(out)


def test_model_folder_without_config(tiny_gqa, d, tmp_path):
    (tmp_path / "m").mkdir()
    one_error(reference(*args(tiny_gqa, d, tmp_path / "b", model=tmp_path / "m")), "has no config.json")


def test_bad_option_values_are_click_usage_errors(tiny_gqa, d, tmp_path):
    """Option types are click's (IntRange, Path, Choice): a usage error, exit 2, one `Error:` line."""
    out = tmp_path / "b"
    one_error(reference(*args(tiny_gqa, d, out, "--max-new-tokens", "-3")), "'--max-new-tokens': -3 is not in the range x>=0", 2)
    one_error(reference(*args(tiny_gqa, d, out, "--alpha", "nan")), "nan is not a finite number", 2)
    one_error(reference(*args(tiny_gqa, d, out, items="nothing.json")), "does not exist", 2)
    (tmp_path / "afile").write_text("x")
    one_error(reference(*args(tiny_gqa, d, tmp_path / "afile")), "is a file", 2)
    nothing_left(out)


def test_out_is_not_replaced_unless_a_bundle(tiny_gqa, d, tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    one_error(reference(*args(tiny_gqa, d, out)), "already exists; pass --force")
    one_error(reference(*args(tiny_gqa, d, out, "--force")), "is not a reference bundle")
    assert (out / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("case", ["short-clip", "cuda", "mlx-quantised", "mlx-plain"])
def test_bad_clips_devices_and_mlx_folders(tiny_gqa, files, q4, tmp_path, case):
    from mlx_listen_convert.reference.run import main

    items = tmp_path / "items.json"
    sf.write(tmp_path / "tiny.wav", tone(0.01), SR)
    clip = tmp_path / "tiny.wav" if case == "short-clip" else files["a"]
    items.write_text(json.dumps([{"audio": str(clip), "question": Q}]))
    model = {"mlx-quantised": q4, "mlx-plain": tiny_gqa.mlx_path}.get(case, tiny_gqa.hf_path)
    device = "cuda" if case == "cuda" else "cpu"
    out = tmp_path / "bundle"
    res = CliRunner().invoke(main, ["--model", str(model), "--items", str(items), "--out", str(out),
                                    "--device", device, "--max-new-tokens", "0"])
    word = {"short-clip": "too short", "cuda": "CUDA", "mlx-quantised": "MLX", "mlx-plain": "MLX"}[case]
    user_error(res, word)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_run_force_and_failure_leave_no_partial_bundle(tiny_gqa, d, tmp_path, monkeypatch):
    """A run writes a complete bundle; a failing rerun (even with --force) leaves the old one untouched and
    nothing else; --force replaces it once the new one is complete."""
    import mlx_listen_convert.reference.run as rr

    out = tmp_path / "b"
    r = reference(*args(tiny_gqa, d, out, "--heads", d / "H.json"))
    assert r.exit_code == 0, r.output
    first = load_bundle(out)
    assert first.manifest["heads"] == [[0, 1], [1, 3]] and len(first.items) == 1
    created = first.manifest["created"]

    real = rr.record

    seen = []

    def interrupted(*a, **kw):  # an interrupt mid-run: the model is loaded, the temporary bundle started
        seen.append([p.name for p in tmp_path.iterdir() if p.name.startswith(".") and (p / "audio").is_dir()])
        raise KeyboardInterrupt

    two = d / "two.json"
    two.write_text(json.dumps([{"audio": "ok.wav", "question": "A?"}, {"audio": "ok.wav", "question": "B?"}]))
    monkeypatch.setattr(rr, "record", interrupted)
    r = reference(*args(tiny_gqa, d, out, "--force", items="two.json"))
    assert r.exit_code == 1 and "Aborted" in r.output, r.output
    assert len(seen) == 1 and len(seen[0]) == 1 and seen[0][0].startswith(".b."), seen  # it was writing there
    assert len(load_bundle(out).items) == 1 and load_bundle(out).manifest["created"] == created
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temporary sibling left

    fresh = tmp_path / "fresh"
    assert reference(*args(tiny_gqa, d, fresh)).exit_code != 0
    nothing_left(fresh)
    monkeypatch.setattr(rr, "record", real)
    r = reference(*args(tiny_gqa, d, fresh))  # the rerun is not blocked
    assert r.exit_code == 0, r.output
    assert len(load_bundle(fresh).items) == 1

    r = reference(*args(tiny_gqa, d, out, "--force", items="two.json"))
    assert r.exit_code == 0, r.output
    assert len(load_bundle(out).items) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "fresh"]
