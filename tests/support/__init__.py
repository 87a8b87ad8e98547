"""Test helpers shared by the suite (importable as `support`: pyproject's pytest `pythonpath`): tiny
random Qwen2-Audio checkpoints built with transformers at test time, saved in the hub's key layout
and converted with `mlx-listen convert`; synthetic clips; the CLI in-process.

Two variants, like the real model and its common relatives:
- `gqa`: 4 query heads / 2 KV heads, transformers-5 config format;
- `mha`: 4 / 4 heads (the real model is MHA), the hub's sparse legacy config format.
Init scale 0.1 gives logits of a few units (not flat) while fp32 parity stays ~1e-6.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface-hub reads its settings: no test downloads
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parents[1]  # tests/
DATA = TESTS / "data"  # the committed test data (MMAU answer keys, CUDA reference bundles, the hub config)
SR = 16000
INIT = 0.1
VARIANTS = {
    "gqa": dict(kv_heads=2, seed=0, legacy_config=False),
    "mha": dict(kv_heads=4, seed=1, legacy_config=True),
}


def tone(seconds: float, freq: float = 440.0, seed: int = 0) -> np.ndarray:
    """A tone with a little noise and a rising envelope: deterministic, not silent, not flat."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * SR))) / SR
    env = 0.2 + 0.8 * t / max(seconds, 1e-9)
    x = 0.5 * env * np.sin(2 * np.pi * freq * t) + 0.05 * rng.standard_normal(t.size)
    return x.astype(np.float32)


class Tiny:
    """One tiny checkpoint: the HF folder, the torch model/processor, the converted MLX folder."""

    def __init__(self, root: Path, name: str):
        from mlx_listen_convert.convert import convert
        from mlx_listen_convert.reference.tiny import build_tiny

        self.name = name
        self.hf_path = root / f"{name}-hf"
        self.hf_model, self.hf_processor = build_tiny(self.hf_path, init_range=INIT, **VARIANTS[name])
        self.mlx_path = convert(str(self.hf_path), str(root / f"{name}-mlx"), progress=False)
        self._mlx = None
        self._refs = {}

    @property
    def mlx(self):
        """`(model, processor)` loaded from the converted folder (cached)."""
        if self._mlx is None:
            from mlx_listen.load import load

            self._mlx = load(self.mlx_path)
        return self._mlx

    def reference(self, key, clips, question="What is this sound?", system=None, max_new_tokens=0):
        """transformers' outputs for a prompt (cached by `key`)."""
        from mlx_listen_convert.reference import hf as R

        if key not in self._refs:
            self._refs[key] = R.run(self.hf_model, self.hf_processor, clips, question, system,
                                    max_new_tokens=max_new_tokens)
        return self._refs[key]


_BUILT: dict[str, Tiny] = {}


def tiny_model(root, name) -> Tiny:
    """The tiny checkpoint `name` under `root`, built once per session."""
    if name not in _BUILT:
        _BUILT[name] = Tiny(root, name)
    return _BUILT[name]


def invoke(*args, env=None):
    """`mlx-listen ARGS...` in-process (click's CliRunner; stdout and stderr kept apart)."""
    from click.testing import CliRunner

    from mlx_listen.cli import main

    return CliRunner(env=env).invoke(main, [str(a) for a in args])


def ok(result):
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    return result
