"""`mlx-listen-reference`: run transformers' Qwen2-Audio (CUDA, MPS or CPU) on a list of questions
and write a reference bundle (`mlx_listen.bundle`) for `mlx-listen parity` to check an MLX model
against, on another machine.

Needs the reference extra (torch, transformers); does not need MLX.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import shutil
import sys
from pathlib import Path

import click
import numpy as np

from mlx_listen import __version__
from mlx_listen.audio import load_audio
from mlx_listen.bundle import FINGERPRINT_SLICES, FORMAT, VERSION, Bundle, config_hash, sha256_file, sketch
from mlx_listen.errors import ListenError

# Hub names of the fingerprinted tensors → how to reach them on a transformers-5 model.
_HF_TENSORS = {
    "language_model.model.embed_tokens.weight": lambda m: m.get_input_embeddings().weight,
    "language_model.lm_head.weight": lambda m: m.lm_head.weight,
    "language_model.model.norm.weight": lambda m: m.model.language_model.norm.weight,
    "audio_tower.conv1.bias": lambda m: m.model.audio_tower.conv1.bias,
    "multi_modal_projector.linear.bias": lambda m: m.model.multi_modal_projector.linear.bias,
}


def read_items(path: Path, audio_dir: Path | None) -> list[dict]:
    """A plain list of `{audio, question[, system, id]}` or an MMAU-format file (R1-AQA prompt)."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ListenError(f"cannot read items file {path}: {e}") from None
    if not isinstance(raw, list) or not raw:
        raise ListenError(f"{path}: expected a non-empty JSON list of items")
    base = Path(audio_dir) if audio_dir else Path(path).parent
    items = []
    for k, it in enumerate(raw):
        if "audio_id" in it and "choices" in it:  # MMAU
            from mlx_listen.mmau import build_prompt

            items.append({"id": it.get("id", str(k)), "audio": it["audio_id"],
                          "question": build_prompt(it, "r1-aqa"), "system": None})
        elif "audio" in it and "question" in it:
            items.append({"id": str(it.get("id", k)), "audio": it["audio"], "question": it["question"],
                          "system": it.get("system")})
        else:
            raise ListenError(f"{path}: item {k} has neither audio+question nor MMAU fields")
        audio = base / items[-1]["audio"]
        if not audio.exists():
            raise ListenError(f"item {items[-1]['id']}: audio file {audio} not found")
        items[-1]["path"] = audio
    return items


def weight_fingerprint(model) -> dict[str, list[float]]:
    out = {}
    for name, get in _HF_TENSORS.items():
        out[name] = get(model)[FINGERPRINT_SLICES[name]].detach().float().cpu().numpy().reshape(-1).tolist()
    return out


def _until_eos(model, toks) -> np.ndarray:
    eos = set(model.generation_config.eos_token_id or [])
    toks = list(toks)
    return np.array(toks[: next((i for i, t in enumerate(toks) if t in eos), len(toks))], np.int32)


def record(model, processor, item, audio, max_new_tokens: int, heads=None, steering=None) -> dict[str, np.ndarray]:
    """The bundle quantities of one item (see `mlx_listen.bundle.QUANTITIES`)."""
    from . import reference as R

    res = R.run(model, processor, [audio], item["question"], item["system"], max_new_tokens=max_new_tokens)
    n_frames = res["feature_attention_mask"].sum(-1).astype(np.int32)
    feats = np.concatenate([f[:, :n] for f, n in zip(res["input_features"], n_frames)], axis=1)
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


