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
| `front_end` | the family's audio front end (`frontend.py`: reading, windows, log-mel, token counts) |
| `encode(features)` | one clip's `AudioFeatures` to (encoder output, audio tokens in the decoder's width) |
| `audio_token_id`, `audio_positions(ids)` | the placeholder id and where it sits in a prompt |
| `family`, `fingerprint_slices()`, `config_identity()` | the `model_type`; what identifies its weights and architecture (`identity`, `bundle`) |
| `n_layers`, `n_heads`, `n_kv_heads`, `head_dim`, `hidden_size`, `vocab_size`, `max_positions` | the decoder's shape |
"""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..audio import AudioFeatures
from ..errors import ListenError
from ..mel import HOP_LENGTH, SAMPLE_RATE, num_audio_tokens

# The weight fingerprint (`bundle.fingerprint_slices`): a leading block of each of a few projection
# matrices (the decoder's first and last layers, the encoder's first and last layers, the projector,
# the embeddings and the head), named by the module tree (the hub's names for Qwen2-Audio and AF3).
BLOCK = (slice(0, 8), slice(0, 8))
EMBED_BLOCK = (slice(0, 8), slice(0, 16))
DECODER_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                       "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
ENCODER_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                       "fc1", "fc2")


def fingerprint_blocks(text, encoder_layers: int, projector: dict) -> dict:
    """The fingerprinted blocks of a Qwen2 decoder (`text`: its config) under a Whisper-style tower of
    `encoder_layers` layers, then the family's `projector` entries."""
    out = {"language_model.model.embed_tokens.weight": EMBED_BLOCK}
    if not text.tie_word_embeddings:
        out["language_model.lm_head.weight"] = EMBED_BLOCK
    for layer in sorted({0, text.num_hidden_layers - 1}):
        out.update({f"language_model.model.layers.{layer}.{p}.weight": BLOCK for p in DECODER_PROJECTIONS})
    for layer in sorted({0, encoder_layers - 1}):
        out.update({f"audio_tower.layers.{layer}.{p}.weight": BLOCK for p in ENCODER_PROJECTIONS})
    out.update(projector)
    return out


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
    def family(self) -> str:
        """The family's `model_type` (`models.FAMILIES`)."""
        return self.config.model_type

    @property
    def front_end(self):
        """The family's audio front end: the one the loader built from the folder, else the config's."""
        front = self.__dict__.get("_front_end")
        if front is None:
            from . import front_end

            front = self.__dict__["_front_end"] = front_end(self.config.raw, getattr(self, "path", None))
        return front

    @front_end.setter
    def front_end(self, value):
        self.__dict__["_front_end"] = value

    @property
    def audio_token_id(self) -> int:
        return self.config.audio_token_index

    def audio_positions(self, ids: Sequence[int]) -> np.ndarray:
        """The positions of the audio placeholder tokens in a prompt."""
        return np.flatnonzero(np.asarray(ids) == self.audio_token_id)

    def encode(self, features, n_frames: int | None = None) -> tuple[mx.array, mx.array]:
        """One clip's `AudioFeatures` -> (the tower's output (n_tok, d), audio tokens (n_tok, hidden)).
        `encode(mel, n_frames)` (one piece's log-mel and its valid frames) is the older form."""
        if n_frames is not None or not isinstance(features, AudioFeatures):
            n = features.shape[-1] if n_frames is None else int(n_frames)
            features = AudioFeatures(features, n, num_audio_tokens(n), n * HOP_LENGTH / SAMPLE_RATE, False)
        return self.encode_features(features)

    def encode_features(self, features: AudioFeatures) -> tuple[mx.array, mx.array]:
        raise NotImplementedError

    def encode_audio(self, features, n_frames: int | None = None) -> mx.array:
        """One clip's features -> its audio tokens in the decoder's width (n_tok, hidden)."""
        return self.encode(features, n_frames)[1]

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
        """Checkpoint keys and arrays -> this module tree's (key surgery only; parts of the checkpoint the
        model does not use are dropped, and `dropped` says what)."""
        return weights

    @property
    def dropped(self) -> dict[str, tuple[int, int]]:
        """What the last `sanitize` dropped as unused: {key prefix: (tensors, bytes)}."""
        return self.__dict__.get("_dropped", {})

    def remap(self, weights: dict, renames, unused=()) -> dict:
        """The family's key surgery: drop keys under an `unused` prefix (counted in `dropped`), rename
        prefixes (`(old, new)`, first match), drop RoPE's cached inverse frequencies, and transpose the
        tower's conv weights from torch's (out, in, k) to MLX's (out, k, in) where still in torch layout
        (an already converted folder loads unchanged)."""
        out, dropped = {}, {}
        for k, v in weights.items():
            hit = next((p for p in unused if k.startswith(p)), None)
            if hit is not None:
                n, size = dropped.get(hit, (0, 0))
                dropped[hit] = (n + 1, size + v.nbytes)
                continue
            for old, new in renames:
                if k.startswith(old):
                    k = new + k[len(old):]
                    break
            if "rotary_emb.inv_freq" in k:
                continue
            if k.startswith("audio_tower.conv") and k.endswith(".weight") and v.ndim == 3:
                if v.shape[-1] == 3 and v.shape[1] != 3:
                    v = v.transpose(0, 2, 1)
            out[k] = v
        self.__dict__["_dropped"] = dropped
        if self.text_config.tie_word_embeddings:
            out.pop("language_model.lm_head.weight", None)
        return out

    # -- identity -----------------------------------------------------------------------------------------
    def fingerprint_slices(self) -> dict:
        """The family's fingerprinted tensors (module-tree names) and blocks (`bundle.fingerprint_slices`)."""
        return self.config.fingerprint_slices()

    def config_identity(self) -> dict:
        """The architecture-defining config fields (`bundle.config_hash`)."""
        return self.config.identity()
