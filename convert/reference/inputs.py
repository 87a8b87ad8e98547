"""What `mlx-listen-reference` checks before any model work: the items and their clips, the head set,
the device, the checkpoint (transformers weights, never an MLX folder) and the output folder."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from mlx_listen.bundle import MANIFEST
from mlx_listen.errors import ListenError, ModelError
from mlx_listen.frontend import FrontEnd, Window
from mlx_listen.headset import HeadSet
from mlx_listen.models import FAMILIES, model_config
from mlx_listen.stats import check_heads as check_head_list

from . import hf as R


def read_items(path: Path, audio_dir: Path | None) -> list[dict]:
    """A plain list of `{audio, question[, system, id]}` or an MMAU-format file (R1-AQA prompt)."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ListenError(f"cannot read items file {path}: {e}") from None
    if not isinstance(raw, list) or not raw:
        raise ListenError(f"{path}: expected a non-empty JSON list of items, got {type(raw).__name__}"
                          + (" (empty)" if isinstance(raw, list) else ""))
    base = Path(audio_dir) if audio_dir else Path(path).parent
    items = []
    for k, it in enumerate(raw):
        if not isinstance(it, dict):
            raise ListenError(f"{path}: item {k} is a {type(it).__name__}, not an object with audio and question")
        if "audio_id" in it and "choices" in it:  # MMAU
            from mlx_listen.presets import build_prompt

            if not isinstance(it["audio_id"], str) or not isinstance(it.get("question"), str) \
                    or not isinstance(it["choices"], list):
                raise ListenError(f"{path}: item {k} has MMAU fields of the wrong type "
                                  "(audio_id and question are strings, choices a list)")
            items.append({"id": str(it.get("id", k)), "audio": it["audio_id"],
                          "question": build_prompt(it, "r1-aqa"), "system": None})
        elif "audio" in it and "question" in it:
            if not isinstance(it["audio"], str) or not isinstance(it["question"], str) or not it["question"].strip():
                raise ListenError(f"{path}: item {k} needs audio and question as non-empty strings")
            if it.get("system") is not None and not isinstance(it["system"], str):
                raise ListenError(f"{path}: item {k}: system must be a string")
            items.append({"id": str(it.get("id", k)), "audio": it["audio"], "question": it["question"],
                          "system": it.get("system")})
        else:
            raise ListenError(f"{path}: item {k} has neither audio+question nor MMAU fields")
        audio = base / items[-1]["audio"]
        if not audio.is_file():
            raise ListenError(f"item {items[-1]['id']}: audio file {audio} "
                              + ("is not a file" if audio.exists() else "not found"))
        items[-1]["path"] = audio
    return items


def check_clip(audio: np.ndarray, name: str, front: FrontEnd | None = None) -> None:
    """The clip rules of the family's front end (`FrontEnd.check`, MLX-free): mono, finite over the part
    it uses, and long enough to give at least one audio token."""
    (front or Window()).check(audio, name)


def check_clips(items: list[dict], front: FrontEnd | None = None) -> None:
    front = front or Window()
    for item in items:
        check_clip(front.load(item["path"]), str(item["path"]), front)


def read_heads(path: Path) -> list[tuple[int, int]]:
    """HEADS.json (`mlx-listen heads`): its `heads` list of [layer, head] pairs."""
    return HeadSet.load(path).heads


def check_heads(heads, config: dict, path="--heads") -> None:
    t = model_config(config).text_config
    try:
        check_head_list(heads, t.num_hidden_layers, t.num_attention_heads)
    except ListenError as e:
        raise ListenError(f"{path}: {e}") from None


def check_device(device: str | None) -> str:
    """The torch device to use: `device` if torch can use it here, else the best available."""
    import torch


    if device is None:
        return R.pick_device()
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        raise ListenError(f"--device {device}: not a torch device (use cuda, cuda:N, mps or cpu)") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA GPU or driver found"
            raise ListenError(f"--device {device}: CUDA is not available here ({why}, torch {torch.__version__}); "
                              "use --device cpu, or leave --device out for the best available")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ListenError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif d.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ListenError(f"--device {device}: MPS is not available here; use --device cpu")
    elif d.type != "cpu":
        raise ListenError(f"--device {device}: only cuda, mps and cpu are supported")
    return device


