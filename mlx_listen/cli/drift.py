"""`mlx-listen quant-drift`: what quantising a model changes in what it listens to."""

from __future__ import annotations

from pathlib import Path

import click

from .options import DIR, FILE, PROMPT, Finite


@click.command("quant-drift")
@click.option("--reference", required=True, help="The model to compare against (e.g. the bf16 folder or repo id).")
@click.option("--model", "-M", "models", required=True, multiple=True,
              help="A quantised copy of the reference (repeat the option for several).")
@click.option("--heads", "heads_path", required=True, type=FILE,
              help="HEADS.json: the head set whose listening score and steering direction are compared.")
@click.option("--data", required=True, type=FILE, help="MMAU-format JSON (labelled items).")
@click.option("--audio-dir", required=True, type=DIR, help="Folder the items' audio_id paths are relative to.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for drift.json, drift.md, drift.png and the per-model records (resumable).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N items.")
@click.option("--k", type=click.IntRange(min=1), default=20, show_default=True,
              help="Specialist heads per model whose overlap is reported.")
@click.option("--alpha", type=Finite(), default=1.0, show_default=True, help="Steering strength of the steered answers.")
@PROMPT
@click.option("--max-tokens", "-m", type=click.IntRange(min=1), default=32, show_default=True)
def quant_drift(reference, models, heads_path, data, audio_dir, out, limit, k, alpha, prompt, max_tokens):
    """Does quantising change what the model listens to? Per quantised model against the reference,
    on the same items: the logits' KL and greedy agreement, every head's audio mass (correlation and
    rank correlation), the specialist heads' overlap, the listening score's correlation, the
    steering direction's cosine, and accuracy and steered gain with paired intervals.

    \b
    mlx-listen quant-drift --reference qwen2-audio-bf16 -M qwen2-audio-8bit -M qwen2-audio-4bit \\
        --heads HEADS.json --data mmau-test-mini.json --audio-dir MMAU --limit 200 --out runs/drift
    """
    from mlx_listen.headset import HeadSet
    from mlx_listen.method.quant_drift import drift, table

    report = drift(reference, list(models), data, audio_dir, out, heads=HeadSet.load(heads_path), alpha=alpha, k=k,
                   limit=limit, prompt=prompt, max_tokens=max_tokens)
    click.echo("\n".join(table(report)))
    click.echo(f"[INFO] wrote {out / 'drift.json'}, {out / 'drift.md'} and {out / 'drift.png'}", err=True)
