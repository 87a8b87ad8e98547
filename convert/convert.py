"""`mlx-listen convert`: an HF checkpoint of any family (Qwen2-Audio, Audio Flamingo 3, Qwen2.5-Omni)
→ an MLX folder (optionally quantised).

Needs no PyTorch: safetensors load straight into MLX (bf16 included). Quantisation is mlx-lm's, every
mode, bits and mixed recipe (`quantize.py`): the language model by default, the audio tower's linears
on request, the projector and convs never; bits per weight are printed per part. `dequantize` turns
a quantised MLX folder back into float. What the model does not use is left out and said
(Qwen2.5-Omni: the talker, token2wav and the vision tower; the thinker is kept).

Memory: the model is loaded lazily, cast and quantised lazily, and then written shard by shard
the way mlx-lm's `save_model(..., donate_model=True)` does it: the model and the flat weight
dict let go of their arrays before anything is computed, so each shard's arrays are read (and
cast or quantised) only when that shard is written, and are freed once it is on disk. Peak memory
is about one shard (at most `MAX_SHARD_GB`) plus what one tensor's conversion needs, whatever
the model's size.

Safety: the folder is written to a hidden temporary sibling (`.NAME.xxxxxxxx`, with the umask's
permissions) and renamed at the end, so an interrupted conversion leaves nothing behind:
exceptions and Ctrl-C remove it, SIGTERM/SIGHUP are turned into an exception during the
conversion so that they remove it too, and the temp folder holds a marker file with the owner's
pid and host, so that after a SIGKILL (or a power cut) the next conversion into the same parent
folder removes it. Nothing without that marker, nor anything whose owner still runs, is ever
deleted. `--force` replaces only a model folder (one with config.json) or an empty one, never a
file, the source checkpoint, or a folder inside or around it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import secrets
import shutil
import signal
import socket
import sys
import threading
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map
from tqdm import tqdm

from mlx_listen.errors import ModelError
from mlx_listen.load import load_model, resolve

from . import quantize as Q

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
# Everything a user of the folder needs besides the weights (tokenizer, processor, templates).
SIDE_FILES = [
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "processor_config.json",
    "preprocessor_config.json", "generation_config.json",
]
MAX_SHARD_GB = 5  # mlx-lm's shard size
MARKER = ".mlx-listen-partial"  # in a temp folder: {"pid", "host"} of the conversion that owns it
SHARD_NAME = "model-{:05d}-of-{:05d}.safetensors"
_SIGNALS = tuple(getattr(signal, s) for s in ("SIGTERM", "SIGHUP") if hasattr(signal, s))


def convert(
    hf_path: str,
    mlx_path: str = "mlx_model",
    *,
    dtype: str | None = None,
    quantize: bool = False,
    q_bits: int | None = None,
    q_group_size: int | None = None,
    q_mode: str = "affine",
    quant_predicate: str | None = None,
    quantize_audio_tower: bool = False,
    dequantize: bool = False,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Convert `hf_path` (folder or hub id) to an MLX folder at `mlx_path`; return `mlx_path`.

    `q_mode` / `q_group_size` / `q_bits` / `quant_predicate` / `quantize_audio_tower` need `quantize`
    (`quantize.spec` checks them; unset ones take the mode's defaults); `dequantize` writes a quantised
    MLX folder back in float. With `progress`, a progress bar, mlx-lm's `[INFO] Quantized model with X
    bits per weight.` line and the bits per weight of each part go to stderr; stdout stays untouched.
    """
    spec = Q.options(quantize, dequantize, q_mode, q_group_size, q_bits, quant_predicate, quantize_audio_tower)
    out = Path(mlx_path).expanduser()
    local = Path(hf_path).expanduser()
    if local.exists():  # before the existence check, whose advice (--force) would be wrong here
        _refuse_overlap(local, out)
    _check_target(out, force)
    src = resolve(hf_path)
    _refuse_overlap(src, out)
    model, config = load_model(src, lazy=True)
    family = model.family
    if model.dropped and progress:
        n = sum(c for c, _ in model.dropped.values())
        size = sum(b for _, b in model.dropped.values())
        parts = ", ".join(f"{p.rstrip('.')}.* ({c})" for p, (c, _) in model.dropped.items())
        print(f"[INFO] Left out {n} tensors ({size / 1e9:.2f} GB) the model does not use: {parts}", file=sys.stderr)
    if Q.is_quantised(config) and quantize:
        raise ModelError(f"{src} is already quantised; convert the float checkpoint, or pass -d/--dequantize "
                         "alone to write this one in float")
    if dequantize and not Q.is_quantised(config):
        raise ModelError(f"{src} is not quantised: there is nothing to dequantize")
    if spec is not None:
        Q.check_widths(model, spec)

    config = copy.deepcopy(config)
    config.pop("eos_token_id", None)  # mlx-lm merged it from generation_config.json, copied below
    for part in ("talker_config", "token2wav_config"):  # Omni: only the thinker is written
        if config.pop(part, None) is not None:
            config["enable_audio_output"] = False
    src_bytes = max((p.dtype.size for _, p in tree_flatten(model.parameters())
                     if mx.issubdtype(p.dtype, mx.floating)), default=4)
    if dequantize:  # lazy, like everything else
        model = Q.dequantize(model)
        for k in ("quantization", "quantization_config"):
            config.pop(k, None)
    if dtype is not None:
        target = DTYPES[dtype]
        model.update(tree_map(lambda p: p.astype(target) if mx.issubdtype(p.dtype, mx.floating) else p,
                              model.parameters()))
        config["dtype"] = dtype
        config.pop("torch_dtype", None)
    if spec is not None:  # lazy, like the cast: nothing is computed until a shard is written
        model, config = Q.quantize(model, config, spec)
    if progress and (spec is not None or dequantize):
        Q.report(model, "Quantized" if spec is not None else "Dequantized")
    if "quantization" in config:
        config["quantization_config"] = config["quantization"]

    dest = out.resolve()  # through a symlink: replace the folder it points at, keep the link
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelError(f"cannot create the folder for {out} ({e.strerror or e})") from None
    with _signals_raise():
        _remove_stale(dest.parent, progress)
        tmp = _make_partial(dest.parent, dest.name)
        try:
            # Bytes alive per output byte while a tensor is computed, at most: a cast's output plus
            # an input up to twice its size (fp32 → 16 bit); a 4-bit weight (0.5625 bytes a
            # parameter with its scales) plus an fp32 input (7.1x), plus a 16-bit cast of it (10.7x).
            transient = Q.transient(spec, src_bytes, DTYPES[dtype].size if dtype else 0)
            _write_weights(tmp, model, progress, transient)
            del model
            (tmp / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=2))
            for f in SIDE_FILES:
                if (src / f).exists():
                    shutil.copy2(src / f, tmp / f)
            _model_card(tmp, hf_path, spec, family)
            _commit(tmp, dest)
        except BaseException as e:
            with _signals_held():  # a second Ctrl-C or SIGTERM must not cut the cleanup short
                _remove(tmp)
            if isinstance(e, _Signalled) and progress:
                print(f"\n[INFO] Stopped by signal {e.signum}; removed the partial output {tmp}",
                      file=sys.stderr)
            raise
    return out


