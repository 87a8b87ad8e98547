"""`mlx-listen convert` (Python API) and loading of every checkpoint layout, on tiny checkpoints.

Covers: the output folder (index, config, side files, model card, MLX conv layout), idempotent
re-conversion, dtype casts, overwrite/interrupt safety (--force only onto a model folder, never
onto the source; SIGTERM and SIGKILL leave nothing that a rerun does not remove; umask
permissions), one shard in memory at a time, sharding, language-only quantisation with a derived
logit-error bound and a refused indivisible group size, transformers-5 key names, hub-style
sharded inputs, and `ModelError`s for broken folders.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from support import tone

from mlx_listen.errors import ModelError
from mlx_listen.generate import generate
from mlx_listen.load import load
from mlx_listen.prompt import prepare
from mlx_listen_convert.convert import convert

CONVERT = importlib.import_module("mlx_listen_convert.convert")  # the module (for monkeypatching)
SIDE = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "processor_config.json",
        "generation_config.json"]


# -- helpers -------------------------------------------------------------------------------------
def tensors(folder: Path) -> dict[str, mx.array]:
    out = {}
    for f in sorted(Path(folder).glob("model*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def assert_same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert mx.array_equal(a[k], b[k]).item(), k


def last_logits(model, processor, clips=None, question="q") -> np.ndarray:
    clips = [tone(1.0)] if clips is None else clips
    p = prepare(model, processor, clips, question)
    return np.array(model(mx.array(p.ids)[None], input_embeddings=p.embeddings[None])[0, -1].astype(mx.float32))


def hf_copy(tiny, dst: Path, weights=True) -> Path:
    """A copy of the HF folder (optionally without its weight file) to break or re-shard."""
    ignore = None if weights else shutil.ignore_patterns("*.safetensors")
    shutil.copytree(tiny.hf_path, dst, ignore=ignore)
    return dst


def hub_name(key: str) -> str:
    """transformers-5 in-memory parameter name → the hub/save_pretrained name."""
    for live, hub in [("model.language_model.", "language_model.model."), ("model.", ""),
                      ("lm_head.", "language_model.lm_head.")]:
        if key.startswith(live):
            return hub + key[len(live):]
    return key


def listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


# -- the output folder ---------------------------------------------------------------------------
def test_output_folder(tiny):
    out = tiny.mlx_path  # written by conftest with `convert`
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model*.safetensors"))
    assert shards and set(index["weight_map"].values()) == {s.name for s in shards}
    weights = {}
    for s in shards:
        w, meta = mx.load(str(s), return_metadata=True)
        assert meta == {"format": "mlx"}
        assert all(index["weight_map"][k] == s.name for k in w), "index points a key at the wrong shard"
        weights.update(w)
    assert set(index["weight_map"]) == set(weights)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in weights.values())

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2_audio"
    assert "quantization" not in config
    for f in SIDE:
        assert (out / f).read_bytes() == (tiny.hf_path / f).read_bytes(), f
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: mlx" in card.split("---")[1]

    # Every tensor is HF's own, the convs transposed from torch (out, in, k) to MLX (out, k, in).
    hf = {hub_name(k): v.detach().numpy() for k, v in tiny.hf_model.state_dict().items()}
    assert set(hf) == set(weights)
    for name in ("audio_tower.conv1.weight", "audio_tower.conv2.weight"):
        torch_w = hf.pop(name)
        assert weights[name].shape == (torch_w.shape[0], torch_w.shape[2], torch_w.shape[1])
        np.testing.assert_array_equal(np.array(weights[name]), torch_w.transpose(0, 2, 1))
    for k, v in hf.items():
        np.testing.assert_array_equal(np.array(weights[k]), v, err_msg=k)


def test_reconverting_an_mlx_folder_is_the_identity(tiny, tmp_path):
    """The conv transpose only applies to torch-layout weights, so MLX → MLX changes nothing."""
    again = convert(str(tiny.mlx_path), str(tmp_path / "again"), progress=False)
    assert_same_tensors(tensors(again), tensors(tiny.mlx_path))
    assert json.loads((again / "config.json").read_text()) == json.loads((tiny.mlx_path / "config.json").read_text())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_cast(tiny_gqa, tmp_path, dtype):
    out = convert(str(tiny_gqa.hf_path), str(tmp_path / dtype), dtype=dtype, progress=False)
    w = tensors(out)
    floating = [v for v in w.values() if mx.issubdtype(v.dtype, mx.floating)]
    assert len(floating) == len(w) > 0
    assert {v.dtype for v in floating} == {getattr(mx, dtype)}
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == dtype and "torch_dtype" not in config
    model, processor = load(out)
    assert model.dtype == getattr(mx, dtype)
    assert np.isfinite(last_logits(model, processor)).all()


# -- overwrite and interruption ------------------------------------------------------------------
def test_refuses_existing_output_without_force(tiny_gqa, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ModelError, match="--force"):
        convert(str(tiny_gqa.hf_path), str(out), progress=False)
    assert listing(out) == {"keep.txt": b"mine"}
    # --force replaces a model folder only: this one has no config.json, so it is someone's data.
    with pytest.raises(ModelError, match="not a model folder") as e:
        convert(str(tiny_gqa.hf_path), str(out), force=True, progress=False)
    assert "\n" not in str(e.value) and str(out) in str(e.value)
    assert listing(out) == {"keep.txt": b"mine"}
    (out / "config.json").write_text("{}")
    convert(str(tiny_gqa.hf_path), str(out), force=True, progress=False)
    assert not (out / "keep.txt").exists()
    assert_same_tensors(tensors(out), tensors(tiny_gqa.mlx_path))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_force_replaces_an_empty_folder(tiny_gqa, tmp_path):
    (tmp_path / "out").mkdir()
    out = convert(str(tiny_gqa.hf_path), str(tmp_path / "out"), force=True, progress=False)
    assert_same_tensors(tensors(out), tensors(tiny_gqa.mlx_path))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("force", [False, True])
def test_refuses_a_file_as_output(tiny_gqa, tmp_path, force):
    out = tmp_path / "model.bin"
    out.write_bytes(b"precious")
    with pytest.raises(ModelError, match="not a folder") as e:
        convert(str(tiny_gqa.hf_path), str(out), force=force, progress=False)
    assert "\n" not in str(e.value)
    assert out.read_bytes() == b"precious" and [p.name for p in tmp_path.iterdir()] == ["model.bin"]


@pytest.mark.parametrize("where", ["same", "link", "inside", "containing"])
def test_refuses_to_write_over_the_source(tiny_gqa, tmp_path, where):
    """Even with --force: the output may not be the source, an alias of it, in it, or around it."""
    src = hf_copy(tiny_gqa, tmp_path / "src")
    before = listing(src)
    out = {"same": src, "link": tmp_path / "alias", "inside": src / "mlx", "containing": tmp_path}[where]
    if where == "link":
        out.symlink_to(src, target_is_directory=True)
    word = {"same": " is the source", "link": " is the source", "inside": "is inside", "containing": "contains"}
    with pytest.raises(ModelError, match=word[where]) as e:
        convert(str(src), str(out), force=True, progress=False)
    assert "\n" not in str(e.value)
    assert listing(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["src"] + (["alias"] if where == "link" else []))


def test_force_through_a_symlink_replaces_its_target(tiny_gqa, tmp_path):
    """`--mlx-path link --force`: the folder the link points at is replaced, the link stays."""
    real = tmp_path / "disk" / "model"
    real.mkdir(parents=True)
    (real / "config.json").write_text("{}")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    assert convert(str(tiny_gqa.hf_path), str(link), force=True, progress=False) == link
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert_same_tensors(tensors(real), tensors(tiny_gqa.mlx_path))
    assert [p.name for p in (tmp_path / "disk").iterdir()] == ["model"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_output_permissions_follow_the_umask(tiny_gqa, tmp_path, umask):
    """Like mkdir, not mkdtemp's 0700."""
    previous = os.umask(umask)
    try:
        out = convert(str(tiny_gqa.hf_path), str(tmp_path / "out"), progress=False)
    finally:
        os.umask(previous)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    written = ["config.json", "model.safetensors.index.json", "README.md", *(p.name for p in out.glob("model-*"))]
    for name in written:  # (copied side files keep their source's mode, like cp -p)
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError])
def test_interrupted_conversion_leaves_nothing(tiny_gqa, tmp_path, monkeypatch, existing, exc):
    """Fail while writing the second shard: no target, no `.NAME.*` temp dir; an old target survives."""
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "old.txt").write_text("old")
        (out / "config.json").write_text("{}")  # a model folder, which --force may replace
    monkeypatch.setattr(CONVERT, "MAX_SHARD_GB", 0)  # every tensor its own shard
    real, calls = mx.save_safetensors, []

    def flaky(path, *a, **kw):
        calls.append(path)
        if len(calls) == 2:
            raise exc("disk full" if exc is OSError else None)
        return real(path, *a, **kw)

    monkeypatch.setattr(mx, "save_safetensors", flaky)
    with pytest.raises(exc):
        convert(str(tiny_gqa.hf_path), str(out), force=existing, progress=False)
    assert len(calls) == 2 and Path(calls[0]).parent.name.startswith(".out.")  # it did fail mid-way
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == (["out"] if existing else [])
    if existing:
        assert listing(out) == {"config.json": b"{}", "old.txt": b"old"}


