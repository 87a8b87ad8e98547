"""`mlx-listen-reference`: run transformers' model of any family (Qwen2-Audio, Audio Flamingo 3, the
Qwen2.5-Omni thinker; CUDA, MPS or CPU) on a list of questions
and write a reference bundle (`mlx_listen.bundle`) for `mlx-listen parity` to check an MLX model
against, on another machine.

Every input is checked before the model loads (items, clips, heads, device, that `--model` is a
transformers checkpoint and not an MLX folder); user errors are one `Error: …` line and exit 1.
The bundle is written to a temporary sibling folder and renamed at the end, so a failed or
interrupted run leaves nothing that blocks the rerun, and `--force` replaces an existing bundle
only once the new one is complete.

Needs the reference extra (torch, transformers); does not need MLX.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import click
import numpy as np

from mlx_listen import __version__
from mlx_listen.bundle import (
    FORMAT,
    VERSION,
    Bundle,
    config_hash,
    fingerprint_slices,
    fingerprint_values,
    sketch,
    slices_to_json,
)
from mlx_listen.errors import ListenError, ModelError
from mlx_listen.models import front_end, model_config
from mlx_listen.records import file_sha256

from . import hf as R
from .inputs import (
    check_checkpoint,
    check_clip,
    check_clips,
    check_device,
    check_heads,
    check_out,
    read_heads,
    read_items,
)

# Module-tree names (what the bundle records) → transformers-5 in-memory names (what `state_dict` has).
_IN_MEMORY = R.IN_MEMORY


# -- recording ---------------------------------------------------------------------------------


def _hf_tensor(state: dict, name: str):
    if name in state:
        return state[name]
    for hub, mem in _IN_MEMORY:
        if name.startswith(hub) and mem + name[len(hub):] in state:
            return state[mem + name[len(hub):]]
    raise KeyError(f"{name} is not a parameter of this transformers model")


def weight_fingerprint(model, config: dict) -> tuple[dict[str, list[float]], dict[str, list[list[int]]]]:
    """`(values, slices)`: the fingerprinted block of each tensor (`bundle.fingerprint_slices`)."""
    state = model.state_dict()
    values, slices = {}, {}
    for name, idx in fingerprint_slices(config).items():
        block = _hf_tensor(state, name)[idx].detach().float().cpu().numpy()
        values[name], slices[name] = fingerprint_values(block), slices_to_json(idx)
    return values, slices


def _until_eos(model, toks) -> np.ndarray:
    eos = set(model.generation_config.eos_token_id or [])
    toks = list(toks)
    return np.array(toks[: next((i for i, t in enumerate(toks) if t in eos), len(toks))], np.int32)


def record(model, processor, item, audio, max_new_tokens: int, heads=None, steering=None) -> dict[str, np.ndarray]:
    """The bundle quantities of one item (see `mlx_listen.bundle.QUANTITIES`)."""

    res = R.run(model, processor, [audio], item["question"], item["system"], max_new_tokens=max_new_tokens)
    rows = res["feature_attention_mask"].sum(-1).astype(np.int32)  # per clip, or per window (AF3)
    n_frames = np.array([rows.sum()], np.int32)  # one clip per item
    feats = np.concatenate([f[:, :n] for f, n in zip(res["input_features"], rows)], axis=1)
    T = len(res["input_ids"]) - 1
    out = {
        "input_ids": res["input_ids"].astype(np.int32),
        "features": feats.astype(np.float32),
        "n_frames": n_frames,
        "encoder_sketch": sketch(res["encoder"]),
        "encoder_norms": np.linalg.norm(res["encoder"], axis=-1),
        "projector_sketch": sketch(res["projector"]),
        "projector_norms": np.linalg.norm(res["projector"], axis=-1),
        "hidden_last": res["hidden_states"][:, T],
        "logits_last": res["logits"][T],
    }
    if "audio_mass" in res:
        out["audio_mass"] = res["audio_mass"]
        if heads:
            out["listening"] = np.array([np.mean([res["audio_mass"][l, h] for l, h in heads])])
    if max_new_tokens:
        out["greedy_tokens"] = _until_eos(model, res["greedy_tokens"])
    if steering:
        st = R.run_steered(model, processor, [audio], item["question"], item["system"], layers=steering["layers"],
                           alpha=steering["alpha"], at=steering["at"], max_new_tokens=max_new_tokens)
        out["steer_direction"], out["steered_logits_last"] = st["steer_direction"], st["steered_logits_last"]
        if max_new_tokens:
            out["steered_greedy_tokens"] = _until_eos(model, st["steered_greedy_tokens"])
    return {k: np.asarray(v, np.float32) if v.dtype.kind == "f" else v for k, v in out.items()}


def _publish(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished `tmp` to `out`, replacing an existing `out` only now."""
    if not out.exists():
        tmp.rename(out)
        return
    check_out(out, force)  # it may have appeared while this run was recording
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    old.rmdir()
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def make_bundle(model_path: str, items: list[dict], out: Path, dtype: str = "float32", device: str | None = None,
                max_new_tokens: int = 24, drift: bool = False, progress: bool = True,
                heads: list[tuple[int, int]] | None = None, steering: dict | None = None,
                force: bool = False) -> Path:
    """`steering`: {"layers": [...], "alpha": a, "at": "all"|"prompt"} records the steered quantities.

    Checks everything it can before the model loads (raises ListenError); writes the bundle to a
    temporary sibling of `out` and renames it into place at the end (replacing an existing bundle
    only with `force`, and only then).
    """
    out = Path(out)
    if int(max_new_tokens) < 0:
        raise ListenError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    check_out(out, force)
    device = check_device(device)
    hf_path, config = check_checkpoint(model_path)
    if heads:
        check_heads(heads, config)
    if steering:
        n = model_config(config).text_config.num_hidden_layers
        if not steering.get("layers") or not all(0 <= l < n for l in steering["layers"]):
            raise ListenError(f"steering layers {steering.get('layers')} must be a non-empty subset of 0..{n - 1}")
    front = front_end(config, hf_path)
    check_clips(items, front)

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would make the finished bundle private
    except OSError as e:
        raise ListenError(f"cannot write {out}: {e}") from None
    try:
        bundle = _record_bundle(model_path, hf_path, config, items, tmp, dtype, device, max_new_tokens, drift,
                                progress, heads, steering, front)
        bundle.save(tmp)
        _publish(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _record_bundle(model_path, hf_path: Path, config: dict, items, out: Path, dtype, device, max_new_tokens, drift,
                   progress, heads, steering, front) -> Bundle:
    import torch
    import transformers
    from tqdm import tqdm


    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 must mean fp32 on Ampere+ GPUs
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)

    def load(dt):
        try:  # eager attention, so the per-head audio mass can be read from the attention weights
            return R.load_hf(str(hf_path), dtype=dt, device=device, attn="eager")
        except (OSError, ValueError, KeyError) as e:
            msg = " ".join(str(e).split())
            raise ModelError(f"transformers cannot load {hf_path} ({type(e).__name__}: {msg[:300]})") from None

    model, processor = load(dtype)
    drift_dtype = ("bfloat16" if dtype == "float32" else "float32") if drift else None
    other = load(drift_dtype) if drift else None
    dev = str(model.device)
    values, slices = weight_fingerprint(model, config)

    bundle = Bundle({
        "format": FORMAT, "version": VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "software": {"mlx_listen": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version(), "cuda": torch.version.cuda},
        "device": {"type": model.device.type,
                   "name": torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else platform.processor() or platform.machine()},
        "model": {"path": str(model_path), "revision": R.revision_of(hf_path), "config_hash": config_hash(config),
                  "fingerprint": values, "fingerprint_slices": slices},
        "dtype": dtype, "drift_dtype": drift_dtype, "attn_implementation": model.config._attn_implementation,
        "prompt_format": f"{config['model_type']}: the processor's chat template",
        "family": config["model_type"],
        "decoding": {"greedy": True, "max_new_tokens": max_new_tokens}, "seed": 0,
        "heads": [list(map(int, h)) for h in heads] if heads else None,
        "steering": steering,
        "items": [],
    })
    (out / "audio").mkdir(parents=True, exist_ok=True)
    for i, item in enumerate(tqdm(items, desc="Reference", unit="item", disable=not progress, file=sys.stderr)):
        audio = front.load(item["path"])
        check_clip(audio, str(item["path"]), front)
        q = record(model, processor, item, audio, max_new_tokens, heads, steering)
        if other is not None:
            q.update({f"drift.{k}": v for k, v in record(other[0], other[1], item, audio, 0, heads, steering).items()
                      if v.dtype.kind == "f" and k != "features"})
        for k, v in q.items():
            bundle.put(i, k, v)
        copied = out / "audio" / f"{i:04d}{Path(item['path']).suffix}"
        shutil.copy2(item["path"], copied)
        text = processor.apply_chat_template(R.messages_for(item["question"], 1, item["system"]),
                                             add_generation_prompt=True, tokenize=False)
        bundle.items.append({
            "id": item["id"], "audio": str(copied.relative_to(out)), "source_audio": str(item["audio"]),
            "audio_sha256": file_sha256(item["path"]), "n_samples": int(audio.size),
            "question": item["question"], "system": item["system"], "prompt": text,
            "n_prompt_tokens": int(q["input_ids"].size), "quantities": sorted(q),
        })
    bundle.manifest["device"]["used"] = dev
    return bundle


