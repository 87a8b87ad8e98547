"""`mlx-listen convert`: an HF Qwen2-Audio checkpoint → an MLX folder (optionally quantised).

Needs no PyTorch: safetensors load straight into MLX (bf16 included). Only the language model's
linear layers are quantised; the audio tower and projector keep their dtype (convs cannot be
quantised and the encoder is 0.64 B parameters, little to save). The folder is written to a
temporary sibling and renamed at the end, so an interrupted conversion leaves nothing behind.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map
from tqdm import tqdm

from mlx_listen.errors import ModelError
from mlx_listen.load import load_model, resolve

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
# Everything a user of the folder needs besides the weights (tokenizer, processor, templates).
SIDE_FILES = [
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "processor_config.json",
    "preprocessor_config.json", "generation_config.json",
]
MAX_SHARD_GB = 5  # mlx-lm's shard size


def language_only(path: str, module: nn.Module) -> bool:
    """Quantisation predicate: decoder linears (and embeddings/head) only."""
    return path.startswith("language_model.")


def convert(
    hf_path: str,
    mlx_path: str = "mlx_model",
    *,
    dtype: str | None = None,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    force: bool = False,
    progress: bool = True,
) -> Path:
    from mlx_lm.utils import make_shards, quantize_model

    out = Path(mlx_path)
    if out.exists() and not force:
        raise ModelError(f"{out} already exists; pass --force to overwrite it")
    src = resolve(hf_path)
    model, config = load_model(src, lazy=True)
    if config.get("quantization") and quantize:
        raise ModelError(f"{src} is already quantised")

    config = copy.deepcopy(config)
    config.pop("eos_token_id", None)  # mlx-lm merged it from generation_config.json, copied below
    if dtype is not None:
        target = DTYPES[dtype]
        model.update(tree_map(lambda p: p.astype(target) if mx.issubdtype(p.dtype, mx.floating) else p,
                              model.parameters()))
        config["dtype"] = dtype
        config.pop("torch_dtype", None)
    if quantize:
        model, config = quantize_model(
            model, config, q_group_size, q_bits, quant_predicate=language_only
        )

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        weights = dict(tree_flatten(model.parameters()))
        shards = make_shards(weights, max_file_size_gb=MAX_SHARD_GB)
        name = "model-{:05d}-of-{:05d}.safetensors"
        index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())}, "weight_map": {}}
        for i, shard in enumerate(tqdm(shards, desc="Writing shards", unit="shard", disable=not progress)):
            fname = name.format(i + 1, len(shards))
            mx.save_safetensors(str(tmp / fname), shard, metadata={"format": "mlx"})
            index["weight_map"].update({k: fname for k in shard})
        index["weight_map"] = dict(sorted(index["weight_map"].items()))
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        if "quantization" in config:
            config["quantization_config"] = config["quantization"]
        (tmp / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=2))
        for f in SIDE_FILES:
            if (src / f).exists():
                shutil.copy2(src / f, tmp / f)
        _model_card(tmp, hf_path, quantize and q_bits)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _model_card(path: Path, base: str, bits):
    q = f"{bits}-bit (language model only; audio tower and projector unquantised)" if bits else "not quantised"
    path.joinpath("README.md").write_text(
        f"---\nlibrary_name: mlx\nbase_model: {base}\ntags: [mlx, audio, qwen2-audio]\n---\n\n"
        f"Converted from `{base}` with `mlx-listen convert`; quantisation: {q}.\n"
    )