def make_bundle(model_path: str, items: list[dict], out: Path, dtype: str = "float32", device: str | None = None,
                max_new_tokens: int = 24, drift: bool = False, progress: bool = True,
                heads: list[tuple[int, int]] | None = None, steering: dict | None = None) -> Path:
    """`steering`: {"layers": [...], "alpha": a, "at": "all"|"prompt"} records the steered quantities."""
    import torch
    import transformers
    from tqdm import tqdm

    from . import reference as R

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 must mean fp32 on Ampere+ GPUs
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    # Eager attention, so the per-head audio mass can be read from the attention weights.
    model, processor = R.load_hf(model_path, dtype=dtype, device=device, attn="eager")
    drift_dtype = ("bfloat16" if dtype == "float32" else "float32") if drift else None
    other = R.load_hf(model_path, dtype=drift_dtype, device=device, attn="eager") if drift else None
    dev = str(model.device)
    config = json.loads((Path(R.resolve_hf(model_path)) / "config.json").read_text())

    bundle = Bundle({
        "format": FORMAT, "version": VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "software": {"mlx_listen": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version(), "cuda": torch.version.cuda},
        "device": {"type": model.device.type,
                   "name": torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else platform.processor() or platform.machine()},
        "model": {"path": str(model_path), "revision": R.revision_of(model_path), "config_hash": config_hash(config),
                  "fingerprint": weight_fingerprint(model)},
        "dtype": dtype, "drift_dtype": drift_dtype, "attn_implementation": model.config._attn_implementation,
        "prompt_format": "qwen2-audio-chat (processor default template)",
        "decoding": {"greedy": True, "max_new_tokens": max_new_tokens}, "seed": 0,
        "heads": [list(map(int, h)) for h in heads] if heads else None,
        "steering": steering,
        "items": [],
    })
    (out / "audio").mkdir(parents=True, exist_ok=True)
    for i, item in enumerate(tqdm(items, desc="Reference", unit="item", disable=not progress, file=sys.stderr)):
        audio = load_audio(item["path"])
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
            "audio_sha256": sha256_file(item["path"]), "n_samples": int(audio.size),
            "question": item["question"], "system": item["system"], "prompt": text,
            "n_prompt_tokens": int(q["input_ids"].size), "quantities": sorted(q),
        })
    bundle.manifest["device"]["used"] = dev
    return bundle.save(out)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model_path", required=True, help="HF folder or repo id (transformers weights).")
@click.option("--items", "items_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="JSON list of {audio, question} or an MMAU-format file.")
@click.option("--audio-dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Folder the items' audio paths are relative to (default: the items file's folder).")
@click.option("--out", required=True, type=click.Path(), help="Bundle folder to write.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True)
@click.option("--device", default=None, help="cuda, mps or cpu (default: the best available).")
@click.option("--max-new-tokens", default=24, show_default=True, help="Greedy tokens to record (0: none).")
@click.option("--drift", is_flag=True, help="Also run the other precision and record HF's own bf16-vs-fp32 drift.")
@click.option("--heads", "heads_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="HEADS.json: also record the listening score over these heads.")
@click.option("--steer", is_flag=True, help="Also record audio-silence steering over the heads' layers (needs --heads).")
@click.option("--alpha", default=1.0, show_default=True, help="Steering strength.")
@click.option("--steer-at", type=click.Choice(["all", "prompt"]), default="all", show_default=True)
@click.option("--force", is_flag=True, help="Overwrite an existing bundle folder.")
def main(model_path, items_path, audio_dir, out, dtype, device, max_new_tokens, drift, heads_path, steer, alpha,
         steer_at, force):
    """Record transformers' numbers for each item into a bundle for `mlx-listen parity`."""
    out = Path(out)
    try:
        if out.exists() and not force:
            raise ListenError(f"{out} already exists; pass --force to overwrite it")
        items = read_items(Path(items_path), Path(audio_dir) if audio_dir else None)
        if out.exists():
            shutil.rmtree(out)
        heads = [tuple(h) for h in json.loads(Path(heads_path).read_text())["heads"]] if heads_path else None
        if steer and not heads:
            raise ListenError("--steer needs --heads HEADS.json (the read layers are the heads' layers)")
        steering = {"layers": sorted({l for l, _ in heads}), "alpha": alpha, "at": steer_at} if steer else None
        path = make_bundle(model_path, items, out, dtype=dtype, device=device, max_new_tokens=max_new_tokens,
                           drift=drift, heads=heads, steering=steering)
    except ListenError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)
    click.echo(f"[INFO] Wrote reference bundle {path} ({len(items)} items)", err=True)


if __name__ == "__main__":
    main()
