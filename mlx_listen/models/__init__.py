"""Model families, one file per `model_type` (mlx-lm's `models/` convention), behind one interface
(`base.AudioLM`). `classes(config)` picks the family from a `config.json` dict. Importing this
package loads no MLX: the CLI reads `DEFAULT_MODEL` from here and starts fast; what a run needs to
know before any model loads (the family's name, audio placeholder and front end) is here too.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Family:
    """What mlx-listen knows about a family without loading it."""

    model_type: str
    module: str  # models/<module>.py defines `Model` and `ModelConfig`
    name: str  # for messages
    placeholder: str  # the audio token its chat template writes, expanded to one per audio token
    examples: str  # checkpoints, for messages
    builtin_template: bool = False  # its processor renders a default when the folder ships no template


FAMILIES = {f.model_type: f for f in (
    Family("qwen2_audio", "qwen2_audio", "Qwen2-Audio", "<|AUDIO|>", "Qwen2-Audio-7B-Instruct, R1-AQA", True),
    Family("audioflamingo3", "audioflamingo3", "Audio Flamingo 3", "<sound>", "nvidia/audio-flamingo-3-hf"),
    Family("qwen2_5_omni", "qwen2_5_omni", "Qwen2.5-Omni", "<|AUDIO|>", "Qwen2.5-Omni-7B and -3B, the thinker"),
)}
DEFAULT_MODEL = "Qwen/Qwen2-Audio-7B-Instruct"


def family(config: dict) -> Family:
    """The family a `config.json` dict names; ValueError if none does."""
    kind = config.get("model_type") if isinstance(config, dict) else None
    if kind not in FAMILIES:
        known = ", ".join(f"{k!r} ({f.examples})" for k, f in FAMILIES.items())
        raise ValueError(f"model_type is {kind!r}; mlx-listen runs {known}")
    return FAMILIES[kind]


def family_if_known(path_or_repo) -> str | None:
    """The `model_type` of a local folder or of a hub repo already in the cache (no network, no MLX), or None
    when it cannot be known yet (the command that loads the model then says why)."""
    spec = str(path_or_repo)
    path = Path(spec).expanduser()
    try:
        if path.is_dir():
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        elif spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(spec, "config.json")
            if not isinstance(cached, str):
                return None
            config = json.loads(Path(cached).read_text(encoding="utf-8"))
        else:
            return None
        return family(config).model_type
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        return None


def classes(config: dict):
    """(Model, ModelConfig) of the family `config["model_type"]` names; ValueError if none does."""
    module = importlib.import_module(f".{family(config).module}", __name__)
    return module.Model, module.ModelConfig


def model_config(config: dict):
    """The family's config object for a `config.json` dict (ValueError for an unknown or bad one)."""
    return classes(config)[1].from_dict(config)


def processor_settings(folder: Path | None) -> dict:
    """The audio settings a folder's processor files hold (4.x `preprocessor_config.json`, 5.x
    `processor_config.json`): the feature extractor's fields and the processor's own, merged."""
    out: dict = {}
    if folder is None:
        return out
    for name in ("preprocessor_config.json", "processor_config.json"):
        f = Path(folder) / name
        if not f.is_file():
            continue
        try:
            d = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            continue
        if isinstance(d, dict):
            out.update({k: v for k, v in d.items() if not isinstance(v, dict)})
            if isinstance(d.get("feature_extractor"), dict):
                out.update(d["feature_extractor"])
    return out


def front_end(config: dict, folder: Path | None = None):
    """The family's audio front end (`frontend.py`), from the config and the folder's processor files."""
    from .. import frontend

    kind = family(config).model_type
    settings = processor_settings(folder)
    if kind == "audioflamingo3":
        return frontend.Windows(int(settings.get("max_audio_len", 600) // settings.get("chunk_length", 30)))
    if kind == "qwen2_5_omni":
        return frontend.Whole(float(settings.get("chunk_length", 300)))
    return frontend.Window()


__all__ = ["FAMILIES", "DEFAULT_MODEL", "Family", "family", "family_if_known", "classes", "model_config",
           "front_end", "processor_settings"]
