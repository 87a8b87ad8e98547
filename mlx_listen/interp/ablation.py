"""Head ablation and masking: does a head *cause* the behaviour its attention correlates with?

Two interventions, each a set of hooks installed for one whole answer (prompt and every
generated token), at no cost when not installed:
- **output ablation** at `decoder.blocks.{l}.attn.hook_z` (the head's output before `o_proj`):
  `zero` (set it to 0), `mean` (replace it by the head's mean output over calibration prompts,
  from a small file written by `head_means`), or `scale:F` (multiply it by F; F = 1 is the plain
  model, F = 0 is `zero`);
- **audio masking** (`audio=True`) at `decoder.blocks.{l}.attn.hook_mask`: the selected heads may
  not attend to the `<|AUDIO|>` positions; their softmax renormalises over the other keys. The
  head still runs; it just cannot read the audio (AHAMask-style, arXiv 2509.01787).

`Ablation.hooks(model, prompt)` is a `conditions.Condition.intervene`: an ablated condition gets
its own prefill, since the edit changes every later layer's keys and values. The mode is written
the same way everywhere (`--ablate-mode`): `zero`, `mean`, `scale:F` or `audio` (masking).
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import numpy as np

from ..errors import ListenError
from ..headset import check_heads, parse_heads
from ..hooks import MASK, Capture, Z

MODES = ("zero", "mean", "scale")


@dataclass
class Ablation:
    heads: list[tuple[int, int]]
    mode: str = "zero"  # zero | mean | scale (ignored when `audio` only)
    factor: float = 0.0  # for mode "scale"
    audio: bool = False  # mask the heads' attention to the audio instead of editing their output
    means: dict[int, np.ndarray] | None = field(default=None, repr=False)  # {layer: (heads, head_dim)} for "mean"

    def __post_init__(self):
        self.heads = sorted({(int(l), int(h)) for l, h in self.heads})
        if not self.heads:
            raise ListenError("ablation needs at least one head")
        if self.mode not in MODES:
            raise ListenError(f"ablation mode must be one of zero, mean, scale:F, not {self.mode!r}")
        if not np.isfinite(self.factor):
            raise ListenError(f"the ablation scale must be a finite number, not {self.factor}")
        if self.mode == "mean" and not self.audio and self.means is None:
            raise ListenError("mean ablation needs the heads' mean outputs (mlx-listen ablate means)")

    @property
    def layers(self) -> list[int]:
        return sorted({l for l, _ in self.heads})

    def to_json(self) -> dict:
        return {"heads": [list(h) for h in self.heads], "mode": "audio-mask" if self.audio else self.mode,
                **({"factor": self.factor} if self.mode == "scale" and not self.audio else {})}

    def check(self, model):
        n_layers, n_heads = model.n_layers, model.n_heads
        check_heads(self.heads, n_layers, n_heads)
        if self.mode == "mean" and not self.audio:
            missing = [l for l in self.layers if l not in self.means]
            if missing:
                raise ListenError(f"the means file has no mean output for layers {missing}")
            hd = model.head_dim
            for l in self.layers:
                if self.means[l].shape != (n_heads, hd):
                    raise ListenError(f"the means file was made for another model (layer {l}: "
                                      f"{self.means[l].shape}, this model has ({n_heads}, {hd}))")

    @contextmanager
    def hooks(self, model, prompt):
        """Install the ablation for one answer to `prompt` (all its positions)."""
        self.check(model)
        n_heads = model.n_heads
        pairs = []
        for l in self.layers:
            sel = [h for ll, h in self.heads if ll == l]
            if self.audio:
                pairs.append((MASK.format(l), _audio_mask(sel, n_heads, prompt.audio_positions)))
            else:
                pairs.append((Z.format(l), self._edit(l, sel, n_heads)))
        with model.hooks.using(pairs):
            yield self

    def _edit(self, layer: int, sel: list[int], n_heads: int):
        on = mx.array(np.isin(np.arange(n_heads), sel))[:, None]  # (heads, 1)
        if self.mode == "mean":
            fill = mx.array(self.means[layer].astype(np.float32))  # (heads, head_dim)

            def hook(z, point):
                return mx.where(on, fill.astype(z.dtype), z)
        else:
            f = 0.0 if self.mode == "zero" else self.factor

            def hook(z, point):
                return mx.where(on, z * f, z)

        return hook


def _audio_mask(sel: list[int], n_heads: int, audio_positions: np.ndarray):
    heads = mx.array(np.isin(np.arange(n_heads), sel))[:, None, None]  # (heads, 1, 1)
    audio = np.asarray(audio_positions, np.int64)

    def hook(mask, point):
        L, S = point.length, point.offset + point.length
        cols = np.zeros(S, bool)
        cols[audio[audio < S]] = True
        blocked = heads & mx.array(cols)[None, None]  # (heads, 1, S)
        if mask is None:  # one decode row sees every key
            allowed = mx.ones((1, L, S), dtype=mx.bool_)
        elif isinstance(mask, str):  # "causal": row i (absolute offset + i) sees keys <= offset + i
            allowed = (mx.arange(S)[None] <= (point.offset + mx.arange(L))[:, None])[None]
        else:
            allowed = mask if mask.dtype == mx.bool_ else mask > -1e30
        return allowed & ~blocked[None]  # (1, heads, L, S)

    return hook


MODE_HELP = "zero, mean, scale:F (F a finite number) or audio"


def parse_mode(mode: str) -> tuple[str, float, bool]:
    """`--ablate-mode zero|mean|scale:F|audio` -> (mode, factor, audio masking)."""
    if mode in ("zero", "mean"):
        return mode, 0.0, False
    if mode == "audio":
        return "zero", 0.0, True
    m = re.fullmatch(r"scale:([-+0-9.eE]+)", mode)
    if m:
        try:
            f = float(m.group(1))
        except ValueError:
            f = float("nan")
        if np.isfinite(f):
            return "scale", f, False
    raise ListenError(f"--ablate-mode must be {MODE_HELP}, not {mode!r}")


# -- mean outputs over calibration prompts ---------------------------------------------------------

def head_means(model, prompts: Sequence, layers: Sequence[int] | None = None) -> dict[int, np.ndarray]:
    """Each head's mean output (hook_z) over every position of `prompts`: {layer: (heads, head_dim)}."""
    layers = list(range(model.n_layers)) if layers is None else sorted(set(layers))
    total = {l: None for l in layers}
    n = 0
    for prompt in prompts:
        with Capture(model, [Z.format(l) for l in layers], at=slice(0, None)) as cap:
            model.blocks(prompt.embeddings[None], n_layers=max(layers) + 1)
        for l in layers:
            s = cap.get(Z.format(l))[0].astype(mx.float32).sum(0)  # (heads, head_dim)
            total[l] = s if total[l] is None else total[l] + s
        mx.eval(list(total.values()))
        n += len(prompt.ids)
    if not n:
        raise ListenError("no prompts to average the head outputs over")
    return {l: np.array(v / n) for l, v in total.items()}


