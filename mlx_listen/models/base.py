"""The model interface: what every audio-LM family gives the rest of mlx-listen.

A family file (`qwen2_audio.py`, one per `model_type`) defines its config and a `Model` that
subclasses `AudioLM`: the audio tower and projector under the checkpoint's own names, a Qwen2
decoder as `language_model` (`qwen2.LanguageModel`), `encode` (features to audio tokens) and
`sanitize` (key surgery). Everything else (prompts, answers, capture, steering, patching, the
methods and runs) uses only what this class offers, never a family's attribute names:

| member | what |
|---|---|
| `__call__(inputs, cache, input_embeddings)`, `layers` | mlx-lm's model contract: `generate_step` and the KV cache drive it |
| `hooks`, `hook_points()` | the hook registry (`hooks.py`) with every point of the decoder and the tower |
| `blocks(h, cache, n_layers, start)` | decoder blocks alone: the residual stream before the final norm |
| `unembed(h)`, `head(x)`, `final_norm` | final norm + `lm_head`; `lm_head` alone; the norm module |
| `embed_tokens(ids)`, `embed(ids, audio)` | token embeddings; with each clip's audio tokens written over its placeholder run |
| `encode(mel, n_frames)` | one clip's features to (encoder output, audio tokens in the decoder's width) |
| `audio_token_id`, `audio_positions(ids)` | the placeholder id and where it sits in a prompt |
| `n_layers`, `n_heads`, `n_kv_heads`, `head_dim`, `hidden_size`, `vocab_size`, `max_positions` | the decoder's shape |
"""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import ListenError


class AudioLM(nn.Module):
    """Base of every family's `Model`; subclasses set `config`, `hooks`, `language_model`."""

    # -- mlx-lm model contract ---------------------------------------------------------------------
    def __call__(self, inputs, cache=None, input_embeddings=None):
        return self.language_model(inputs, cache, input_embeddings)

    @property
    def layers(self):
        return self.language_model.model.layers

    def hook_points(self) -> list[str]:
        """Every hook point's name (see `hooks.py`)."""
        return self.hooks.names()

    # -- the decoder ------------------------------------------------------------------------------------
    @property
    def text_config(self):
        return self.config.text_config

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_heads(self) -> int:
        return self.text_config.num_attention_heads

    @property
    def n_kv_heads(self) -> int:
        return self.text_config.num_key_value_heads

    @property
    def head_dim(self) -> int:
        return self.text_config.head_dim

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.text_config.vocab_size

    @property
    def max_positions(self) -> int:
        return self.text_config.max_position_embeddings

    @property
    def final_norm(self) -> nn.RMSNorm:
        return self.language_model.model.norm

    @property
    def dtype(self) -> mx.Dtype:
        """The activation dtype (norm weights are never quantised)."""
        return self.final_norm.weight.dtype

    def blocks(self, h: mx.array, cache=None, n_layers: int | None = None, start: int = 0) -> mx.array:
        """Decoder blocks `start`..`n_layers`-1 on embeddings or a residual `h` (B, L, hidden)."""
        return self.language_model.model.blocks(h, cache, n_layers, start)

    def unembed(self, h: mx.array) -> mx.array:
        """Logits of a residual taken after the last block: final norm, then `lm_head`."""
        return self.language_model.unembed(h)

    def head(self, x: mx.array) -> mx.array:
        """`lm_head` alone (no final norm)."""
        return self.language_model.head(x)

    def embed_tokens(self, ids) -> mx.array:
        return self.language_model.model.embed_tokens(ids if isinstance(ids, mx.array) else mx.array(ids))

    # -- audio ------------------------------------------------------------------------------------------
    @property
    def audio_token_id(self) -> int:
        return self.config.audio_token_index

    def audio_positions(self, ids: Sequence[int]) -> np.ndarray:
        """The positions of the audio placeholder tokens in a prompt."""
        return np.flatnonzero(np.asarray(ids) == self.audio_token_id)

    def encode(self, mel: mx.array, n_frames: int) -> tuple[mx.array, mx.array]:
        """One clip's features -> (the tower's output, audio tokens (n_tok, hidden))."""
        raise NotImplementedError

    def encode_audio(self, mel: mx.array, n_frames: int) -> mx.array:
        """One clip's features -> its audio tokens in the decoder's width (n_tok, hidden)."""
        return self.encode(mel, n_frames)[1]

    def embed(self, input_ids: Sequence[int] | np.ndarray, audio: Sequence[mx.array] = ()) -> mx.array:
        """Token embeddings with each clip's audio tokens written over its placeholder run.

        `audio` holds one (n_tok, hidden) array per clip, in prompt order. The placeholder count
        must equal the feature count: a mismatch is how audio silently goes missing.
        """
        ids = np.asarray(input_ids).reshape(-1)
        is_audio = ids == self.audio_token_id
        n_feat = sum(int(a.shape[0]) for a in audio)
        if int(is_audio.sum()) != n_feat:
            raise ListenError(f"the prompt has {int(is_audio.sum())} audio positions but the audio gives "
                              f"{n_feat} features")
        emb = self.embed_tokens(ids)
        if n_feat == 0:
            return emb
        feats = mx.concatenate(list(audio), axis=0).astype(emb.dtype)
        index = mx.array(np.maximum(np.cumsum(is_audio) - 1, 0))
        return mx.where(mx.array(is_audio)[:, None], feats[index], emb)

    def sanitize(self, weights: dict) -> dict:
        """Checkpoint keys and arrays -> this module tree's (key surgery only)."""
        return weights
