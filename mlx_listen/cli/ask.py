"""`mlx-listen ask`, `attention` and `view`: one question about audio clips."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import click

from mlx_listen.errors import ListenWarning
from mlx_listen.models import DEFAULT_MODEL

from .options import (
    AUDIO_SUFFIXES,
    DIR,
    FILE,
    FORCE,
    MAX_TOKENS,
    MODEL,
    PROMPT,
    Finite,
    ablate_options,
    ablation,
    check_png,
    steer_options,
    steering,
)


def _question_is_a_clip(question: str):
    if Path(question).suffix.lower() in AUDIO_SUFFIXES and Path(question).is_file():
        warnings.warn(f"the question {question!r} is an audio file; the last argument is the question", ListenWarning)


@click.command()
@click.argument("args", nargs=-1, required=True, metavar="CLIP... QUESTION")
@MODEL
@MAX_TOKENS
@click.option("--temp", "--temperature", "temp", type=Finite(min=0), default=0.0, show_default=True,
              help="Sampling temperature; 0 is greedy.")
@click.option("--top-p", type=Finite(0, 1), default=0.0, show_default=True, help="Nucleus sampling (0: off).")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="Top-k sampling (0: off).")
@click.option("--min-p", type=Finite(0, 1), default=0.0, show_default=True, help="Min-p sampling (0: off).")
@click.option("--repetition-penalty", type=Finite(min=0, min_open=True), default=None,
              help="mlx-lm's (last 20 tokens).")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=None, help="Random seed for sampling.")
@click.option("--system", default=None, help="System prompt (default: the template's).")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object with the answer and statistics as the last line.")
@click.option("--quiet", "-q", is_flag=True, help="No streamed text or statistics; just the answer.")
@click.option("--listen", is_flag=True, help="Also print the listening score (heads from --heads or --steer).")
@click.option("--heads", "heads_path", type=FILE, default=None,
              help="HEADS.json from `mlx-listen heads` (implies --listen).")
@click.option("--png", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With the listening score: plot it at every answer token.")
@steer_options
@ablate_options
@FORCE
def ask(args, model, max_tokens, temp, top_p, top_k, min_p, repetition_penalty, seed, system, as_json, quiet,
        listen, heads_path, png, steer_path, vector_path, alpha, steer_at, strength, normalize, steer_layer,
        ablate, ablate_mode, ablate_audio, ablate_means, force):
    """Ask QUESTION about one or more audio CLIPs (wav, flac, ogg, mp3; any rate; any channels).

    \b
    mlx-listen ask clip.wav "What is making this sound?"
    mlx-listen ask a.wav b.wav "Which clip is louder?" --json
    mlx-listen ask clip.wav "What is it?" --heads HEADS.json --png listening.png
    """
    if len(args) < 2:
        raise click.UsageError("give at least one CLIP and a QUESTION")
    *clips, question = args
    listen = listen or heads_path is not None
    if listen and not (heads_path or steer_path):
        raise click.UsageError("--listen needs --heads HEADS.json (from `mlx-listen heads`)")
    if png is not None and not listen:
        raise click.UsageError("--png plots the listening score: give --heads HEADS.json")
    check_png(png, "--png")
    _question_is_a_clip(question)
    from mlx_listen.asking import ask as run
    from mlx_listen.headset import HeadSet
    from mlx_listen.identity import check_family
    from mlx_listen.load import ModelRef, load
    from mlx_listen.method.directions import bindings
    from mlx_listen.prompt import as_features

    heads = HeadSet.load(heads_path or steer_path) if listen else None
    steer_cfg, _ = steering(steer_path, vector_path, alpha, steer_at, strength, normalize, steer_layer)
    ablated = ablation(ablate, ablate_mode, ablate_audio, ablate_means)
    if steer_cfg and ablated:
        raise click.UsageError("--steer/--vector and --ablate cannot be combined in one answer")
    front = ModelRef(model).front_end  # the family's, from the config alone
    for label, meta in bindings(heads_path, steer_path, vector_path):  # another family's: refused before loading
        check_family(meta, label, ModelRef(model).family)
    feats = [as_features(c, front=front) for c in clips]  # bad audio fails before the model loads
    mdl, processor = load(model)
    shown = []

    def stream(text: str):
        if not shown:
            click.echo("=" * 10)
            shown.append(True)
        click.echo(text, nl=False)

    answer = run(mdl, processor, feats, question, system=system, heads=heads, steer=steer_cfg, ablate=ablated,
                 bindings=bindings(heads_path, steer_path, vector_path, ablate, ablate_means), force=force,
                 on_text=None if quiet else stream, max_tokens=max_tokens, temp=temp, top_p=top_p, top_k=top_k,
                 min_p=min_p, repetition_penalty=repetition_penalty, seed=seed)
    if quiet:
        click.echo(answer.text)
    else:
        if not shown:
            click.echo("=" * 10)
        click.echo("\n" + "=" * 10)
        used = sum(f.seconds_used for f in feats)
        cut = f" (first {used:.1f} s used)" if any(f.truncated for f in feats) else ""
        stats = [
            f"Audio: {answer.audio_seconds:.1f} s{cut} -> {answer.audio_tokens} tokens, encoder {answer.encode_seconds:.2f} s",
            f"Prompt: {answer.prompt_tokens} tokens, {answer.prompt_tps:.3f} tokens-per-sec",
            f"Generation: {answer.generation_tokens} tokens, {answer.generation_tps:.3f} tokens-per-sec",
            f"Peak memory: {answer.peak_memory:.3f} GB",
        ]
        if steer_cfg:
            stats.append(f"Steering: alpha {steer_cfg.alpha:g} at {steer_cfg.at}, "
                         + (f"read layers {steer_cfg.layers}" if steer_cfg.vector is None else "fixed vector"))
        if ablated:
            stats.append(f"Ablation: {ablated.to_json()['mode']} of heads {ablated.heads}")
        click.echo("\n".join(stats), err=True)
    if heads:
        click.echo(f"Listening: {answer.listening:.4f} (mean audio attention of {len(heads.heads)} heads at the last "
                   "prompt token)", err=True)
        if png:
            from mlx_listen.plots import token_plot

            pieces = [processor.decode([t]) for t in answer.tokens]
            token_plot(answer.listening_tokens, pieces, png, "Listening score at each answer token", "listening score")
            click.echo(f"[INFO] wrote {png}", err=True)
    if as_json:
        extra = {"steering": steer_cfg.to_json()} if steer_cfg else {}
        if ablated:
            extra["ablation"] = ablated.to_json()
        click.echo(json.dumps({**answer.to_json(), **extra}))


@click.command()
@click.argument("clip", type=click.Path(path_type=Path))
@click.argument("question")
@MODEL
@click.option("--json", "json_out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Write the result here.")
@click.option("--heads", "heads_path", type=FILE, default=None, help="HEADS.json: also compute the listening score.")
@click.option("--png", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Draw the layers x heads heatmap.")
@click.option("--system", default=None, help="System prompt.")
@FORCE
def attention(clip, question, model, json_out, heads_path, png, system, force):
    """Per layer and head, the attention mass on the audio at the last prompt token."""
    check_png(png, "--png")
    from mlx_listen.headset import HeadSet
    from mlx_listen.method.heads import attention_map

    heads = HeadSet.load(heads_path) if heads_path else None
    out = attention_map(model, clip, question, system=system, heads=heads, json_out=json_out, png=png, force=force)
    click.echo(f"[INFO] audio mass of {out['layers']}x{out['heads']} heads written to {json_out}"
               + (f"; listening score {out['listening']:.4f}" if heads else ""), err=True)


@click.command()
@click.argument("args", nargs=-1, metavar="[CLIP QUESTION]")
@MODEL
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="CLIP QUESTION: the HTML file to write (self-contained: open it anywhere, offline).")
@click.option("--run", "run_dir", type=DIR, default=None,
              help="An eval or experiment folder: RUN/views/index.html and one page per item (resumable).")
@click.option("--audio-dir", type=DIR, default=None, help="With --run: the folder of the items' audio.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="With --run: only the first N items.")
@click.option("--heads", "heads_path", type=FILE, default=None,
              help="HEADS.json: listening per token, where each token looked, steered and ablated answers.")
@click.option("--choice", "choices", multiple=True,
              help="An answer option (repeat the option): each one's log-probability, per way of answering.")
@PROMPT
@click.option("--alpha", type=Finite(), default=1.0, show_default=True, help="Steering strength of the steered answer.")
@MAX_TOKENS
@click.option("--system", default=None, help="System prompt.")
@FORCE
def view(args, model, out, run_dir, audio_dir, limit, heads_path, choices, prompt, alpha, max_tokens, system, force):
    """Pages that show whether the model listened: for CLIP and QUESTION, one HTML file (the clip and
    its log-mel, the answer coloured by the listening score, where each answer token looked in the
    clip, every head's audio mass, the answers with silence, steered and ablated); for an eval or
    experiment folder (--run), an index page linking one such page per item.

    \b
    mlx-listen view clip.wav "What is making this sound?" --heads HEADS.json --out view.html
    mlx-listen view clip.wav "What is it?" --choice dog --choice cat --out view.html
    mlx-listen view --run runs/base --audio-dir MMAU --limit 50 --heads HEADS.json
    """
    from mlx_listen.headset import HeadSet

    heads = HeadSet.load(heads_path) if heads_path else None
    if run_dir is not None:
        if args or out is not None or choices:
            raise click.UsageError("--run takes no CLIP QUESTION, --out or --choice (the run has them)")
        if audio_dir is None:
            raise click.UsageError("--run needs --audio-dir")
        from mlx_listen.view.index import write_views

        index = write_views(run_dir, audio_dir, heads=heads, model=None if model == DEFAULT_MODEL else model,
                            limit=limit, max_tokens=max_tokens)
        click.echo(f"[INFO] wrote {index}", err=True)
        return
    if len(args) != 2 or out is None:
        raise click.UsageError("give CLIP QUESTION and --out, or --run RUN --audio-dir DIR")
    clip, question = Path(args[0]), args[1]
    if not clip.is_file():
        raise click.BadParameter(f"{clip} is not a file", param_hint="CLIP")
    if out.suffix.lower() not in (".html", ".htm"):
        raise click.BadParameter(f"{out} must end in .html", param_hint="--out")
    if not out.parent.is_dir():
        raise click.BadParameter(f"the folder {out.parent} does not exist", param_hint="--out")
    if choices and len(choices) < 2:
        raise click.UsageError("give at least two --choice options (or none)")
    _question_is_a_clip(question)
    from mlx_listen.load import ModelRef
    from mlx_listen.method.directions import bindings
    from mlx_listen.view import write
    from mlx_listen.view.record import build

    record = build(ModelRef(model), clip, question, heads=heads, choices=list(choices) or None, preset=prompt,
                   alpha=alpha, system=system, max_tokens=max_tokens, bindings=bindings(heads_path), force=force)
    write(record, out)
    click.echo(f"[INFO] wrote {out}", err=True)
