"""mlx-listen: Qwen2-Audio in MLX, with head-level attention capture and audio steering."""

__version__ = "0.1.0"

from .generate import generate, prepare, stream_generate  # noqa: E402
from .load import load  # noqa: E402

__all__ = ["load", "prepare", "generate", "stream_generate", "__version__"]
