"""Which model and which items a result belongs to, so results are never mixed by accident.

- `model_signature(model)`: small centred blocks of projection weights (the bundles' fingerprint,
  `bundle.fingerprint_slices`) with the config hash. A cast (bf16/fp16) or quantised (8/4-bit)
  copy of the same checkpoint reproduces it within its precision; another checkpoint does not.
- `check_binding(meta, ...)`: a head set or steering vector records the model it was found on, the
  prompt preset and the calibration items; using it with another model or prompt is refused
  (unless forced, which is then recorded), and using it on its own calibration items is flagged,
  since that manufactures a finding.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .bundle import (
    LEGACY_FINGERPRINT_SLICES,
    config_hash,
    fingerprint_slices,
    fingerprint_values,
    slices_from_json,
    slices_to_json,
)
from .errors import ListenError
from .models import FAMILIES

MAX_REL = 0.5  # per-tensor relative error of the centred blocks; same model <= 0.12 (4-bit), others >= 1.2
MIN_SPREAD = 0.05  # a block whose centred spread is under 5% of its size is (nearly) constant: unusable


def weight(model, name: str) -> mx.array:
    """A parameter by its checkpoint name, in the checkpoint's layout, dequantised if its module is quantised."""
    *path, leaf = name.split(".")
    if path[:2] == ["language_model", "lm_head"] and "lm_head" not in model.language_model:
        path = ["language_model", "model", "embed_tokens"]  # tied: the head is the embedding
    mod = model
    for p in path:
        mod = mod[int(p)] if isinstance(mod, list) else getattr(mod, p)
    if leaf == "weight" and "scales" in mod:
        w = mx.dequantize(mod.weight, mod.scales, mod.get("biases"), group_size=mod.group_size,
                          bits=mod.bits, mode=mod.mode)
    else:
        w = mod[leaf]
    if name.startswith("audio_tower.conv") and leaf == "weight" and w.ndim == 3:
        w = w.transpose(0, 2, 1)  # MLX (out, k, in) -> torch/hub (out, in, k)
    return w


def model_signature(model) -> dict:
    config = model.config.raw
    slices = fingerprint_slices(config)
    return {"family": model.family, "config_hash": config_hash(config),
            "fingerprint": {n: fingerprint_values(np.array(weight(model, n)[idx].astype(mx.float32)))
                            for n, idx in slices.items()},
            "fingerprint_slices": {n: slices_to_json(idx) for n, idx in slices.items()}}


def fingerprint_errors(want: dict, model) -> tuple[dict[str, float], list[str]]:
    """Per usable fingerprint entry, the relative error of our block against the bundle's, both centred;
    and the entries that cannot be used, with why (constant in the bundle, e.g. the norm weights and
    zero biases old bundles stored; unknown slice; malformed; not in this model)."""
    values = want.get("fingerprint") if isinstance(want.get("fingerprint"), dict) else {}
    spec = want.get("fingerprint_slices") if isinstance(want.get("fingerprint_slices"), dict) else {}
    errors, skipped = {}, []
    for name, vals in values.items():
        try:
            idx = slices_from_json(spec[name]) if name in spec else LEGACY_FINGERPRINT_SLICES[name]
        except KeyError:
            skipped.append(f"{name}: no slice recorded")
            continue
        except ValueError as e:
            skipped.append(f"{name}: bad slice ({e})")
            continue
        try:
            ref = np.asarray(vals, np.float64).reshape(-1)
        except (TypeError, ValueError):
            skipped.append(f"{name}: values are not numbers")
            continue
        if ref.size == 0 or not np.isfinite(ref).all():
            skipped.append(f"{name}: empty or non-finite values")
            continue
        try:
            w = weight(model, name)
        except (AttributeError, IndexError, KeyError, ValueError):
            skipped.append(f"{name}: not a tensor of this model")
            continue
        if w.ndim != len(idx):
            skipped.append(f"{name}: slice of {len(idx)} dims for a {w.ndim}-dim tensor")
            continue
        ours = np.array(w[idx].astype(mx.float32), np.float64).reshape(-1)
        if ours.size != ref.size:
            skipped.append(f"{name}: {ref.size} values for a block of {ours.size}")
            continue
        rc, oc = ref - ref.mean(), ours - ours.mean()
        den = float(np.linalg.norm(rc))
        if den == 0.0 or den < MIN_SPREAD * float(np.linalg.norm(ref)):
            skipped.append(f"{name}: (nearly) constant in the bundle")
            continue
        errors[name] = float(np.linalg.norm(oc - rc)) / den
    return errors, skipped



def signature_errors(signature: dict, model) -> dict[str, float]:
    """Per fingerprinted tensor, the relative error of `model`'s centred block against the signature's."""
    return fingerprint_errors(signature, model)[0]


def same_model(signature: dict, model) -> tuple[bool, str]:
    """Whether `model` holds the weights `signature` was taken from (or a cast / quantised copy)."""
    if signature.get("config_hash") != config_hash(model.config.raw):
        return False, "another architecture (config hash)"
    errors = signature_errors(signature, model)
    if not errors:
        return False, "no usable fingerprint"
    worst = max(errors, key=lambda n: np.nan_to_num(errors[n], nan=np.inf))
    return errors[worst] <= MAX_REL, f"{worst}: relative error {errors[worst]:.2f} (limit {MAX_REL:g})"


def check_binding(meta: dict, what: str, *, model=None, prompt: str | None = None, ids=None,
                  force: bool = False, family: str | None = None) -> list[str]:
    """Refuse (ListenError) a head set / vector made for another model or prompt unless `force`;
    return the warnings to show and record (forced mismatches, overlap with its calibration items).
    One made on another family (`family`, or `model`'s) is refused even with `force`: its heads and
    directions mean nothing in another model; `family` alone (a `ModelRef.family`) checks that before
    the model loads."""
    warnings = []
    problems = []
    check_family(meta, what, family if model is None else model.family)
    if model is not None:
        sig = meta.get("model_signature")
        if sig is None:
            warnings.append(f"{what} records no model signature (made by an older mlx-listen): it cannot be checked "
                            "against this model")
        else:
            ok, why = same_model(sig, model)
            if not ok:
                problems.append(f"it was found on another model ({why})")
    if prompt is not None and meta.get("prompt") not in (None, prompt):
        problems.append(f"it was found with the {meta['prompt']!r} prompt, not {prompt!r}")
    if problems:
        msg = f"{what}: {'; '.join(problems)}"
        if not force:
            raise ListenError(msg + "; pass --force to use it anyway (recorded in the outputs)")
        warnings.append(msg + " (used anyway: --force)")
    if ids is not None:
        calib = set(meta.get("calibration_ids") or [])
        overlap = sorted(calib & set(ids))
        if overlap:
            warnings.append(f"{len(overlap)} of these {len(set(ids))} items were used to find {what} (e.g. "
                            f"{overlap[0]}): results on them are not held out and overstate its effect")
    return warnings


def check_family(meta: dict, what: str, family: str | None) -> None:
    """ListenError if `meta`'s model signature names another family than `family` (None: unknown, no check)."""
    sig = meta.get("model_signature") if isinstance(meta, dict) else None
    other = sig.get("family") if isinstance(sig, dict) else None
    if family is not None and other is not None and other != family:
        raise ListenError(f"{what} was found on {_family_name(other)}; this model is {_family_name(family)}: head "
                          "sets and steering vectors do not carry over between model families")


def _family_name(model_type: str) -> str:
    f = FAMILIES.get(model_type)
    return f"a {f.name} model ({model_type})" if f else f"a {model_type!r} model"
