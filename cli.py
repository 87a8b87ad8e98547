"""`mlx-listen`: the command line, a thin click layer over `mlx_listen` and `mlx_listen.convert`.

Installed as `mlx_listen.app.cli` (see pyproject.toml). User errors (`ListenError`) print one
line on stderr and exit 1, never a traceback.
"""

from __future__ import annotations

import functools
import json
import sys

import click

from mlx_listen import __version__
from mlx_listen.errors import ListenError
from mlx_listen.load import DEFAULT_MODEL


def _friendly(fn):
    """Turn user-facing errors into one line on stderr and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except ListenError as e:
            click.echo(f"Error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(130)

    return wrapper


def _versions() -> str:
    import mlx.core as mx
    import mlx_lm

    return f"mlx-listen {__version__}, mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(message="%(version)s", version=__version__, package_name="mlx-listen")
def main():
    """Run Qwen2-Audio in MLX, see whether it listens to the audio, and steer it to listen more."""


@main.command()
@click.argument("args", nargs=-1, required=True, metavar="CLIP... QUESTION")
@click.option("--model", "-M", default=DEFAULT_MODEL, show_default=True,
              help="MLX or HF model folder, or a Hugging Face repo id.")
@click.option("--max-tokens", "-m", type=click.IntRange(min=1), default=256, show_default=True,
              help="Most tokens to generate.")
@click.option("--temp", "--temperature", "temp", default=0.0, show_default=True,
              help="Sampling temperature; 0 is greedy.")
@click.option("--top-p", default=0.0, show_default=True, help="Nucleus sampling (0: off).")
@click.option("--top-k", default=0, show_default=True, help="Top-k sampling (0: off).")
@click.option("--min-p", default=0.0, show_default=True, help="Min-p sampling (0: off).")
@click.option("--repetition-penalty", type=float, default=None, help="mlx-lm's (last 20 tokens).")
@click.option("--seed", type=int, default=None, help="Random seed for sampling.")
@click.option("--system", default=None, help="System prompt (default: the template's).")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object with the answer and statistics as the last line.")
@click.option("--quiet", "-q", is_flag=True, help="No streamed text or statistics; just the answer.")
@_friendly
def ask(args, model, max_tokens, temp, top_p, top_k, min_p, repetition_penalty, seed, system, as_json, quiet):
    """Ask QUESTION about one or more audio CLIPs (wav, flac, ogg, mp3; any rate; any channels).

    \b
    mlx-listen ask clip.wav "What is making this sound?"
    mlx-listen ask a.wav b.wav "Which clip is louder?" --json
    """
    if len(args) < 2:
        raise click.UsageError("give at least one CLIP and a QUESTION")
    *clips, question = args
    from mlx_listen.audio import audio_features, load_audio
    from mlx_listen.generate import generate, prepare
    from mlx_listen.load import load

    feats = [audio_features(load_audio(c), c) for c in clips]  # bad audio fails before the model loads
    mdl, processor = load(model)
    prompt = prepare(mdl, processor, feats, question, system)
    stream = not quiet
    if stream:
        click.echo("=" * 10)
    answer = generate(
        mdl, processor, prompt, on_text=(lambda s: click.echo(s, nl=False)) if stream else None,
        max_tokens=max_tokens, temp=temp, top_p=top_p, top_k=top_k, min_p=min_p,
        repetition_penalty=repetition_penalty, seed=seed,
    )
    if stream:
        click.echo()
        click.echo("=" * 10)
    else:
        click.echo(answer.text)
    if not quiet:
        err = sys.stderr
        print(f"Audio: {answer.audio_seconds:.1f} s -> {answer.audio_tokens} tokens, "
              f"encoder {answer.encode_seconds:.2f} s", file=err)
        print(f"Prompt: {answer.prompt_tokens} tokens, {answer.prompt_tps:.3f} tokens-per-sec", file=err)
        print(f"Generation: {answer.generation_tokens} tokens, {answer.generation_tps:.3f} tokens-per-sec",
              file=err)
        print(f"Peak memory: {answer.peak_memory:.3f} GB", file=err)
    if as_json:
        click.echo(json.dumps(answer.to_json()))


@main.command()
@click.option("--hf-path", "--model", "hf_path", required=True, help="HF folder or repo id to convert.")
@click.option("--mlx-path", default="mlx_model", show_default=True, help="Output folder.")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
              help="Cast weights (default: keep the checkpoint's dtype).")
@click.option("-q", "--quantize", is_flag=True, help="Quantise the language model (affine).")
@click.option("--q-bits", type=click.Choice(["4", "8"]), default="4", show_default=True)
@click.option("--q-group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True,
              help="Weights per quantisation group (the sizes MLX supports).")
@click.option("--force", is_flag=True, help="Overwrite an existing output folder.")
@_friendly
def convert(hf_path, mlx_path, dtype, quantize, q_bits, q_group_size, force):
    """Convert a Hugging Face Qwen2-Audio checkpoint to an MLX folder."""
    from mlx_listen.convert.convert import convert as run

    out = run(hf_path, mlx_path, dtype=dtype, quantize=quantize, q_bits=int(q_bits),
              q_group_size=int(q_group_size), force=force)
    click.echo(f"[INFO] Saved the MLX model to {out}", err=True)


@main.command()
def version():
    """Print the versions of mlx-listen, mlx and mlx-lm."""
    click.echo(_versions())


if __name__ == "__main__":
    main()