def save_means(path, means: dict[int, np.ndarray], meta: dict):
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.safetensors")
    mx.save_safetensors(str(tmp), {f"z_mean.{l}": mx.array(v) for l, v in means.items()},
                        metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})
    tmp.replace(path)


def load_means(path) -> dict[int, np.ndarray]:
    try:
        tensors = mx.load(str(path))
        out = {int(k.split(".")[1]): np.array(v.astype(mx.float32)) for k, v in tensors.items() if k.startswith("z_mean.")}
    except Exception as e:
        raise ListenError(f"{path} is not a head-means file ({e})") from None
    if not out:
        raise ListenError(f"{path} holds no z_mean.<layer> tensors")
    return out


def from_options(spec: str, mode: str = "zero", audio: bool = False, means_file=None) -> Ablation:
    """The `--ablate/--ablate-mode/--ablate-means` options as an `Ablation` (`audio`: the older
    `--ablate-audio` flag, the same as `--ablate-mode audio`)."""
    mode, factor, masked = parse_mode(mode)
    audio = audio or masked
    if mode == "mean" and not audio and means_file is None:
        raise ListenError("--ablate-mode mean needs --ablate-means FILE (from `mlx-listen ablate means`)")
    return Ablation(parse_heads(spec), mode=mode, factor=factor, audio=audio,
                    means=load_means(means_file) if means_file is not None and mode == "mean" else None)