def test_failed_swap_keeps_the_old_folder(tiny_gqa, tmp_path, monkeypatch):
    """If the final rename fails, the folder that --force was replacing is put back."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    real = Path.rename

    def failing(self, target):
        if Path(target) == out.resolve():
            raise OSError("rename failed")
        return real(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(OSError, match="rename failed"):
        convert(str(tiny_gqa.hf_path), str(out), force=True, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and listing(out) == {"config.json": b"{}"}


# A child process that converts and stalls after writing its first shard, to be signalled there.
STALLING_CHILD = """
import sys, time
from pathlib import Path
import mlx.core as mx
real = mx.save_safetensors
def stall(path, *a, **kw):
    real(path, *a, **kw)
    Path(sys.argv[3]).write_text(path)
    time.sleep(120)
mx.save_safetensors = stall
from mlx_listen_convert.convert import convert
convert(sys.argv[1], sys.argv[2], progress=False)
"""


def stalled_child(tiny, out: Path, tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """Start the child and wait until its first shard is on disk; → (process, that shard)."""
    ready = tmp_path / "ready"
    child = subprocess.Popen([sys.executable, "-c", STALLING_CHILD, str(tiny.hf_path), str(out), str(ready)],
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ready.exists():
        if child.poll() is not None:
            pytest.fail(f"the child exited with {child.returncode}: {child.stderr.read()}")
        assert time.monotonic() < deadline, "the child never wrote a shard"
        time.sleep(0.05)
    shard = Path(ready.read_text())
    assert shard.exists() and shard.parent.name.startswith(f".{out.name}.")
    return child, shard


def test_sigterm_removes_the_partial_folder(tiny_gqa, tmp_path):
    parent = tmp_path / "parent"
    child, shard = stalled_child(tiny_gqa, parent / "out", tmp_path)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 128 + signal.SIGTERM, err  # exits as a shell reports a SIGTERM death
    assert "Traceback" not in err
    assert list(parent.iterdir()) == []


def test_the_next_run_removes_what_a_sigkill_left(tiny_gqa, tmp_path):
    parent = tmp_path / "parent"
    child, shard = stalled_child(tiny_gqa, parent / "out", tmp_path)
    child.kill()
    child.communicate(timeout=60)
    partial = shard.parent
    assert [p.name for p in parent.iterdir()] == [partial.name]  # SIGKILL cannot be cleaned up after
    assert json.loads((partial / CONVERT.MARKER).read_text())["pid"] == child.pid
    convert(str(tiny_gqa.hf_path), str(parent / "other"), progress=False)
    assert [p.name for p in parent.iterdir()] == ["other"]


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_cleanup_removes_only_what_is_provably_ours(tiny_gqa, tmp_path, capsys):
    def partial(name, pid, host=socket.gethostname(), marker=True):
        d = tmp_path / name
        d.mkdir()
        (d / "model-00001-of-00002.safetensors").write_bytes(b"partial")
        if marker:
            (d / CONVERT.MARKER).write_text(json.dumps({"pid": pid, "host": host}))
        return d

    dead = dead_pid()
    partial(".out.dead", dead)  # ours, owner gone: removed
    kept = [
        partial(".out.alive", os.getppid()),  # its owner still runs (maybe converting right now)
        partial(".out.unmarked", dead, marker=False),  # not provably ours
        partial(".out.elsewhere", dead, host="another-host"),  # a pid on another machine says nothing
        partial("visible", dead),  # we only ever create hidden folders
    ]
    (tmp_path / ".out.garbled").mkdir()
    (tmp_path / ".out.garbled" / CONVERT.MARKER).write_text("not json")
    kept.append(tmp_path / ".out.garbled")
    convert(str(tiny_gqa.hf_path), str(tmp_path / "out"), progress=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out"] + [p.name for p in kept])
    err = capsys.readouterr().err
    assert f".out.dead, left by an interrupted conversion (pid {dead})" in err


def test_signal_handlers_are_restored(tiny_gqa, tmp_path):
    def mine(signum, frame):
        pass

    before = signal.getsignal(signal.SIGTERM)
    convert(str(tiny_gqa.hf_path), str(tmp_path / "a"), progress=False)
    assert signal.getsignal(signal.SIGTERM) == before
    previous = signal.signal(signal.SIGTERM, mine)  # an application's own handler is left alone
    try:
        convert(str(tiny_gqa.hf_path), str(tmp_path / "b"), progress=False)
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- memory --------------------------------------------------------------------------------------
@pytest.mark.parametrize("per_shard", [1, 4])
@pytest.mark.parametrize("options", [{}, {"dtype": "float16"}, {"quantize": True, "q_group_size": 64}])
def test_one_shard_in_memory_at_a_time(tiny_gqa, tmp_path, monkeypatch, options, per_shard):
    """With many small shards, MLX holds one shard when it writes one, not all before it.

    (The old converter held the model, the flat weights and every written shard: at the last
    write its active memory was ~the whole model.) Peak = a shard plus one source tensor, also
    when several tensors per shard are computed ahead of the one being waited for.
    """
    import mlx_lm.utils

    def chunks(weights, max_file_size_gb):
        items = list(weights.items())
        return [dict(items[i:i + per_shard]) for i in range(0, len(items), per_shard)]

    monkeypatch.setattr(mlx_lm.utils, "make_shards", chunks)
    real, at_write, sizes = mx.save_safetensors, [], []

    def record(path, arrays, *a, **kw):
        at_write.append(mx.get_active_memory())
        sizes.append(sum(v.nbytes for v in arrays.values()))
        return real(path, arrays, *a, **kw)

    monkeypatch.setattr(mx, "save_safetensors", record)
    source = max(v.nbytes for v in mx.load(str(tiny_gqa.hf_path / "model.safetensors")).values())
    mx.eval(mx.zeros(1))
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    convert(str(tiny_gqa.hf_path), str(tmp_path / "out"), progress=False, **options)
    peak = mx.get_peak_memory() - base
    assert len(sizes) > 50 / per_shard and max(sizes) < 0.6 * sum(sizes)  # (the old one held ~all)
    assert max(a - base for a in at_write) <= max(sizes) + 4096, (at_write, sizes)
    assert peak <= max(sizes) + source + 4096, (peak, max(sizes), source)
    assert mx.get_active_memory() - base <= 4096  # nothing kept after the conversion


def test_many_shards(tiny_gqa, tmp_path, monkeypatch):
    monkeypatch.setattr(CONVERT, "MAX_SHARD_GB", 0)
    out = convert(str(tiny_gqa.hf_path), str(tmp_path / "sharded"), progress=False)
    shards = sorted(out.glob("model-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) == len(index["weight_map"]) > 50
    assert shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    for s in shards:
        assert all(index["weight_map"][k] == s.name for k in mx.load(str(s)))
    assert_same_tensors(tensors(out), tensors(tiny_gqa.mlx_path))
    model, processor = load(out)
    ref_model, ref_processor = tiny_gqa.mlx
    np.testing.assert_array_equal(last_logits(model, processor), last_logits(ref_model, ref_processor))


# -- quantisation --------------------------------------------------------------------------------
GROUP = 64  # the tiny model's hidden (64) and intermediate (128) sizes are multiples of it


@pytest.fixture(scope="module")
def quantised(tiny_gqa, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantised")
    return {bits: convert(str(tiny_gqa.hf_path), str(root / f"q{bits}"), quantize=True, q_bits=bits,
                          q_group_size=GROUP, progress=False) for bits in (4, 8)}


def quantisable(model, group: int) -> dict[str, bool]:
    """Every Linear/Embedding of the fp32 model → whether the converter must quantise it."""
    out = {}
    for path, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            out[path] = path.startswith("language_model.") and m.weight.shape[-1] % group == 0
    return out


@pytest.mark.parametrize("bits", [4, 8])
def test_quantised_folder(tiny_gqa, quantised, bits):
    out = quantised[bits]
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": GROUP, "bits": bits, "mode": "affine"}
    assert config["quantization_config"] == config["quantization"]
    w = tensors(out)
    expected = quantisable(tiny_gqa.mlx[0], GROUP)
    assert sum(expected.values()) == 16  # embedding, 7 per layer × 2, lm_head: all of the decoder
    for path, q in expected.items():
        assert (f"{path}.scales" in w) == q, path
    assert not [k for k in w if k.endswith((".scales", ".biases")) and not k.startswith("language_model.")]
    assert all(v.dtype == mx.float32 for k, v in w.items()
               if k.startswith(("audio_tower.", "multi_modal_projector.")))
    assert f"{bits}-bit" in (out / "README.md").read_text()


def test_group_size_must_divide_every_width(tiny_gqa, tmp_path):
    """g = 128 divides only down_proj's input (128): refuse, rather than leave 14 of 16 layers in float."""
    with pytest.raises(ModelError) as e:
        convert(str(tiny_gqa.hf_path), str(tmp_path / "g128"), quantize=True, q_bits=4, q_group_size=128,
                progress=False)
    msg = str(e.value)
    bad = sorted(p for p, q in quantisable(tiny_gqa.mlx[0], 128).items() if p.startswith("language_model.") and not q)
    assert len(bad) == 14 and "14 of the 16 layers" in msg and "\n" not in msg
    assert "language_model.model.embed_tokens has 64" in msg and "11 more" in msg
    assert msg.endswith("use --q-group-size 32 or 64")
    assert list(tmp_path.iterdir()) == []
    for g in (32, 64):  # what it suggests works, and quantises every decoder layer
        out = convert(str(tiny_gqa.hf_path), str(tmp_path / f"g{g}"), quantize=True, q_group_size=g, progress=False)
        assert sum(k.endswith(".scales") for k in tensors(out)) == 16


