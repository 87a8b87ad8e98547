"""`mlx-listen heads` and `mlx-listen validate-heads`: find the audio-specialist heads, and check
that their listening score rises when the audio matters."""

from __future__ import annotations

from pathlib import Path

import click

from .options import FILE, FORCE, data_options


@click.command()
@data_options()
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="HEADS.json to write.")
@click.option("--k", default=20, show_default=True, type=click.IntRange(min=1), help="Heads to select.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed of the permutation null, the bootstrap and the random-head control in the plots.")
@click.option("--center", type=click.Choice(["task", "none"]), default="task", show_default=True,
              help="Head scores: within task with the log clip length and log question length partialled out "
              "(the default: heads that only track task, clip or question length get no credit), or the paper's "
              "pooled Pearson r (none).")
@click.option("--n-perm", type=click.IntRange(min=20), default=200, show_default=True,
              help="Permutations of the head-score null.")
@click.option("--target", type=click.Choice(["correct", "margin"]), default="correct", show_default=True,
              help="What the audio mass is correlated with: the greedy answer's correctness, or the correct "
              "option's log-prob margin over the best other (continuous; scores every choice's answer too).")
def heads(model, data, audio_dir, out, k, limit, seed, prompt, max_tokens, center, n_perm, target):
    """Find the audio-specialist heads on a calibration set (resumable; rerun to continue).

    Writes HEADS.json, HEADS.csv (every head's score), HEADS.scores.png, HEADS.listening.png and
    HEADS.items.jsonl (per-item records, what a rerun resumes from).
    """
    from mlx_listen.method.heads import discover, usable

    if not out.parent.is_dir():
        raise click.BadParameter(f"the folder {out.parent} does not exist", param_hint="--out")
    hs, rows = discover(model, data, audio_dir, out, k=k, limit=limit, seed=seed, prompt=prompt, max_tokens=max_tokens,
                        center=center, n_perm=n_perm, target=target)
    good, failed = usable(rows)
    null, freq = hs.meta["null"], hs.meta["stability"]["frequency"]
    click.echo(f"{len(good)} items, accuracy {hs.meta['accuracy']:.1%}; top {len(hs.heads)} heads "
               f"(layer, head, r, bootstrap frequency in the top {k}):")
    for (l, h), fr, q in zip(hs.heads, freq, null["rank_q95"]):
        click.echo(f"  {l:>3} {h:>3}  {hs.scores[l, h]:+.3f}  {fr:.2f}" + ("" if hs.scores[l, h] > q else
                                                                           "  (within the null's 95% at this rank)"))
    click.echo(f"score: {hs.meta['score']}")
    click.echo(f"permutation null ({null['n_perm']} shuffles within task): {null['n_beating_null']} heads above the "
               f"family-wise 5% threshold r = {null['fwer_threshold']:.3f}; set p = {null['p_set']:.3g}; overlap with "
               f"center={hs.meta['other_center']['center']}: Jaccard {hs.meta['other_center']['jaccard']:.2f}")
    stab = hs.meta["stability"]
    click.echo(f"bootstrap stability (mean frequency in the top {k}): {stab['mean']:.2f}; with correctness shuffled "
               f"(nothing to find): {stab['null_reference']['mean']:.2f}")
    if failed:
        click.echo(f"[WARNING] {len(failed)} items could not be used (see {out.stem}.items.jsonl), e.g. "
                   f"{failed[0]['id']}: {failed[0]['error']}", err=True)
    click.echo(f"[INFO] wrote {out} and its .csv, .scores.png, .listening.png", err=True)


@click.command("validate-heads")
@click.option("--heads", "heads_path", required=True, type=FILE)
@data_options()
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Report folder (resumable).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Bootstrap and random-control seed.")
@FORCE
def validate_heads(heads_path, model, data, audio_dir, out, limit, seed, prompt, max_tokens, force):
    """Does the listening score rise when the audio changes the answer? (audio vs equal-length silence)"""
    from mlx_listen.headset import HeadSet
    from mlx_listen.method.validation import validate_run, validation_lines

    rep = validate_run(HeadSet.load(heads_path), model, data, audio_dir, out, limit=limit, seed=seed, prompt=prompt,
                       max_tokens=max_tokens, force=force)
    click.echo("\n".join(validation_lines(rep)))
    click.echo(f"[INFO] wrote {out / 'validation.json'} and {out / 'validation.png'}", err=True)
