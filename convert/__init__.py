"""`mlx_listen_convert`: everything that touches Hugging Face / PyTorch weights. `convert` (HF -> MLX,
no torch) and, in `reference/`, the PyTorch reference side (transformers; the `reference` extra),
which the MLX runtime never imports. Installed under this name from the `convert/` folder."""

if __name__ != "mlx_listen_convert":  # e.g. `import convert` from the repository root: one module per file
    raise ImportError(f"convert/ is the package mlx_listen_convert; import it by that name, not {__name__!r}")
