"""Tiny random checkpoints of every family, built with transformers in the hub's key layout, converted with
`mlx-listen convert`, once per session (`family_model`), and what the parity tests compare.

| variant | family | decoder | weights | config |
|---|---|---|---|---|
| `af3-gqa` | Audio Flamingo 3 | 4 query / 2 KV heads | sharded (several files + index) | transformers 5 |
| `af3-mha` | Audio Flamingo 3 | 4 / 4 | one file | transformers 5 |
| `omni-gqa` | Qwen2.5-Omni | 4 / 2 | one file | the hub's older style (`rope_scaling.mrope_section`) |
| `omni-mha` | Qwen2.5-Omni | 4 / 4 | sharded | transformers 5 (`rope_parameters`) |

Omni's encoder chunks are 2·n_window = 16 frames here (0.16 s), so every clip crosses many chunks and a
short last one; AF3's 30 s windows are crossed by the clips over 30 s the tests use.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

from . import INIT, Tiny

FAMILY_VARIANTS = {
    "af3-gqa": ("af3", dict(kv_heads=2, seed=0, shard="40KB")),
    "af3-mha": ("af3", dict(kv_heads=4, seed=1)),
    "omni-gqa": ("omni", dict(kv_heads=2, seed=0, legacy_config=True)),
    "omni-mha": ("omni", dict(kv_heads=4, seed=1, legacy_config=False, shard="60KB")),
}


class FamilyTiny(Tiny):
    """`Tiny` for the new families: `hf_model` is what transformers runs (Omni: the thinker)."""

    def __init__(self, root: Path, name: str):
        from mlx_listen_convert.convert import convert
        from mlx_listen_convert.reference.tiny_families import build_tiny_af3, build_tiny_omni

        kind, kw = FAMILY_VARIANTS[name]
        build = build_tiny_af3 if kind == "af3" else build_tiny_omni
        self.name, self.kind = name, kind
        self.hf_path = root / f"{name}-hf"
        self.hf_model, self.hf_processor = build(self.hf_path, init_range=INIT, **kw)
        self.mlx_path = convert(str(self.hf_path), str(root / f"{name}-mlx"), progress=False)
        self._mlx = None
        self._refs = {}


_BUILT: dict[str, FamilyTiny] = {}


def family_model(root, name) -> FamilyTiny:
    if name not in _BUILT:
        _BUILT[name] = FamilyTiny(root, name)
    return _BUILT[name]


def valid_features(ref: dict) -> np.ndarray:
    """transformers' log-mel of a one-clip prompt over its valid frames (every window's, AF3), (128, n)."""
    mask, feats = ref["feature_attention_mask"], ref["input_features"]
    return np.concatenate([f[:, :int(m.sum())] for f, m in zip(feats, mask)], axis=1)


def with_features(front_feats, ref: dict, clip_rows):
    """`AudioFeatures` carrying transformers' own log-mel (the rows of one clip), so later stages are
    compared on identical inputs: AF3's windows side by side, Omni's valid frames."""
    mask, feats = ref["feature_attention_mask"], ref["input_features"]
    if front_feats.windows:
        front_feats.mel = mx.array(np.concatenate([feats[r] for r in clip_rows], axis=1))
    else:
        r = clip_rows[0]
        front_feats.mel = mx.array(feats[r][:, :int(mask[r].sum())])
    return front_feats