def test_bits_per_weight_on_stderr(tiny_gqa, tmp_path, capsys):
    convert(str(tiny_gqa.hf_path), str(tmp_path / "quiet"), quantize=True, progress=False)
    assert capsys.readouterr() == ("", "")
    out = convert(str(tiny_gqa.hf_path), str(tmp_path / "loud"), quantize=True, progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    m = re.search(r"^\[INFO\] Quantized model with (\d+\.\d{3}) bits per weight\.$", captured.err, re.M)
    assert m, captured.err
    w = tensors(out)  # bits per weight = stored bits / parameters (a quantised weight holds 32/bits per uint32)
    params = sum(v.size * (32 // 4 if v.dtype == mx.uint32 else 1) for k, v in w.items()
                 if not k.endswith((".scales", ".biases")))
    assert float(m.group(1)) == pytest.approx(8 * sum(v.nbytes for v in w.values()) / params, abs=1e-3)


def test_refuses_to_quantise_twice(quantised, tmp_path):
    with pytest.raises(ModelError, match="already quantised"):
        convert(str(quantised[4]), str(tmp_path / "again"), quantize=True, progress=False)
    assert list(tmp_path.iterdir()) == []


# Error model (first principles). Affine b-bit quantisation of a group of g weights uses the grid
# bias + s·{0..2^b-1}, s = (max - min)/(2^b - 1). Rounding to the nearest grid point errs by at
# most s/2; MLX also shifts the grid so that 0 is exact (s' = edge/round(edge/s), edge the
# larger-magnitude extreme, |edge| >= (max - min)/2), which moves the far end of the grid by at
# most (2^b - 1)·|s' - s| <= s/2 more, so |Δw| < s per weight. Rounding errors behave as
# independent uniform noise of variance s²/12. For y = W x with W's entries of RMS σ_W (the
# random init), E[Δy_j²] = ‖x‖²·s_rms²/12 and E[y_j²] = ‖x‖²·σ_W², so each quantised matrix adds a
# relative error ρ = s_rms / (√12·σ_W). For N(0, σ²) weights the expected range of 64 samples is
# ≈ 4.7σ, so ρ ≈ 4.7 / (√12·(2^b - 1)): ≈ 0.09 at 4 bits, ≈ 0.005 at 8 bits; we compute ρ from
# the fp32 weights' actual group ranges. The K quantised matrices on the way to the logits
# (embedding, 7 per decoder layer, lm_head) inject independent errors that add in quadrature, and
# RMSNorm keeps the residual stream's relative error from growing, so the relative RMS logit error
# is ≈ √K·ρ. The bound allows 2× that for the nonlinearities (softmax, SiLU gate) and the
# finite-sample scatter. 8-bit error should be ≈ (2^8-1)/(2^4-1) = 17× smaller than 4-bit;
# we require > 8×.
def predicted_rho(model, paths, bits, group=GROUP) -> float:
    """Mean per-matrix relative noise ρ from the fp32 weights' group ranges (see above)."""
    params = dict(tree_flatten(model.parameters()))
    rhos = []
    for p in paths:
        w = np.array(params[f"{p}.weight"], dtype=np.float64)
        g = w.reshape(w.shape[0], -1, group)
        s = (g.max(-1) - g.min(-1)) / (2**bits - 1)
        rhos.append(math.sqrt((s**2).mean() / 12) / math.sqrt((w**2).mean()))
    return float(np.mean(rhos))


def test_quantised_weights_stay_on_their_grid(tiny_gqa, quantised):
    """Dequantised stored weights are within s = (max - min)/(2^b - 1) of the fp32 weights."""
    fp32 = dict(tree_flatten(tiny_gqa.mlx[0].parameters()))
    for bits, out in quantised.items():
        w = tensors(out)
        paths = [k.removesuffix(".scales") for k in w if k.endswith(".scales")]
        for p in paths:
            deq = np.array(mx.dequantize(w[f"{p}.weight"], w[f"{p}.scales"], w[f"{p}.biases"],
                                         group_size=GROUP, bits=bits))
            ref = np.array(fp32[f"{p}.weight"])
            g = ref.reshape(ref.shape[0], -1, GROUP)
            s = (g.max(-1) - g.min(-1)) / (2**bits - 1)
            err = np.abs(deq - ref).reshape(g.shape)
            assert (err <= s[..., None] * (1 + 1e-5) + 1e-7).all(), f"{bits}-bit {p}"


def test_quantised_logits_error_is_bounded(tiny_gqa, quantised):
    model, processor = tiny_gqa.mlx
    ref = last_logits(model, processor)  # tone(1.0), "q": a prompt whose top-1 margin is clear
    errs, maxabs, first = {}, {}, {}
    for bits, out in quantised.items():
        qmodel, qproc = load(out)
        paths = [p for p, q in quantisable(model, GROUP).items() if q]
        rho = predicted_rho(model, paths, bits)
        bound = 2 * math.sqrt(len(paths)) * rho
        d = last_logits(qmodel, qproc) - ref
        errs[bits] = float(np.linalg.norm(d) / np.linalg.norm(ref))
        maxabs[bits] = float(np.abs(d).max())
        print(f"{bits}-bit: rel RMS logit error {errs[bits]:.4f} (rho {rho:.4f}, bound {bound:.4f}), "
              f"max abs {maxabs[bits]:.4f}")
        assert rho / 2 < errs[bits] <= bound, f"{bits}-bit relative logit error {errs[bits]:.4g}, bound {bound:.4g}"
        ans = generate(qmodel, qproc, prepare(qmodel, qproc, [tone(1.0)], "q"), max_tokens=6)
        assert len(ans.tokens) >= 1 and all(0 <= t < qmodel.config.text_config.vocab_size for t in ans.tokens)
        first[bits] = ans.tokens[0]
    assert errs[8] < errs[4] / 8
    # Greedy: if every logit moves by less than half the top-1 margin, the argmax cannot change.
    top2 = np.sort(ref)[-2:]
    assert top2[1] - top2[0] > 2 * maxabs[8], "fixture prompt's top-1 margin is too small for this check"
    fp32_first = generate(model, processor, prepare(model, processor, [tone(1.0)], "q"), max_tokens=1).tokens[0]
    assert first[8] == fp32_first == int(ref.argmax())


# -- input layouts -------------------------------------------------------------------------------
def test_transformers5_in_memory_key_names(tiny_gqa, tmp_path):
    """A checkpoint saved from a live transformers-5 model (`model.language_model.*`, `lm_head.*`)."""
    from safetensors.torch import save_file

    sd = tiny_gqa.hf_model.state_dict()
    assert any(k.startswith("model.language_model.") for k in sd) and "lm_head.weight" in sd
    folder = hf_copy(tiny_gqa, tmp_path / "live", weights=False)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    hub_model, hub_proc = load(tiny_gqa.hf_path)
    ref = last_logits(hub_model, hub_proc)
    np.testing.assert_array_equal(last_logits(*load(folder)), ref)
    out = convert(str(folder), str(tmp_path / "live-mlx"), progress=False)
    assert_same_tensors(tensors(out), tensors(tiny_gqa.mlx_path))
    np.testing.assert_array_equal(last_logits(*load(out)), ref)


def test_hub_style_sharded_checkpoint(tiny_gqa, tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = hf_copy(tiny_gqa, tmp_path / "sharded", weights=False)
    w = load_file(str(tiny_gqa.hf_path / "model.safetensors"))
    keys = sorted(w)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    index = {"metadata": {"total_size": sum(v.nbytes for v in w.values())}, "weight_map": {}}
    for i, part in enumerate(halves):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: w[k] for k in part}, str(folder / name), metadata={"format": "pt"})
        index["weight_map"].update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert not (folder / "model.safetensors").exists()
    hub_model, hub_proc = load(tiny_gqa.hf_path)
    np.testing.assert_array_equal(last_logits(*load(folder)), last_logits(hub_model, hub_proc))
    out = convert(str(folder), str(tmp_path / "sharded-mlx"), progress=False)
    assert_same_tensors(tensors(out), tensors(tiny_gqa.mlx_path))


# -- broken folders ------------------------------------------------------------------------------
def _edit_config(**changes):
    def fn(d: Path):
        c = json.loads((d / "config.json").read_text())
        c.update(changes)
        (d / "config.json").write_text(json.dumps(c))
    return fn


def _edit_weights(fn):
    def edit(d: Path):
        from safetensors.numpy import load_file, save_file

        w = load_file(str(d / "model.safetensors"))
        fn(w)
        save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})
    return edit


