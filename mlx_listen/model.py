"""`Qwen2AudioForConditionalGeneration` in MLX: audio tower + projector + Qwen2 decoder.

The module tree mirrors the hub checkpoint (`audio_tower.*`, `multi_modal_projector.*`,
`language_model.model.*`, `language_model.lm_head.*`), so loading is `sanitize` (two conv
transposes and prefix renames for transformers-5 in-memory names) and a strict load.

`Model.__call__` is mlx-lm's model contract (`inputs, cache, input_embeddings -> logits`), so
mlx-lm's `generate_step`, KV cache and sampler drive it directly once the audio features have
been merged into the input embeddings by `Model.embed`.
"""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import ModelConfig
from .encoder import AudioEncoder, Projector
from .errors import ListenError
from .hooks import Hooks
from .language import LanguageModel

# transformers 5 renames the module tree in memory; `save_pretrained` and the hub use the left.
_IN_MEMORY_PREFIXES = [
    ("model.language_model.", "language_model.model."),
    ("model.audio_tower.", "audio_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
]


class Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = self.args = config
        self.model_type = config.model_type
        self.hooks = Hooks()  # every hook point (hooks.py); a plain attribute, outside the MLX tree
        self.audio_tower = AudioEncoder(config.audio_config, self.hooks)
        self.multi_modal_projector = Projector(config.audio_config.d_model, config.text_config.hidden_size)
        self.language_model = LanguageModel(config.text_config, self.hooks)

    # -- mlx-lm model contract ---------------------------------------------------------------
    def __call__(self, inputs, cache=None, input_embeddings=None):
        return self.language_model(inputs, cache, input_embeddings)

    @property
    def layers(self):
        return self.language_model.model.layers

    def hook_points(self) -> list[str]:
        """Every hook point's name (see `hooks.py`)."""
        return self.hooks.names()

    def sanitize(self, weights: dict) -> dict:
        out = {}
        for k, v in weights.items():
            for old, new in _IN_MEMORY_PREFIXES:
                if k.startswith(old):
                    k = new + k[len(old):]
                    break
            if "rotary_emb.inv_freq" in k:
                continue
            # torch Conv1d is (out, in, k); MLX is (out, k, in). Transpose only what is still in
            # torch layout, so an already converted folder loads unchanged.
            if k.startswith("audio_tower.conv") and k.endswith(".weight") and v.ndim == 3:
                if v.shape[-1] == 3 and v.shape[1] != 3:
                    v = v.transpose(0, 2, 1)
            out[k] = v
        if self.config.text_config.tie_word_embeddings:
            out.pop("language_model.lm_head.weight", None)
        return out

    # -- audio ---------------------------------------------------------------------------------
    def encode_audio(self, mel: mx.array, n_frames: int) -> mx.array:
        """One clip's padded log-mel (128, 3000) → projected audio tokens (n_tok, hidden)."""
        return self.multi_modal_projector(self.audio_tower(mel, n_frames))

    def embed(self, input_ids: Sequence[int] | np.ndarray, audio: Sequence[mx.array] = ()) -> mx.array:
        """Token embeddings with each clip's projected features written over its `<|AUDIO|>` run.

        `audio` holds one (n_tok, hidden) array per clip, in prompt order. The placeholder count
        must equal the feature count: a mismatch is how audio silently goes missing.
        """
        ids = np.asarray(input_ids).reshape(-1)
        is_audio = ids == self.config.audio_token_index
        n_feat = sum(int(a.shape[0]) for a in audio)
        if int(is_audio.sum()) != n_feat:
            raise ListenError(
                f"the prompt has {int(is_audio.sum())} <|AUDIO|> positions but the audio gives "
                f"{n_feat} features"
            )
        emb = self.language_model.model.embed_tokens(mx.array(ids))
        if n_feat == 0:
            return emb
        feats = mx.concatenate(list(audio), axis=0).astype(emb.dtype)
        index = mx.array(np.maximum(np.cumsum(is_audio) - 1, 0))
        return mx.where(mx.array(is_audio)[:, None], feats[index], emb)