# -- command line ------------------------------------------------------------------------------


class _Command(click.Command):
    """User errors (`ListenError`) become click's own: `Error: …` on stderr, exit status 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ListenError as e:
            raise click.ClickException(str(e)) from None


def _finite(ctx, param, value):
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number")
    return value


@click.command(cls=_Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model_path", required=True, help="HF folder or repo id (transformers weights, not MLX).")
@click.option("--items", "items_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="JSON list of {audio, question} or an MMAU-format file.")
@click.option("--audio-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder the items' audio paths are relative to (default: the items file's folder).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Bundle folder to write.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True)
@click.option("--device", default=None, help="cuda, cuda:N, mps or cpu (default: the best available).")
@click.option("--max-new-tokens", type=click.IntRange(min=0), default=24, show_default=True,
              help="Greedy tokens to record (0: none).")
@click.option("--drift", is_flag=True, help="Also run the other precision and record HF's own bf16-vs-fp32 drift.")
@click.option("--heads", "heads_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="HEADS.json: also record the listening score over these heads.")
@click.option("--steer", is_flag=True, help="Also record audio-silence steering over the heads' layers (needs --heads).")
@click.option("--alpha", type=float, default=1.0, show_default=True, callback=_finite, help="Steering strength.")
@click.option("--steer-at", type=click.Choice(["all", "prompt"]), default="all", show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing bundle (once the new one is complete).")
def main(model_path, items_path, audio_dir, out, dtype, device, max_new_tokens, drift, heads_path, steer, alpha,
         steer_at, force):
    """Record transformers' numbers for each item into a bundle for `mlx-listen parity`."""
    check_out(out, force)
    items = read_items(items_path, audio_dir)
    heads = read_heads(heads_path) if heads_path else None
    if steer and not heads:
        raise ListenError("--steer needs --heads HEADS.json (the read layers are the heads' layers)")
    steering = {"layers": sorted({l for l, _ in heads}), "alpha": alpha, "at": steer_at} if steer else None
    path = make_bundle(model_path, items, out, dtype=dtype, device=device, max_new_tokens=max_new_tokens,
                       drift=drift, heads=heads, steering=steering, force=force)
    click.echo(f"[INFO] Wrote reference bundle {path} ({len(items)} items)", err=True)


if __name__ == "__main__":
    main()
