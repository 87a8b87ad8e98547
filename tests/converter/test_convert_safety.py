"""Conversion never destroys anything (`mlx_listen_convert.convert`, the API and `mlx-listen
convert`): `--force` only onto a model folder, never onto the source or a file; an interruption
(an exception, SIGTERM, SIGKILL) leaves nothing that a rerun does not remove; a failed final swap
keeps the old folder; permissions follow the umask; signal handlers are restored."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest
from support import invoke, ok
from support.checkpoints import CONVERT, assert_same_tensors, hf_copy, listing, tensors
from support.cli import user_error

from mlx_listen.errors import ModelError
from mlx_listen_convert.convert import convert


def test_refuses_existing_output_without_force(tiny_gqa, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ModelError, match="--force"):
        convert(str(tiny_gqa.hf_path), str(out), progress=False)
    assert listing(out) == {"keep.txt": b"mine"}
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


@pytest.mark.slow
def test_sigterm_removes_the_partial_folder(tiny_gqa, tmp_path):
    parent = tmp_path / "parent"
    child, shard = stalled_child(tiny_gqa, parent / "out", tmp_path)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 128 + signal.SIGTERM, err  # exits as a shell reports a SIGTERM death
    assert "Traceback" not in err
    assert list(parent.iterdir()) == []


@pytest.mark.slow
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


# -- the same through `mlx-listen convert` ----------------------------------------------------------
STALLING_CLI = r"""
import sys, time
from pathlib import Path
import mlx.core as mx
real = mx.save_safetensors
def stall(path, *a, **kw):
    real(path, *a, **kw)
    Path(sys.argv[3]).write_text(str(path))
    time.sleep(120)
mx.save_safetensors = stall
from mlx_listen.cli import main
main(["convert", "--hf-path", sys.argv[1], "--mlx-path", sys.argv[2]])
"""


def _stalled_convert(hf: Path, out: Path, ready: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    child = subprocess.Popen([sys.executable, "-c", STALLING_CLI, str(hf), str(out), str(ready)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not ready.exists():
        if child.poll() is not None:
            pytest.fail(f"convert exited ({child.returncode}) before writing a shard: {child.stderr.read()}")
        assert time.monotonic() < deadline, "convert never wrote a shard"
        time.sleep(0.05)
    return child


@pytest.mark.slow
def test_command_killed_then_terminated_leaves_nothing_a_rerun_cannot_clean(tiny_gqa, tmp_path):
    parent = tmp_path / "parent"
    out = parent / "out"
    killed = _stalled_convert(tiny_gqa.hf_path, out, tmp_path / "ready1")
    killed.kill()
    killed.communicate(timeout=60)
    left = [p.name for p in parent.iterdir()]
    assert not (out.exists()), "a SIGKILLed conversion published its output"

    termed = _stalled_convert(tiny_gqa.hf_path, out, tmp_path / "ready2")  # the rerun
    termed.send_signal(signal.SIGTERM)
    _, err = termed.communicate(timeout=60)
    assert "Traceback" not in err, err
    assert termed.returncode != 0
    assert list(parent.iterdir()) == [], f"after SIGKILL {left}, after the SIGTERMed rerun {list(parent.iterdir())}"

    ok(invoke("convert", "--hf-path", tiny_gqa.hf_path, "--mlx-path", out))
    assert [p.name for p in parent.iterdir()] == ["out"]


@pytest.mark.parametrize("force", [[], ["--force"]], ids=["plain", "force"])
def test_command_refuses_an_existing_file_as_output(tiny_gqa, tmp_path, force):
    target = tmp_path / "notes.txt"
    target.write_text("keep me\n")
    user_error(invoke("convert", "--hf-path", tiny_gqa.hf_path, "--mlx-path", target, *force), str(target))
    assert target.read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("where", ["same", "same-relative", "symlink", "inside", "around"])
def test_command_force_never_destroys_the_source(tiny_gqa, tmp_path, monkeypatch, where):
    src = tmp_path / "src" / "X"
    shutil.copytree(tiny_gqa.hf_path, src)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    monkeypatch.chdir(tmp_path)
    if where == "symlink":
        (tmp_path / "link").symlink_to(src)
    target = {"same": src, "same-relative": Path("src/X/"), "symlink": tmp_path / "link", "inside": src / "mlx",
              "around": src.parent}[where]
    res = invoke("convert", "--hf-path", src, "--mlx-path", target, "--force")
    user_error(res)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_command_output_folder_follows_the_umask(tiny_gqa, tmp_path):
    umask = os.umask(0o022)
    try:
        out = tmp_path / "out"
        ok(invoke("convert", "--hf-path", tiny_gqa.hf_path, "--mlx-path", out))
    finally:
        os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o755, oct(out.stat().st_mode)
    assert (out / "config.json").stat().st_mode & 0o777 == 0o644
