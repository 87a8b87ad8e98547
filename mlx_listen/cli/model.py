"""`mlx-listen convert`, `mlx-listen parity` and `mlx-listen version`: the model's files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .options import DIR


@click.command()
@click.option("--hf-path", "--model", "hf_path", required=True, help="HF folder or repo id to convert.")
@click.option("--mlx-path", default="mlx_model", show_default=True, type=click.Path(path_type=Path),
              help="Output folder.")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
              help="Cast weights (default: keep the checkpoint's dtype).")
@click.option("-q", "--quantize", is_flag=True, help="Quantise the language model (mlx-lm's quantisation).")
@click.option("--q-mode", type=click.Choice(["affine", "mxfp4", "nvfp4", "mxfp8"]), default="affine",
              show_default=True, help="Quantisation mode; its defaults (group/bits): affine 64/4, mxfp4 32/4, "
              "nvfp4 16/4, mxfp8 32/8.")
@click.option("--q-bits", type=click.Choice(["2", "3", "4", "5", "6", "8"]), default=None,
              help="Bits per weight (affine; default: the mode's).")
@click.option("--q-group-size", type=click.Choice(["16", "32", "64", "128"]), default=None,
              help="Weights per quantisation group (affine: 32, 64 or 128; default: the mode's).")
@click.option("--quant-predicate", type=click.Choice(["mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6"]),
              default=None, help="mlx-lm's mixed-bit recipe for the language model (affine; per-layer bits in "
              "config.json).")
@click.option("--quantize-audio-tower", is_flag=True, help="Also quantise the audio tower's linear layers "
              "(default: float; convs and the projector are never quantised).")
@click.option("-d", "--dequantize", is_flag=True, help="Write a quantised MLX folder back in float.")
@click.option("--force", is_flag=True, help="Replace an existing model folder (one with config.json) or an "
              "empty folder; never a file, the source checkpoint, or a folder inside or around it.")
def convert(hf_path, mlx_path, dtype, quantize, q_mode, q_bits, q_group_size, quant_predicate, quantize_audio_tower,
            dequantize, force):
    """Convert a Hugging Face checkpoint (Qwen2-Audio, Audio Flamingo 3, Qwen2.5-Omni) to an MLX folder."""
    from mlx_listen_convert.convert import convert as run

    out = run(hf_path, str(mlx_path), dtype=dtype, quantize=quantize, q_mode=q_mode,
              q_bits=int(q_bits) if q_bits else None, q_group_size=int(q_group_size) if q_group_size else None,
              quant_predicate=quant_predicate, quantize_audio_tower=quantize_audio_tower, dequantize=dequantize,
              force=force)
    click.echo(f"[INFO] Saved the MLX model to {out}", err=True)


@click.command()
@click.argument("bundle", type=DIR)
@click.option("--model", "-M", default=None, help="MLX or HF folder or repo id (default: the bundle's model).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def parity(bundle, model, as_json):
    """Check an MLX model against a reference BUNDLE from `mlx-listen-reference` (exit 0 only if all pass)."""
    from mlx_listen.parity import parity as run

    report = run(bundle, model, progress=not as_json)
    click.echo(json.dumps(report.to_dict()) if as_json else report.table())
    sys.exit(0 if report.ok else 1)


@click.command()
def version():
    """Print the versions of mlx-listen, mlx and mlx-lm."""
    import mlx.core as mx
    import mlx_lm

    from mlx_listen import __version__

    click.echo(f"mlx-listen {__version__}, mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}")
