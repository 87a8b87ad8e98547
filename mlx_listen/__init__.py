"""mlx-listen: Qwen2-Audio in MLX, with head-level attention capture and audio steering."""

__version__ = "0.1.0"

# Without MLX (e.g. the CUDA box of a reference run) the MLX-free modules (prompt, audio file
# loading, bundles, MMAU scoring) still import; the model API needs MLX.
try:
    import mlx.core  # noqa: F401
except ImportError:
    pass
else:
    from .generate import generate, prepare, stream_generate  # noqa: F401
    from .load import load  # noqa: F401

__all__ = ["load", "prepare", "generate", "stream_generate", "__version__"]
