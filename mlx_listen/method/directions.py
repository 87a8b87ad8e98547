"""Steering directions as options and files: the steering of `--steer HEADS.json` / `--vector FILE`,
fixed vectors on disk (repeng / llama.cpp naming: one tensor `direction.{layer}` with string
metadata), and `steer build`, the dataset-mean direction over calibration items."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from .. import __version__, presets
from ..errors import ListenError, ListenWarning
from ..eval import mmau
from ..headset import HeadSet
from ..identity import check_binding, model_signature
from ..interp.steering import SteerConfig, Steerer
from ..load import ModelRef
from ..prompt import prepare
from ..records import file_sha256


def steer_config(headset=None, vector_file=None, *, alpha: float | None = None, at: str = "all",
                 strength: str = "fixed", normalize: str = "none", apply_layer: int = -1) -> tuple[SteerConfig, dict]:
    """The steering of `--steer HEADS.json` (per-input direction over the heads' layers) or
    `--vector FILE` (a fixed direction; HEADS.json then serves only strength "listening"), with
    the settings that identify it in results. `alpha` None: 1, or the vector file's own strength."""
    if headset is None and vector_file is None:
        raise ListenError("steering needs --steer HEADS.json or --vector FILE")
    if strength == "listening" and headset is None:
        raise ListenError("--strength listening needs --steer HEADS.json (its heads and calibration mean)")
    settings = {}
    if headset is not None:
        cfg = from_heads(headset, alpha=1.0 if alpha is None else alpha, at=at, strength=strength,
                         normalize=normalize, apply_layer=apply_layer)
        if headset.path:
            settings["heads_sha256"] = file_sha256(headset.path)
    else:
        cfg = SteerConfig(alpha=1.0 if alpha is None else alpha, at=at, normalize=normalize)
    if vector_file is not None:  # the file says which block it was made for, and its default strength
        cfg.vector, cfg.apply_layer, md = load_vector(vector_file)
        cfg.layers = []
        if alpha is None:
            try:
                cfg.alpha = float(md.get("coeff", 1.0))
            except ValueError:
                raise ListenError(f"{vector_file}: its stored strength {md.get('coeff')!r} is not a number") from None
        settings["vector_sha256"] = file_sha256(vector_file)
    return cfg, settings


def from_heads(headset, alpha: float = 1.0, at: str = "all", **kw) -> SteerConfig:
    """A steering config from a `heads.HeadSet`: L* = the distinct layers of its heads."""
    return SteerConfig(layers=headset.layers, alpha=alpha, at=at, heads=list(headset.heads),
                       listening_mean=(headset.meta or {}).get("listening_mean"), **kw)


# -- fixed vectors on disk (repeng / llama.cpp naming: tensor `direction.{layer}`) --------------

def save_vector(path, vector: np.ndarray, *, apply_layer: int, hidden_size: int, meta: dict,
                model_type: str = "qwen2_audio"):
    md = {"model_type": model_type, "hidden_size": str(hidden_size), "apply_at": "pre_final_norm",
          "mlx_listen_version": __version__}
    md.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})
    mx.save_safetensors(str(path), {f"direction.{apply_layer}": mx.array(np.asarray(vector, np.float32))},
                        metadata=md)


def bindings(*paths) -> list[tuple[str, dict]]:
    """(label, metadata) of each HEADS.json / vector / head-means file given (None skipped), for
    `identity.check_binding`: what each was found on (model signature, prompt, calibration ids)."""
    from .means import means_binding

    out = []
    for p in paths:
        if p is None or not Path(p).is_file():
            continue
        if Path(p).suffix != ".safetensors":
            out.append((str(p), HeadSet.load(p).meta or {}))
        else:
            out.append((str(p), means_binding(p) if is_means_file(p) else vector_binding(p)))
    return out


def is_means_file(path) -> bool:
    """A head-means file (`ablate means`: tensors `z_mean.<layer>`), not a steering vector."""
    try:
        return any(k.startswith("z_mean.") for k in mx.load(str(path)))
    except Exception:
        return False


def vector_binding(path) -> dict:
    """What a vector file says it is bound to (model signature, prompt, calibration ids), in the
    shape `identity.check_binding` reads."""
    _, _, md = load_vector(path)

    def field_(key, default=None):
        try:
            return json.loads(md[key]) if key in md else default
        except ValueError:
            return md.get(key, default)

    sig, cal = field_("model_signature"), field_("calibration", {}) or {}
    if sig is not None and not isinstance(sig, dict):
        raise ListenError(f"{path}: its 'model_signature' metadata is damaged (not a JSON object)")
    if not isinstance(cal, dict) or not isinstance(cal.get("ids") or [], list) \
            or not isinstance(cal.get("prompt") or "", str):
        raise ListenError(f"{path}: its 'calibration' metadata is damaged (not an object with ids and prompt)")
    return {"model_signature": sig, "prompt": cal.get("prompt"), "calibration_ids": cal.get("ids") or []}


