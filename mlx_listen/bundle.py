"""Reference bundles: what a transformers run recorded, to check an MLX model against it.

A bundle is a folder with two files:
- `manifest.json`: format name and version, the software and hardware of the run, the model's
  identity (config hash, and a weight fingerprint: small blocks of projection matrices with their
  bounds, see `fingerprint_slices`), the dtype, and one entry per item (audio file
  and its sha256, question, system prompt, rendered prompt, token count, which quantities were
  recorded);
- `tensors.safetensors`: the numbers, named `item{i}.{quantity}`.

Readers ignore quantities they do not know and check only those present on both sides, so a
later version can add quantities (head attention mass, listening score, steered logits)
without breaking old bundles; `version` changes only when a meaning changes.

numpy + safetensors; the config is read with the model family's own config class.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from .models import model_config

FORMAT = "mlx-listen-reference"
VERSION = 1
MANIFEST, TENSORS = "manifest.json", "tensors.safetensors"
SKETCH_DIM, SKETCH_SEED = 64, 20260611

# What each recorded quantity is (documentation, and the order of the parity table).
QUANTITIES = {
    "input_ids": "prompt token ids (int32)",
    "features": "log-mel of each clip over its valid frames, concatenated on time (128, sum n_frames)",
    "n_frames": "valid mel frames per clip (int32)",
    "encoder_sketch": "audio-tower output (valid tokens) times a fixed Gaussian (d_model, 64) matrix",
    "encoder_norms": "per-token L2 norms of the audio-tower output",
    "projector_sketch": "projected audio tokens times a fixed Gaussian (hidden, 64) matrix",
    "projector_norms": "per-token L2 norms of the projected audio tokens",
    "hidden_last": "each decoder layer's output at the last prompt position (n_layers, hidden)",
    "logits_last": "logits at the last prompt position (vocab,)",
    "greedy_tokens": "greedy continuation, eos excluded (int32)",
    "audio_mass": "per decoder layer and head, attention mass on the <|AUDIO|> positions at the last prompt "
                  "position (n_layers, n_heads)",
    "listening": "listening score: mean audio_mass over the manifest's `heads` (1,)",
    "steer_direction": "audio-minus-silence direction d(x) (hidden,), manifest `steering` settings",
    "steered_logits_last": "logits at the last prompt position with alpha*d added to the last block's output",
    "steered_greedy_tokens": "greedy continuation with the steering applied, eos excluded (int32)",
}


def sketch_matrix(dim: int) -> np.ndarray:
    """The fixed random projection both sides use to summarise (n_tok, dim) activations."""
    return np.random.default_rng(SKETCH_SEED + dim).standard_normal((dim, SKETCH_DIM)).astype(np.float32) / np.sqrt(dim)


def sketch(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x @ sketch_matrix(x.shape[-1])


def config_hash(config: dict) -> str:
    """Hash of the architecture-defining config fields (the family's `identity()`), insensitive to format
    (4.x/5.x) and dtype."""
    ident = model_config(config).identity()
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


# Weight fingerprint: a leading block of each of a few projection matrices (the family's
# `fingerprint_slices()`, `models.base.fingerprint_blocks`), recorded raw in float32 under
# `manifest["model"]["fingerprint"]`, with the block's bounds under `manifest["model"]["fingerprint_slices"]`
# ({name: [[start, stop], ...]}, module-tree names, torch layout; the reference side maps them to its own).
# Projections are what differs between checkpoints: norm weights (ones) and biases (zeros) of fresh
# checkpoints are identical, which made the first fingerprint useless. The checker compares each
# tensor's block after centring (`parity.check_identity`): a converted, cast or quantised copy of
# the same weights reproduces it within its precision; another checkpoint does not.
FINGERPRINT_BLOCK = (8, 8)
DECODER_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                       "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
ENCODER_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                       "fc1", "fc2")
# The slices bundles stored before `fingerprint_slices` existed (their manifests name only these).
# Embeddings and head keep these slices in new bundles, so older readers still find something to
# compare; the norm weight and the two biases are constant in a fresh checkpoint and are no longer
# recorded (the checker skips constant entries of old bundles).
LEGACY_FINGERPRINT_SLICES = {
    "language_model.model.embed_tokens.weight": (slice(0, 8), slice(0, 16)),
    "language_model.lm_head.weight": (slice(0, 8), slice(0, 16)),
    "language_model.model.norm.weight": (slice(0, 64),),
    "audio_tower.conv1.bias": (slice(0, 64),),
    "multi_modal_projector.linear.bias": (slice(0, 64),),
}
FINGERPRINT_SLICES = LEGACY_FINGERPRINT_SLICES  # the old name (kept for importers)


def fingerprint_slices(config: dict) -> dict[str, tuple[slice, ...]]:
    """The tensors (module-tree names) and blocks a new bundle fingerprints, for a model of this config."""
    return model_config(config).fingerprint_slices()


def slices_to_json(idx: tuple[slice, ...]) -> list[list[int]]:
    return [[s.start or 0, s.stop] for s in idx]


def slices_from_json(spec) -> tuple[slice, ...]:
    """`[[start, stop], ...]` → slices; ValueError if malformed."""
    if not isinstance(spec, list) or not spec:
        raise ValueError(f"expected a list of [start, stop] pairs, got {spec!r}")
    out = []
    for pair in spec:
        if (not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(v, int) for v in pair)
                or not 0 <= pair[0] < pair[1]):
            raise ValueError(f"expected [start, stop] with 0 <= start < stop, got {pair!r}")
        out.append(slice(pair[0], pair[1]))
    return tuple(out)


def fingerprint_values(x: np.ndarray) -> list[float]:
    """A block as a flat list of float32 values, each written with the fewest digits that round-trip."""
    return [float(str(v)) for v in np.asarray(x, np.float32).reshape(-1)]


@dataclass
class Bundle:
    manifest: dict
    tensors: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def items(self) -> list[dict]:
        return self.manifest["items"]

    def get(self, i: int, name: str):
        return self.tensors.get(f"item{i}.{name}")

    def put(self, i: int, name: str, value):
        self.tensors[f"item{i}.{name}"] = np.ascontiguousarray(value)

    def save(self, path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / (TENSORS + ".tmp")
        save_file(self.tensors, str(tmp), metadata={"format": FORMAT, "version": str(VERSION)})
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)  # safetensors writes 0600; a bundle is meant to be carried and shared
        tmp.replace(path / TENSORS)
        (path / MANIFEST).write_text(json.dumps(self.manifest, indent=2, sort_keys=False))
        return path


class BundleError(ValueError):
    pass


def load_bundle(path) -> Bundle:
    """Read and validate a bundle folder (or its manifest.json)."""
    path = Path(path)
    if path.name == MANIFEST:
        path = path.parent
    if not (path / MANIFEST).exists() or not (path / TENSORS).exists():
        raise BundleError(f"{path} is not a reference bundle (needs {MANIFEST} and {TENSORS})")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{path / MANIFEST} is not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{path} is not a {FORMAT} bundle")
    if int(manifest.get("version", 0)) > VERSION:
        raise BundleError(f"{path} is bundle version {manifest['version']}; this mlx-listen reads up to {VERSION}")
    try:
        tensors = load_file(str(path / TENSORS))
    except (SafetensorError, OSError, ValueError) as e:
        raise BundleError(f"{path / TENSORS} is truncated or corrupt ({e})") from None
    bundle = Bundle(manifest, tensors)
    for i, item in enumerate(bundle.items):
        for q in item.get("quantities", []):
            if bundle.get(i, q) is None:
                raise BundleError(f"{path}: item {i} lists {q!r} but the tensor file lacks it (truncated bundle?)")
    return bundle