# -- checks before anything is written -----------------------------------------------------------
def _refuse_overlap(src: Path, out: Path):
    """The output may be neither the source, nor inside it, nor around it (even with --force)."""
    s, o = src.resolve(), out.resolve()
    how = "is" if s == o else "is inside" if s in o.parents else "contains" if o in s.parents else None
    if how:
        raise ModelError(f"the output folder {out} {how} the source checkpoint {src}; "
                         f"choose another --mlx-path (--force never overwrites the source)")


def _check_target(out: Path, force: bool):
    """Only an existing model folder (config.json) or an empty folder may be replaced, with --force."""
    if not (out.exists() or out.is_symlink()):
        return
    if not out.is_dir():
        raise ModelError(f"{out} exists and is not a folder; choose another --mlx-path "
                         f"(--force replaces only a model folder)")
    if not force:
        raise ModelError(f"{out} already exists; pass --force to overwrite it")
    try:
        empty = not any(out.iterdir())
    except OSError as e:
        raise ModelError(f"cannot read {out} ({e.strerror or e})") from None
    if not empty and not (out / "config.json").is_file():
        raise ModelError(f"{out} is not a model folder (no config.json) and not empty; refusing to "
                         f"delete it even with --force: choose another --mlx-path")


# -- writing -------------------------------------------------------------------------------------
def _write_weights(tmp: Path, model: nn.Module, progress: bool, transient: float):
    """Shards + index, computing each shard only when it is written and freeing it afterwards.

    mlx-lm's `save_model(..., donate_model=True)` pattern (it cannot be called as is: it ignores
    our shard size and names a single shard `model.safetensors`), with the shard's tensors
    evaluated by `_evaluate` rather than all at once by `save_safetensors`.
    """
    from mlx_lm.utils import make_shards

    weights = dict(tree_flatten(model.parameters()))
    shards = make_shards(weights, max_file_size_gb=MAX_SHARD_GB)
    total = sum(v.nbytes for v in weights.values())
    # Donate: from here on each array is referenced by its shard only.
    model.update(tree_map(lambda _: mx.array([]), model.parameters()))
    weights.clear()
    del weights
    index = {"metadata": {"total_size": total}, "weight_map": {}}
    with tqdm(total=total, desc="Writing shards", unit="B", unit_scale=True, disable=not progress) as bar:
        for i in range(len(shards)):
            shard, shards[i] = shards[i], None
            fname = SHARD_NAME.format(i + 1, len(shards))
            _evaluate(list(shard.values()), transient, bar)
            mx.save_safetensors(str(tmp / fname), shard, metadata={"format": "mlx"})
            index["weight_map"].update(dict.fromkeys(shard, fname))
            del shard
            mx.clear_cache()
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _evaluate(arrays: list, transient: float, bar):
    """Compute a shard's arrays, overlapping reads and compute without raising the peak.

    Evaluating the whole shard at once (what `save_safetensors` does) lets MLX read source
    tensors ahead without limit (quantising 3.8 GB of bf16 to 8 bits peaked at 3.9 GB that way,
    at 2.0 GB one tensor at a time), while one at a time serialises reading and computing.
    Instead tensors are scheduled ahead (`async_eval`)
    while the memory the shard has yet to fill covers them: an array in flight counts at
    `transient` times its size (its output plus its inputs), so memory stays within the finished
    shard plus one tensor's inputs. Waiting tensor by tensor also lets a signal in between.
    """
    room = sum(a.nbytes for a in arrays)  # what the shard will hold once all of it is computed
    done = ahead = 0
    j = 0
    try:
        blocked = {id(a) for a in arrays if id(a) in Q.BLOCKS}  # fp4 in row blocks: each in its turn only
        for i, a in enumerate(arrays):
            Q.blocks_first(a)
            while j < len(arrays) and (j == i or (id(arrays[j]) not in blocked and
                                                  done + transient * (ahead + arrays[j].nbytes) <= room)):
                mx.async_eval(arrays[j])
                ahead += arrays[j].nbytes
                j += 1
            mx.eval(a)
            ahead -= a.nbytes
            done += a.nbytes
            bar.update(a.nbytes)
    except BaseException:
        with contextlib.suppress(Exception):  # let scheduled work finish before the cleanup
            mx.synchronize()
        raise


