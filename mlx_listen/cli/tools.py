"""`mlx-listen patch`, `mlx-listen experiment` and `mlx-listen ablate means`: the causal tools and
the cross-fitted experiment."""

from __future__ import annotations

from pathlib import Path

import click

from .options import (
    ABLATE_MODE_HELP,
    DIR,
    FILE,
    FORCE,
    MODEL,
    PROMPT,
    TASKS,
    AblateModes,
    Finite,
    Group,
    NumberList,
    data_options,
)


@click.command()
@click.argument("args", nargs=-1, metavar="[CLIP QUESTION]")
@MODEL
@click.option("--data", type=FILE, default=None, help="MMAU-format JSON: patch every item and average (resumable).")
@click.option("--audio-dir", type=DIR, default=None, help="Folder the items' audio_id paths are relative to.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N items.")
@TASKS
@PROMPT
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: patch.json, patch.groups.png, patch.heads.png (and items.jsonl with --data).")
@click.option("--tokens", type=click.IntRange(1, 64), default=8, show_default=True,
              help="CLIP QUESTION: greedy answer tokens compared (the audio run's against the silence run's).")
@click.option("--head-at", type=click.Choice(["last", "last+prefix"]), default="last", show_default=True,
              help="Patch each head at the last prompt token, or there and at the answers' shared start (<answer>).")
@click.option("--min-gap", type=Finite(min=0), default=0.5, show_default=True,
              help="Items whose audio-silence gap log p(a) - log p(b) is smaller (nats) are flagged, not averaged.")
@click.option("--first-diff", is_flag=True,
              help="Score a and b only up to their first differing token (about 3x cheaper head maps).")
@click.option("--heads", "heads_path", type=FILE, default=None,
              help="HEADS.json: box the specialist heads on the head map and report what they restore.")
@click.option("--system", default=None, help="System prompt (CLIP QUESTION).")
@click.option("--max-rows", type=click.IntRange(min=1), default=32, show_default=True,
              help="Patches run together in one batch (memory).")
@FORCE
def patch(args, model, data, audio_dir, limit, tasks, prompt, out, tokens, head_at, min_gap, first_diff, heads_path,
          system, max_rows, force):
    """Activation patching audio -> silence: where does the audio evidence enter?

    The prompt runs with equal-length silence; the audio run's residual stream (per layer over
    the audio, the text after it, the last prompt token, the answer's shared start) or one head's
    output at the last token is patched in, and the restored share of log p(a) - log p(b) is
    mapped (a: the audio run's answer, b: the silence run's).

    \b
    mlx-listen patch clip.wav "What is making this sound?" --out runs/patch-clip
    mlx-listen patch --data mmau-test-mini.json --audio-dir MMAU --limit 100 --out runs/patch --heads HEADS.json
    """
    if data is None and len(args) != 2:
        raise click.UsageError("give CLIP and QUESTION, or --data with --audio-dir")
    if data is not None and args:
        raise click.UsageError("give CLIP QUESTION or --data, not both")
    if data is not None and audio_dir is None:
        raise click.UsageError("--data needs --audio-dir")
    from mlx_listen.headset import HeadSet
    from mlx_listen.method.patch_map import PatchConfig, patch_lines, patch_run

    from .ask import _question_is_a_clip

    heads = HeadSet.load(heads_path) if heads_path else None
    cfg = PatchConfig(head_at=head_at, tokens=tokens, min_gap=min_gap, first_diff=first_diff, preset=prompt,
                      max_rows=max_rows)
    if data is None:
        _question_is_a_clip(args[1])
    summary = patch_run(model, out, clip=args[0] if args else None, question=args[1] if args else None, system=system,
                        data=data, audio_dir=audio_dir, tasks=tasks, limit=limit, config=cfg, heads=heads, force=force)
    click.echo("\n".join(patch_lines(summary, heads.heads if heads else ())))
    click.echo(f"[INFO] wrote {out / 'patch.json'}" + "".join(f", {out / f}" for f in summary["files"]), err=True)


@click.command()
@data_options()
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Experiment folder (resumable: rerun the same command to continue).")
@TASKS
@click.option("--folds", type=click.IntRange(min=2), default=2, show_default=True, help="Cross-fitting folds.")
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True,
              help="Cross-fittings over fold seeds SEED..SEED+R-1; with 1 the intervals are conditional on one split.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Folds, random head sets, permutations and bootstraps.")
