"""mlx-listen: Qwen2-Audio in MLX, with head-level attention capture and audio steering.

The package imports nothing heavy: `mlx_listen.load`, `prepare`, `generate`, `ask` are found on
first use (PEP 562), so `mlx-listen --help`, scoring and the MLX-free reference side start fast.
"""

__version__ = "0.1.0"

_LAZY = {
    "load": "load", "prepare": "prompt", "Prompt": "prompt", "generate": "generate",
    "stream_generate": "generate", "ask": "ask", "Answer": "generate",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["load", "prepare", "generate", "stream_generate", "ask", "Answer", "Prompt", "__version__"]
