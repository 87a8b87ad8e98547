"""What `mlx-listen convert` quantises, and how: mlx-lm's modes, bits and mixed recipes, checked up front.

- Modes and their defaults are mlx-lm's (`mlx_lm.utils.quantize_model`): affine 64/4, mxfp4 32/4,
  nvfp4 16/4, mxfp8 32/8. Affine takes 2, 3, 4, 5, 6 or 8 bits in groups of 32, 64 or 128; the
  floating-point modes allow exactly their one (group, bits) pair.
- The mixed recipes (`mixed_2_6|3_4|3_6|4_6`) are mlx-lm's own predicate
  (`mlx_lm.convert.mixed_quant_predicate_builder`), affine only, applied to the language model: more
  bits for `v_proj`/`down_proj` in the first and last eighth of the layers and every third layer
  between, and for `lm_head`. Each quantised layer then has its own entry in `config["quantization"]`
  (`{path: {"group_size", "bits", "mode"}}`), which mlx-lm's loader reads as is.
- The language model is quantised (linears and the token embedding, mlx-lm's default); the audio
  tower only with `audio_tower=True` (its linears; never the convs nor the position table, which is
  read as a table, not multiplied); the projector never (a few million parameters).
- Every option combination a mode does not support, and every group size that does not divide the
  input width of a layer to quantise, is refused before anything is written, naming what would work
  (mlx-lm would leave such a layer in float without a word).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_listen.errors import ModelError

MODES = {"affine": (64, 4), "mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}  # (group, bits) defaults
AFFINE_BITS = (2, 3, 4, 5, 6, 8)
AFFINE_GROUPS = (32, 64, 128)
RECIPES = {"mixed_2_6": (2, 6), "mixed_3_4": (3, 4), "mixed_3_6": (3, 6), "mixed_4_6": (4, 6)}  # (low, high)
PARTS = {"audio_tower": "audio tower", "multi_modal_projector": "projector", "language_model": "language model"}


@dataclass(frozen=True)
class Spec:
    """One quantisation: mode, group size, bits (the recipe's low bits for a mixed one), recipe, tower."""

    mode: str = "affine"
    group: int = 64
    bits: int = 4
    recipe: str | None = None
    audio_tower: bool = False

    @property
    def high_bits(self) -> int:
        return RECIPES[self.recipe][1] if self.recipe else self.bits

    def describe(self) -> str:
        what = (f"{self.recipe} (affine {RECIPES[self.recipe][0]}/{RECIPES[self.recipe][1]}-bit, group {self.group})"
                if self.recipe else f"{self.mode} {self.bits}-bit, group {self.group}")
        where = "language model and audio tower" if self.audio_tower else "language model only"
        return f"{what}; {where}"


def options(quantize: bool, dequantize: bool, mode: str = "affine", group: int | None = None,
            bits: int | None = None, recipe: str | None = None, audio_tower: bool = False) -> Spec | None:
    """The quantisation the converter's options ask for (None: none), refused before any work when they conflict."""
    given = [f for f, v in (("--q-mode", mode != "affine"), ("--q-group-size", group is not None),
                            ("--q-bits", bits is not None), ("--quant-predicate", recipe is not None),
                            ("--quantize-audio-tower", audio_tower)) if v]
    if quantize and dequantize:
        raise ModelError("-q/--quantize and -d/--dequantize exclude each other: choose one")
    if not quantize:
        if given:
            raise ModelError(f"{', '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} with -q/--quantize")
        return None
    return spec(mode, group, bits, recipe, audio_tower)


def spec(mode: str = "affine", group: int | None = None, bits: int | None = None, recipe: str | None = None,
         audio_tower: bool = False) -> Spec:
    """Check a combination of options against what the mode supports; the mode's defaults fill the rest."""
    if mode not in MODES:
        raise ModelError(f"unknown quantisation mode {mode!r}; use one of {', '.join(MODES)}")
    g0, b0 = MODES[mode]
    if mode != "affine":
        bad = [f"--q-group-size {group}" for _ in [0] if group not in (None, g0)]
        bad += [f"--q-bits {bits}" for _ in [0] if bits not in (None, b0)]
        if bad:
            raise ModelError(f"--q-mode {mode} quantises in groups of {g0} at {b0} bits only, not with "
                             f"{' and '.join(bad)}; drop {'them' if len(bad) > 1 else 'it'}, or use --q-mode affine "
                             f"(bits {'/'.join(map(str, AFFINE_BITS))}, groups {'/'.join(map(str, AFFINE_GROUPS))})")
        if recipe:
            raise ModelError(f"--quant-predicate {recipe} is an affine recipe (mlx-lm's); it cannot be combined with "
                             f"--q-mode {mode}: drop one of them")
        return Spec(mode, g0, b0, None, audio_tower)
    if group is not None and group not in AFFINE_GROUPS:
        fits = [m for m, (g, _) in MODES.items() if g == group]
        alt = f", or --q-mode {fits[0]} (which quantises in groups of {group})" if fits else ""
        raise ModelError(f"affine quantisation takes --q-group-size {'/'.join(map(str, AFFINE_GROUPS))}, not {group}"
                         f"{alt}")
    if bits is not None and bits not in AFFINE_BITS:
        raise ModelError(f"affine quantisation takes --q-bits {'/'.join(map(str, AFFINE_BITS))}, not {bits}")
    if recipe is not None:
        if recipe not in RECIPES:
            raise ModelError(f"unknown --quant-predicate {recipe!r}; use one of {', '.join(RECIPES)}")
        if bits is not None:
            raise ModelError(f"--quant-predicate {recipe} sets the bits itself ({RECIPES[recipe][0]} and "
                             f"{RECIPES[recipe][1]}); drop --q-bits {bits}")
        return Spec("affine", group or g0, RECIPES[recipe][0], recipe, audio_tower)
    return Spec("affine", group or g0, bits or b0, None, audio_tower)


def _in_tower(path: str) -> bool:
    return path.startswith("audio_tower.") and not path.endswith("embed_positions")


def targets(model: nn.Module, s: Spec) -> dict[str, nn.Module]:
    """The layers `s` quantises: {path: module}."""
    out = {}
    for path, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        if hasattr(m, "to_quantized") and (path.startswith("language_model.") or (s.audio_tower and _in_tower(path))):
            out[path] = m
    return out


def check_widths(model: nn.Module, s: Spec):
    """Refuse a group size that does not divide some layer's input width, naming the settings that would work."""
    widths = {p: m.weight.shape[-1] for p, m in targets(model, s).items()}
    bad = [(p, w) for p, w in widths.items() if w % s.group]
    if not bad:
        return
    shown = "; ".join(f"{p} has {w}" for p, w in bad[:3]) + (f"; {len(bad) - 3} more" if len(bad) > 3 else "")
    divides = lambda g: all(w % g == 0 for w in widths.values())  # noqa: E731
    if s.mode == "affine":
        fits = [g for g in AFFINE_GROUPS if divides(g)]
        modes = [] if s.recipe or fits else [m for m, (g, _) in MODES.items() if m != "affine" and divides(g)]
        options = ([f"--q-group-size {' or '.join(map(str, fits))}"] if fits else []) + [f"--q-mode {m}" for m in modes]
    else:
        options = [f"--q-mode {m}" for m, (g, _) in MODES.items() if m not in ("affine", s.mode) and divides(g)]
        fits = [g for g in AFFINE_GROUPS if divides(g)]
        options += [f"--q-mode affine --q-group-size {' or '.join(map(str, fits))}"] if fits else []
    tower = " (or leave out --quantize-audio-tower)" if s.audio_tower and any(_in_tower(p) for p, _ in bad) else ""
    advice = f"use {' or '.join(options)}{tower}" if options else f"no supported group size divides them all{tower}"
    flag = f"--q-group-size {s.group}" if s.mode == "affine" else f"--q-mode {s.mode} (groups of {s.group})"
    raise ModelError(f"{flag} does not divide the input width of {len(bad)} of the {len(widths)} layers to "
                     f"quantise ({shown}); {advice}")


def predicate(model: nn.Module, s: Spec):
    """mlx-lm's `quant_predicate` for `s`: False, True (the top-level settings) or a per-path dict."""
    from mlx_lm.convert import mixed_quant_predicate_builder

    mixed = mixed_quant_predicate_builder(s.recipe, model, s.group) if s.recipe else None
    tower = {"group_size": s.group, "bits": s.high_bits, "mode": s.mode}

    def pred(path: str, module: nn.Module):
        if path.startswith("language_model."):
            return mixed(path, module) if mixed else True
        if s.audio_tower and _in_tower(path):
            return dict(tower) if mixed else True  # a recipe's tower gets its high bits, recorded per path
        return False

    return pred


def quantize(model: nn.Module, config: dict, s: Spec) -> tuple[nn.Module, dict]:
    """mlx-lm's `quantize_model` (lazy: nothing is computed until a shard is written)."""
    import contextlib
    import io

    from mlx_lm.utils import quantize_model

    floats = {p: m.weight for p, m in targets(model, s).items()}
    with contextlib.redirect_stdout(io.StringIO()):  # its [INFO] print would go to stdout
        model, config = quantize_model(model, config, s.group, s.bits, mode=s.mode, quant_predicate=predicate(model, s))
    if s.mode in ("mxfp4", "nvfp4"):
        _in_row_chunks(model, floats)
    return model, config


CHUNK = 1 << 21  # parameters quantised at once by MLX's CPU fp4 kernels


def _in_row_chunks(model: nn.Module, floats: dict):
    """MLX's CPU fp4 quantisation holds ~80 bytes a parameter while it runs (nvfp4: 3.5 GB for one 4096 x 11008
    matrix; a 7B embedding would need ~50 GB), so those layers are quantised a block of rows at a time
    (groups run along a row: the result is identical), still lazily."""
    import mlx.core as mx

    BLOCKS.clear()  # what an earlier, failed conversion left
    for p, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        w = floats.get(p)
        if "scales" not in m or w is None or w.size <= CHUNK:
            continue
        rows = max(1, CHUNK // w.shape[-1])
        parts = [mx.quantize(w[i:i + rows], group_size=m.group_size, bits=m.bits, mode=m.mode)
                 for i in range(0, w.shape[0], rows)]
        m.weight = mx.concatenate([q[0] for q in parts])
        m.scales = mx.concatenate([q[1] for q in parts])
        BLOCKS[id(m.weight)] = BLOCKS[id(m.scales)] = parts  # evaluated one by one (`blocks_first`)


BLOCKS: dict[int, list] = {}


def blocks_first(a) -> bool:
    """Evaluate the row blocks `a` is made of one at a time (evaluated together, MLX runs them side by side and
    the peak is the whole matrix's again); True if `a` had blocks (then never schedule it ahead)."""
    import mlx.core as mx

    parts = BLOCKS.pop(id(a), None)
    for q in parts or ():
        mx.eval(q)
    return parts is not None


def bits_per_part(model: nn.Module) -> dict[str, float]:
    """Stored bits per weight of each top-level part (and the whole), from shapes alone (lazy arrays stay lazy)."""
    from mlx_lm.utils import compute_bits_per_weight

    out = {PARTS.get(name, name.replace("_", " ")): compute_bits_per_weight(part)
           for name, part in model.children().items() if isinstance(part, nn.Module)}
    out["model"] = compute_bits_per_weight(model)
    return out


def report(model: nn.Module, verb: str = "Quantized"):
    """mlx-lm's bits-per-weight line, then one per part, on stderr."""
    import sys

    bits = bits_per_part(model)
    print(f"[INFO] {verb} model with {bits.pop('model'):.3f} bits per weight.", file=sys.stderr)
    print("[INFO] Bits per weight: " + ", ".join(f"{k} {v:.3f}" for k, v in bits.items()), file=sys.stderr)


def dequantize(model: nn.Module) -> nn.Module:
    """mlx-lm's `dequantize_model`, with the result in the layer's own float dtype: affine scales carry it;
    the floating-point modes' scales are uint8, so those layers take the model's (its final norm's) dtype."""
    from mlx_lm.utils import dequantize_model

    dtype = model.dtype
    wanted = {p: (m.scales.dtype if m.mode == "affine" else dtype)
              for p, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module) if "scales" in m}
    model = dequantize_model(model)
    mods = dict(tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module))
    for p, t in wanted.items():
        if mods[p].weight.dtype != t:
            mods[p].weight = mods[p].weight.astype(t)
    return model


def transient(s: Spec | None, src_bytes: int, cast_bytes: int) -> float:
    """Bytes alive per output byte while one tensor is computed, at most (`convert._evaluate`): the output plus
    its input (`src_bytes` a parameter) and a cast of it (`cast_bytes`), over the output's bytes a parameter."""
    if s is None:  # a cast or a dequantisation: the output and an input at most twice its size
        return 3
    scale = 1 / s.group if s.mode != "affine" else 2 * (cast_bytes or src_bytes) / s.group
    out = s.bits / 8 + scale
    return 1 + (src_bytes + cast_bytes) / out


def is_quantised(config: dict) -> bool:
    return bool(config.get("quantization") or config.get("quantization_config"))


__all__ = ["MODES", "AFFINE_BITS", "AFFINE_GROUPS", "RECIPES", "Spec", "options", "spec", "report", "targets", "check_widths",
           "predicate", "quantize", "bits_per_part", "dequantize", "transient", "is_quantised"]
