"""mlx-listen: audio-language models (Qwen2-Audio) in MLX, with head-level attention capture,
audio-specialist heads and audio–silence steering.

The package imports nothing heavy: the names below are found on first use (PEP 562), so
`mlx-listen --help`, scoring and the reference side start fast. The tree: `models/` (one file per
family behind one interface), `hooks.py` (the hook namespace and captures), `interp/` (mechanisms),
`method/` (the method and its runs), `eval/` (MMAU and the eval runner), `cli/` (click).
"""

__version__ = "0.1.0"

_LAZY = {
    "load": "load", "ModelRef": "load", "prepare": "prompt", "Prompt": "prompt", "generate": "answers",
    "stream_generate": "answers", "Answer": "answers", "ask": "asking", "HeadSet": "headset",
    "run_with_cache": "hooks", "run_with_hooks": "hooks", "Capture": "hooks",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [*_LAZY, "__version__"]