@click.option("--k", type=click.IntRange(min=1), default=20, show_default=True, help="Specialist heads per fold.")
@click.option("--alphas", type=NumberList(), default="0.5,1,1.5,2,3", show_default=True,
              help="Steering strengths to choose from, per condition, on each fold's calibration items (0: the "
              "baseline may be chosen).")
@click.option("--tune", type=click.Choice(["margin", "accuracy"]), default="margin", show_default=True,
              help="The one rule every condition's alpha is chosen by: the mean correct-option log-prob margin (one "
              "prefill per item, no decoding) or greedy accuracy (every condition decoded at every alpha).")
@click.option("--random-sets", type=click.IntRange(min=1), default=99, show_default=True,
              help="Matched random head sets, distinct by layer set (fewer when fewer exist; 20 or more can show "
              "p < 0.05).")
@click.option("--random-direction/--no-random-direction", default=True, show_default=True,
              help="Also steer with a random direction at the norm of each item's own direction.")
@click.option("--center", type=click.Choice(["task", "none"]), default="task", show_default=True,
              help="Head scores: within task with clip and question length partialled out, or the paper's pooled "
              "Pearson r (none).")
@click.option("--n-perm", type=click.IntRange(min=20), default=200, show_default=True,
              help="Permutations of the head-score null.")
@click.option("--ablate/--no-ablate", "do_ablate", default=True, show_default=True,
              help="Also test specialist-head and random-head ablation.")
@click.option("--ablate-mode", "ablate_modes", type=AblateModes(), default="zero,audio", show_default=True,
              help="Comma-separated ablation modes, each: " + ABLATE_MODE_HELP + " Not mean here: it would need a "
              "means file per fold.")
@click.option("--ablate-sets", type=click.IntRange(min=0), default=20, show_default=True,
              help="Random-head ablations per mode (the first random sets; 20 or more can show p < 0.05).")
def experiment(model, data, audio_dir, limit, prompt, max_tokens, out, tasks, folds, repeats, seed, k, alphas, tune,
               random_sets, random_direction, center, n_perm, do_ablate, ablate_modes, ablate_sets):
    """The paper's protocol, cross-fitted: heads and alpha fitted on other folds, reported on held-out
    items, against matched random head sets, a norm-matched random direction, the dataset-mean vector
    and head ablation (zero and audio masking).

    \b
    mlx-listen experiment --data mmau-test-mini.json --audio-dir MMAU --out exp/qwen2-audio
    Writes EXP/report.md (the verdict and its tables, with PNGs), EXP/report.json and
    EXP/predictions/<condition>.json (what `mlx-listen eval score` reads).
    """
    from mlx_listen.method.experiment import Settings, run_experiment

    settings = Settings(folds=folds, repeats=repeats, seed=seed, k=k, alphas=tuple(alphas), random_sets=random_sets,
                        tune=tune, prompt=prompt, max_tokens=max_tokens, center=center, n_perm=n_perm,
                        random_direction=random_direction, ablate=do_ablate, ablate_modes=ablate_modes,
                        ablate_sets=ablate_sets)
    report = run_experiment(settings, data, audio_dir, model, out, limit=limit, tasks=tasks)
    click.echo("\n".join(report["verdict"]))
    click.echo(f"[INFO] wrote {out / 'report.md'}, {out / 'report.json'} and {out / 'predictions'}", err=True)


@click.group(cls=Group)
def ablate():
    """Head ablation helpers (the ablation itself is `--ablate` on ask and eval)."""


@ablate.command("means")
@data_options(max_tokens=False)
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Means file to write (.safetensors).")
def ablate_means(model, data, audio_dir, out, limit, prompt):
    """Every head's mean output over the calibration prompts, for `--ablate-mode mean`."""
    from mlx_listen.method.means import means_from_data

    if not out.parent.is_dir():
        raise click.BadParameter(f"the folder {out.parent} does not exist", param_hint="--out")
    path, meta = means_from_data(model, data, audio_dir, out, limit=limit, prompt=prompt)
    click.echo(f"[INFO] wrote {path}: mean head outputs over {meta['n_items']} prompts ({meta['n_positions']} "
               "positions)", err=True)