def _safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (tensor dtypes, shapes, `__metadata__`), without the data."""
    try:
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if n > 100_000_000:
                raise ValueError("header too large")
            return json.loads(f.read(n))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as e:
        raise ModelError(f"{path} is not a readable safetensors file ({e})") from None


def _mlx_signs(folder: Path, config: dict) -> str | None:
    """Why `folder` looks like an `mlx-listen convert` / mlx-lm folder (None if it does not)."""
    if "quantization" in config:
        return 'its config.json has an MLX "quantization" block'
    for f in sorted(folder.glob("*.safetensors")):
        header = _safetensors_header(f)
        if (header.get("__metadata__") or {}).get("format") == "mlx":
            return f'{f.name} has {{"format": "mlx"}} metadata'
        for name in ("audio_tower.conv1.weight", "model.audio_tower.conv1.weight", "thinker.audio_tower.conv1.weight"):
            shape = (header.get(name) or {}).get("shape")
            if shape and len(shape) == 3 and shape[1] == 3 and shape[2] != 3:  # torch: (out, in, 3)
                return f"its conv weights are in MLX layout ({name} is {shape})"
    return None


def check_checkpoint(model_path: str) -> tuple[Path, dict]:
    """The local folder of a transformers checkpoint of a family mlx-listen runs (hub ids through the hub
    cache) and its config; refuses MLX folders and anything without a config and weights."""
    p = Path(model_path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ModelError(f"--model {p} is a file; pass a transformers checkpoint folder or a hub repo id")
    elif str(model_path).startswith((".", "/", "~")) or str(model_path).count("/") != 1:
        raise ModelError(f"--model {model_path}: folder not found (and it is not a hub repo id like Org/Name)")
    else:
        try:
            p = Path(R.resolve_hf(model_path))
        except Exception as e:  # the hub's errors are many; the user needs one line
            from huggingface_hub import constants

            hint = ("unset HF_HUB_OFFLINE to download it" if constants.HF_HUB_OFFLINE
                    else "set HF_HUB_OFFLINE=1 to use the hub cache only")
            first = str(e).splitlines()[0][:160] if str(e) else ""
            raise ModelError(f"could not get {model_path} from the Hugging Face hub ({type(e).__name__}: {first}); "
                             f"pass a local folder, or {hint}") from None
    if not (p / "config.json").is_file():
        raise ModelError(f"{p} has no config.json: not a model folder")
    try:
        config = json.loads((p / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{p}/config.json is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{p}/config.json is not a JSON object")
    if why := _mlx_signs(p, config):
        raise ModelError(f"{p} is an MLX model folder ({why}), not a transformers checkpoint; pass the "
                         "Hugging Face folder or repo id it was converted from")
    if config.get("model_type") not in FAMILIES:
        raise ModelError(f"{p} is a {config.get('model_type')!r} model; mlx-listen-reference runs "
                         f"{', '.join(FAMILIES)}")
    if not any(p.glob("*.safetensors")) and not any(p.glob("pytorch_model*.bin")):
        raise ModelError(f"{p} has no weight files (*.safetensors)")
    try:
        model_config(config)
    except (ValueError, TypeError) as e:
        raise ModelError(f"{p}/config.json: {e}") from None
    return p, config


def check_out(out: Path, force: bool) -> None:
    """`out` may be written: absent, or (with `force`) an existing bundle or an empty folder."""
    if not out.exists():
        if out.parent.exists() and not out.parent.is_dir():
            raise ListenError(f"cannot write {out}: {out.parent} is a file")
        return
    if not out.is_dir():
        raise ListenError(f"{out} exists and is a file; choose another --out")
    if not force:
        raise ListenError(f"{out} already exists; pass --force to overwrite it")
    if not (out / MANIFEST).exists() and any(out.iterdir()):
        raise ListenError(f"{out} exists and is not a reference bundle (no {MANIFEST}); not replacing it")
