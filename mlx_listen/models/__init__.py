"""Model families, one file per `model_type` (mlx-lm's `models/` convention), behind one interface
(`base.AudioLM`). `classes(config)` picks the family from a `config.json` dict. Importing this
package loads no MLX: the CLI reads `DEFAULT_MODEL` from here and starts fast."""

from __future__ import annotations

import importlib

# model_type -> module; each module defines `Model` and `ModelConfig`.
FAMILIES = {"qwen2_audio": "qwen2_audio"}
DEFAULT_MODEL = "Qwen/Qwen2-Audio-7B-Instruct"


def classes(config: dict):
    """(Model, ModelConfig) of the family `config["model_type"]` names; ValueError if none does."""
    kind = config.get("model_type")
    if kind not in FAMILIES:
        raise ValueError(f"model_type is {kind!r}; mlx-listen runs {', '.join(repr(k) for k in FAMILIES)} "
                         "(Qwen2-Audio-7B-Instruct, R1-AQA and their fine-tunes)")
    module = importlib.import_module(f".{FAMILIES[kind]}", __name__)
    return module.Model, module.ModelConfig


def model_config(config: dict):
    """The family's config object for a `config.json` dict (ValueError for an unknown or bad one)."""
    return classes(config)[1].from_dict(config)


__all__ = ["FAMILIES", "DEFAULT_MODEL", "classes", "model_config"]