def _model_card(path: Path, base: str, spec: Q.Spec | None, family: str = "qwen2_audio"):
    q = (f"{spec.describe()} (projector{'' if spec.audio_tower else ' and audio tower'} unquantised)"
         if spec else "not quantised")
    tag = family.replace("_", "-")
    path.joinpath("README.md").write_text(
        f"---\nlibrary_name: mlx\nbase_model: {base}\ntags: [mlx, audio, {tag}]\n---\n\n"
        f"Converted from `{base}` with `mlx-listen convert`; quantisation: {q}.\n"
    )


# -- atomicity and cleanup -----------------------------------------------------------------------
def _mark(folder: Path):
    (folder / MARKER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))


def _new_sibling(parent: Path, name: str, tag: str = "") -> Path:
    """A fresh hidden folder next to the output: like mkdtemp, but with mkdir's (umask) mode."""
    while True:
        path = parent / f".{name}.{tag}{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
        except OSError as e:
            raise ModelError(f"cannot write in {parent} ({e.strerror or e})") from None


def _make_partial(parent: Path, name: str) -> Path:
    tmp = _new_sibling(parent, name)
    try:
        _mark(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _remove(folder: Path):
    """Delete one of our (flat) temp folders, its marker last: a kill half-way leaves it marked."""
    try:
        entries = [p for p in folder.iterdir() if p.name != MARKER]
    except OSError:
        return
    for p in entries:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
    shutil.rmtree(folder, ignore_errors=True)


def _commit(tmp: Path, dest: Path):
    """Swap the finished temp folder in; the replaced folder (if any) is deleted afterwards.

    SIGINT and the termination signals are held back during the two renames, so that an
    interruption cannot leave neither the old nor the new folder in place; a failure moves the
    old folder back.
    """
    old, committed = None, False
    try:
        with _signals_held():
            try:
                if dest.exists():
                    old = _new_sibling(dest.parent, dest.name, "old.")
                    os.replace(dest, old)  # onto the fresh (empty) folder
                (tmp / MARKER).unlink()
                tmp.rename(dest)
                committed = True
            except BaseException:
                if old is not None and not dest.exists():
                    os.replace(old, dest)
                raise
    finally:  # also when a signal held back above is raised as the block ends
        if committed and old is not None:
            # Marked only now (never while it may be the only copy), so that a kill half-way
            # through deleting it leaves a folder that the next run removes.
            with contextlib.suppress(OSError):
                _mark(old)
            _remove(old)


def _owner(folder: Path) -> dict | None:
    try:
        info = json.loads((folder / MARKER).read_text())
        return info if isinstance(info, dict) and isinstance(info.get("pid"), int) else None
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: someone else's live process
        return True
    return True


def _remove_stale(parent: Path, progress: bool):
    """Remove partial folders that killed conversions left in `parent` (marked, owner gone)."""
    host = socket.gethostname()
    try:
        entries = [p for p in parent.iterdir() if p.name.startswith(".")]
    except OSError:
        return
    for p in entries:
        if p.is_symlink() or not p.is_dir():
            continue
        info = _owner(p)
        if info is None or info.get("host") != host or _alive(info["pid"]):
            continue
        _remove(p)
        if progress:
            print(f"[INFO] Removed {p}, left by an interrupted conversion (pid {info['pid']})",
                  file=sys.stderr)


class _Signalled(SystemExit):
    """SIGTERM/SIGHUP during a conversion: unwinds (running the cleanup), then exits 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


def _raise(signum, frame):
    raise _Signalled(signum)


def _default_handled() -> list[int]:
    """The termination signals whose handler we may take over (main thread, default action)."""
    if threading.current_thread() is not threading.main_thread():
        return []
    return [s for s in _SIGNALS if signal.getsignal(s) is signal.SIG_DFL]


@contextlib.contextmanager
def _signals_raise():
    """While converting, SIGTERM/SIGHUP raise `_Signalled` in the main thread instead of killing.

    Only signals left at their default action are taken over (an application's own handler or
    an ignored SIGHUP under nohup stay as they are); the default is restored afterwards.
    """
    taken = _default_handled()
    for s in taken:
        signal.signal(s, _raise)
    try:
        yield
    finally:
        for s in taken:
            signal.signal(s, signal.SIG_DFL)


@contextlib.contextmanager
def _signals_held():
    """Block SIGINT and the termination signals; one that arrives is delivered as the block ends."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, *_SIGNALS}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