def load_vector(path, hidden_size: int | None = None, n_layers: int | None = None) -> tuple[np.ndarray, int, dict]:
    """(vector, layer it applies to, metadata); refuses a vector made for another width."""
    try:
        tensors, md = mx.load(str(path), return_metadata=True)
    except Exception as e:
        raise ListenError(f"{path} is not a steering vector file ({e})") from None
    keys = [k for k in tensors if k.startswith("direction.")]
    if len(keys) != 1:
        raise ListenError(f"{path}: expected one tensor named direction.<layer>, found {sorted(tensors)}")
    try:
        layer = int(keys[0].split(".")[1])
    except ValueError:
        raise ListenError(f"{path}: tensor {keys[0]!r} does not name a layer") from None
    vec = np.array(tensors[keys[0]].astype(mx.float32))
    if vec.ndim != 1 or not np.isfinite(vec).all():
        raise ListenError(f"{path}: the direction must be one finite vector, got shape {vec.shape}")
    if hidden_size is not None and (vec.shape != (hidden_size,) or md.get("hidden_size") not in (None, str(hidden_size))):
        raise ListenError(f"{path} was made for hidden size {md.get('hidden_size', vec.shape)}; "
                          f"this model's is {hidden_size}")
    if n_layers is not None and not -n_layers <= layer < n_layers:
        raise ListenError(f"{path} applies at layer {layer}; this model has {n_layers}")
    return vec, layer, md


def build_vector(model, processor, items: Sequence[dict], audio_dir: Path, config: SteerConfig, prompt_preset: str,
                 progress: bool = True) -> tuple[np.ndarray, list[str], list[dict]]:
    """The mean of the per-input directions d(x) over `items` (float32), the ids that went in, and
    the items that could not be used ({id, error})."""
    st = Steerer(model, config)
    total, used, failed, zero = None, [], [], 0
    for item in tqdm(items, desc="direction", unit="item", file=sys.stderr, disable=not progress):
        try:
            prompt = prepare(model, processor, [Path(audio_dir) / item["audio_id"]], presets.build_prompt(item, prompt_preset))
        except ListenError as e:
            failed.append({"id": item["id"], "error": str(e)})
            continue
        d = np.array(st.direction(prompt))
        total = d if total is None else total + d
        used.append(item["id"])
        zero += not np.any(d)
    if not used:
        raise ListenError("no items to build the direction from" + (f" ({len(failed)} failed, e.g. "
                          f"{failed[0]['id']}: {failed[0]['error']})" if failed else ""))
    if zero:
        warnings.warn(f"{zero} of {len(used)} items gave an all-zero direction (audio and silence identical at the "
                      "heads' layers)", ListenWarning, stacklevel=2)
    return (total / len(used)).astype(np.float32), used, failed


def vector_path(out) -> Path:
    """Where `steer build --out X` writes: X itself if it ends in .safetensors, else X.safetensors."""
    out = Path(out)
    return out if out.suffix == ".safetensors" else out.with_name(out.name + ".safetensors")


def build(headset: HeadSet, model, data: Path, audio_dir: Path, out, *, limit: int | None = None,
          alpha: float = 1.0, prompt: str = presets.DEFAULT_PRESET, force: bool = False,
          progress: bool = True) -> tuple[Path, np.ndarray, dict]:
    """`mlx-listen steer build`: the dataset-mean direction over `data`, saved with `alpha` as its
    default strength and what it is bound to (model signature, prompt, its items). The output
    folder, the prompt and the heads are checked before any model work (`model`: a folder, repo id
    or loaded pair)."""
    path = vector_path(out)
    if not path.parent.is_dir():
        raise ListenError(f"the folder of --out ({path.parent}) does not exist")
    items = mmau.load_items(data)[:limit]
    label = str(headset.path or "the head set")
    warned = check_binding(headset.meta or {}, label, prompt=prompt, force=force, family=ModelRef.of(model).family)
    config = from_heads(headset)
    ref = ModelRef.of(model)
    model, processor = ref.get()
    headset.check(model.n_layers, model.n_heads)
    warned += check_binding(headset.meta or {}, label, model=model, force=force)
    for w in warned:
        warnings.warn(w, ListenWarning, stacklevel=2)
    vec, used, failed = build_vector(model, processor, items, Path(audio_dir), config, prompt, progress)
    if not np.any(vec):
        warnings.warn("the mean direction is all zeros (the audio and the silence give the same residuals at the "
                      "heads' layers): steering with it changes nothing", ListenWarning, stacklevel=2)
    meta = {"model": str(ref), "layers": config.layers, "heads": [list(h) for h in config.heads],
            "coeff": alpha, "normalize": "none", "positions": "prompt_last+generated", "source": "dataset_mean",
            "model_signature": model_signature(model), "warnings": warned,
            "calibration": {"data_sha256": file_sha256(data), "n_items": len(used), "prompt": prompt,
                            "ids": used, "failed": failed}}
    tmp = path.with_name(f".{path.name}.tmp.safetensors")
    save_vector(tmp, vec, apply_layer=model.n_layers - 1, hidden_size=model.hidden_size, meta=meta)
    tmp.replace(path)
    return path, vec, meta
