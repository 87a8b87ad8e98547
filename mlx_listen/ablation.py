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
its own prefill, since the edit changes every later layer's keys and values.
"""

from __future__ import annotations

import json
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from . import mmau
from .capture import Capture, Z
from .conditions import Condition
from .errors import ListenError
from .heads import HeadSet
from .hooks import decoder_point
from .load import load, model_shape
from .prompt import prepare
from .stats import matched_random_sets

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
        n_layers, n_heads = len(model.layers), model.config.text_config.num_attention_heads
        bad = [(l, h) for l, h in self.heads if not (0 <= l < n_layers and 0 <= h < n_heads)]
        if bad:
            raise ListenError(f"heads {bad} do not exist in this model ({n_layers} layers x {n_heads} heads)")
        if self.mode == "mean" and not self.audio:
            missing = [l for l in self.layers if l not in self.means]
            if missing:
                raise ListenError(f"the means file has no mean output for layers {missing}")
            hd = model.config.text_config.head_dim
            for l in self.layers:
                if self.means[l].shape != (n_heads, hd):
                    raise ListenError(f"the means file was made for another model (layer {l}: "
                                      f"{self.means[l].shape}, this model has ({n_heads}, {hd}))")

    @contextmanager
    def hooks(self, model, prompt):
        """Install the ablation for one answer to `prompt` (all its positions)."""
        self.check(model)
        n_heads = model.config.text_config.num_attention_heads
        pairs = []
        for l in self.layers:
            sel = [h for ll, h in self.heads if ll == l]
            if self.audio:
                pairs.append((decoder_point(l, "attn.hook_mask"), _audio_mask(sel, n_heads, prompt.audio_positions)))
            else:
                pairs.append((decoder_point(l, "attn.hook_z"), self._edit(l, sel, n_heads)))
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


def parse_heads(spec: str, headset_loader=None) -> list[tuple[int, int]]:
    """`--ablate`: a HEADS.json path, or heads written `L.H,L.H` (e.g. `3.7,12.0`)."""
    if re.fullmatch(r"\s*\d+\.\d+(\s*,\s*\d+\.\d+)*\s*", spec):
        return [(int(l), int(h)) for l, h in (p.strip().split(".") for p in spec.split(","))]
    path = Path(spec)
    if not path.is_file():
        raise ListenError(f"--ablate takes a HEADS.json file or heads written L.H,L.H (e.g. 3.7,12.0); "
                          f"{spec!r} is neither")
    return list(HeadSet.load(path).heads)


def parse_mode(mode: str) -> tuple[str, float]:
    """`--ablate-mode zero|mean|scale:F` -> (mode, factor)."""
    if mode in ("zero", "mean"):
        return mode, 0.0
    m = re.fullmatch(r"scale:([-+0-9.eE]+)", mode)
    if m:
        try:
            f = float(m.group(1))
        except ValueError:
            f = float("nan")
        if np.isfinite(f):
            return "scale", f
    raise ListenError(f"--ablate-mode must be zero, mean or scale:F (F a finite number), not {mode!r}")


# -- mean outputs over calibration prompts ---------------------------------------------------------

def head_means(model, prompts: Sequence, layers: Sequence[int] | None = None) -> dict[int, np.ndarray]:
    """Each head's mean output (hook_z) over every position of `prompts`: {layer: (heads, head_dim)}."""
    layers = list(range(len(model.layers))) if layers is None else sorted(set(layers))
    total = {l: None for l in layers}
    n = 0
    for prompt in prompts:
        with Capture(model, [Z.format(l) for l in layers], at=slice(0, None)) as cap:
            model.language_model.model.blocks(prompt.embeddings[None], n_layers=max(layers) + 1)
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
    """The `--ablate/--ablate-mode/--ablate-audio/--ablate-means` options as an `Ablation`."""
    mode, factor = parse_mode(mode)
    if mode == "mean" and not audio and means_file is None:
        raise ListenError("--ablate-mode mean needs --ablate-means FILE (from `mlx-listen ablate means`)")
    return Ablation(parse_heads(spec), mode=mode, factor=factor, audio=audio,
                    means=load_means(means_file) if means_file is not None and mode == "mean" else None)


def condition(spec: Ablation, name: str = "ablated"):
    """An ablated condition for `conditions.Answerer` / `eval` (its own prefill)."""
    return Condition(name, intervene=spec.hooks, settings={"ablation": spec.to_json()})


def conditions_for(spec: Ablation, model_path, n_controls: int = 0, seed: int = 0) -> list:
    """`eval --ablate … --ablate-controls N`: the ablated condition and N matched random-head ones
    (sized from the model's config, without loading it)."""
    conds = [condition(spec, "ablated")]
    if n_controls:
        n_layers, n_heads = model_shape(model_path)
        conds += [condition(c, f"ablate-random-{i + 1}")
                  for i, c in enumerate(matched_controls(spec, n_layers, n_heads, n_controls, seed))]
    return conds


def matched_controls(spec: Ablation, n_layers: int, n_heads: int, n: int, seed: int = 0) -> list[Ablation]:
    """Random head sets matched to `spec` (same heads per layer profile, other heads, other layers),
    ablated the same way: the control for "these heads matter"."""
    if n == 0:
        return []
    return [replace(spec, heads=hs) for hs in matched_random_sets(spec.heads, n_layers, n_heads, n_sets=n, seed=seed)]


def means_from_data(model_path, data, audio_dir, out, *, limit=None, prompt: str = "r1-aqa", progress: bool = True):
    """`mlx-listen ablate means`: `head_means` over a data set's prompts, saved to `out`."""
    items = mmau.load_items(data)[:limit]
    model, processor = load(model_path)
    failed, sizes = [], []

    def prompts():  # one at a time: the prompts of a whole data set would not fit in memory
        for item in tqdm(items, desc="means", unit="item", file=sys.stderr, disable=not progress):
            try:
                p = prepare(model, processor, [Path(audio_dir) / item["audio_id"]], mmau.build_prompt(item, prompt))
            except ListenError as e:
                failed.append({"id": item["id"], "error": str(e)})
                continue
            sizes.append(len(p.ids))
            yield p

    means = head_means(model, prompts())
    meta = {"model": str(model_path), "data_sha256": mmau.file_sha256(data), "prompt": prompt,
            "n_items": len(sizes), "n_positions": sum(sizes), "failed": failed, "positions": "every prompt position"}
    path = Path(out)
    save_means(path, means, meta)
    return path, meta
