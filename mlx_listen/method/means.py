"""`mlx-listen ablate means`: every head's mean output over a data set's prompts, for
`--ablate-mode mean` (`interp.ablation.head_means` over the items, one prompt in memory at a time)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm import tqdm

from .. import presets
from ..errors import ListenError
from ..eval import mmau
from ..identity import model_signature
from ..interp.ablation import head_means, save_means
from ..load import ModelRef
from ..prompt import prepare
from ..records import file_sha256


def means_path(out) -> Path:
    """Where `ablate means --out X` writes: X itself if it ends in .safetensors, else X.safetensors (the
    only name the safetensors reader opens)."""
    out = Path(out)
    return out if out.suffix == ".safetensors" else out.with_name(out.name + ".safetensors")


def means_binding(path) -> dict:
    """What a head-means file says it is bound to (model signature, prompt, its items), in the shape
    `identity.check_binding` reads; files from older versions record no signature (a warning on use)."""
    import mlx.core as mx

    try:
        _, md = mx.load(str(path), return_metadata=True)
    except Exception as e:
        raise ListenError(f"{path} is not a head-means file ({e})") from None

    def field_(key):
        try:
            return json.loads(md[key]) if key in md else None
        except ValueError:
            return md.get(key)

    sig = field_("model_signature")
    if sig is not None and not isinstance(sig, dict):
        raise ListenError(f"{path}: its 'model_signature' metadata is damaged (not a JSON object)")
    ids = field_("ids") or []
    if not isinstance(ids, list):
        raise ListenError(f"{path}: its 'ids' metadata is damaged (not a list)")
    # no prompt: a head's mean output over other prompts is still that model's mean (only the model must match)
    return {"model_signature": sig, "prompt": None, "calibration_ids": ids}


def means_from_data(model, data, audio_dir, out, *, limit=None, prompt: str = presets.DEFAULT_PRESET,
                    progress: bool = True):
    """`head_means` over `data`'s prompts (`model`: a folder, repo id or loaded pair), saved to `out`
    (.safetensors added if missing) with what it is bound to (the model's signature, the prompt, the
    items); items whose audio cannot be used are listed in the file's metadata."""
    items = mmau.load_items(data)[:limit]
    path = means_path(out)
    if not path.parent.is_dir():
        raise ListenError(f"the folder of --out ({path.parent}) does not exist")
    ref = ModelRef.of(model)
    mdl, processor = ref.get()
    failed, sizes, used = [], [], []

    def prompts():  # one at a time: the prompts of a whole data set would not fit in memory
        for item in tqdm(items, desc="means", unit="item", file=sys.stderr, disable=not progress):
            try:
                p = prepare(mdl, processor, [Path(audio_dir) / item["audio_id"]], presets.build_prompt(item, prompt))
            except ListenError as e:
                failed.append({"id": item["id"], "error": str(e)})
                continue
            sizes.append(len(p.ids))
            used.append(item["id"])
            yield p

    means = head_means(mdl, prompts())
    meta = {"model": str(ref), "data_sha256": file_sha256(data), "prompt": prompt, "ids": used,
            "n_items": len(sizes), "n_positions": sum(sizes), "failed": failed, "positions": "every prompt position",
            "model_signature": model_signature(mdl)}
    save_means(path, means, meta)
    return path, meta