MISSING = "language_model.model.layers.1.mlp.up_proj.weight"
RESHAPED = "language_model.model.layers.0.self_attn.q_proj.weight"
BROKEN = {
    "no-config": (lambda d: (d / "config.json").unlink(), ["no config.json"]),
    "bad-json": (lambda d: (d / "config.json").write_text('{"model_type": "qwen2_audio",'), ["not valid JSON"]),
    "other-model": (_edit_config(model_type="llama"), ["'llama'", "qwen2_audio"]),
    "no-weights": (lambda d: (d / "model.safetensors").unlink(), ["no model*.safetensors"]),
    "missing-key": (_edit_weights(lambda w: w.pop(MISSING)), ["Missing", MISSING]),
    "wrong-shape": (_edit_weights(lambda w: w.update({RESHAPED: np.zeros((64, 32), np.float32)})),
                    [RESHAPED, "(64, 32)"]),
    "extra-key": (_edit_weights(lambda w: w.update({"audio_tower.extra.weight": np.zeros(3, np.float32)})),
                  ["audio_tower.extra.weight"]),
    "not-safetensors": (lambda d: (d / "model.safetensors").write_bytes(b"not a safetensors file"),
                        ["cannot read the weight files"]),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_folder_raises_model_error(tiny_gqa, tmp_path, case):
    breaker, words = BROKEN[case]
    folder = hf_copy(tiny_gqa, tmp_path / "bad")
    breaker(folder)
    with pytest.raises(ModelError) as e:
        load(folder)
    msg = str(e.value)
    assert "\n" not in msg and str(folder) in msg
    for word in words:
        assert word in msg, f"{case}: {word!r} not in {msg!r}"
    # convert fails the same way and writes nothing: no output, no temp folder.
    with pytest.raises(ModelError):
        convert(str(folder), str(tmp_path / "out"), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]
