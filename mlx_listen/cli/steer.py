"""`mlx-listen steer build|sweep|inspect`: steering vectors, strength sweeps and the logit lens."""

from __future__ import annotations

from pathlib import Path

import click

from .options import FILE, FORCE, TASKS, Finite, Group, NumberList, data_options


@click.group(cls=Group)
def steer():
    """Steering vectors and strength sweeps (audio-silence steering, arXiv 2603.06854)."""


@steer.command("build")
@click.option("--heads", "heads_path", required=True, type=FILE)
@data_options(max_tokens=False)  # a direction needs prefills only, no answers
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Vector file (.safetensors is added if missing).")
@click.option("--alpha", type=Finite(), default=1.0, show_default=True,
              help="Default strength stored with the vector (what `--vector` uses without --alpha).")
@FORCE
def steer_build(heads_path, model, data, audio_dir, out, limit, alpha, prompt, force):
    """A fixed direction: the mean of the per-input audio-silence directions over calibration items."""
    import numpy as np

    from mlx_listen.headset import HeadSet
    from mlx_listen.method.directions import build

    path, vec, meta = build(HeadSet.load(heads_path), model, data, audio_dir, out, limit=limit, alpha=alpha,
                            prompt=prompt, force=force)
    failed = meta["calibration"]["failed"]
    if failed:
        click.echo(f"[WARNING] {len(failed)} items could not be used, e.g. {failed[0]['id']}: {failed[0]['error']}",
                   err=True)
    click.echo(f"[INFO] wrote {path}: mean direction over {meta['calibration']['n_items']} items, "
               f"|d| = {float(np.linalg.norm(vec)):.4g}, default alpha {alpha:g}", err=True)


@steer.command("sweep")
@click.option("--heads", "heads_path", required=True, type=FILE)
@data_options()
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Sweep folder (resumable).")
@click.option("--alphas", type=NumberList(), default="0,0.5,1,2,4", show_default=True,
              help="Comma-separated strengths.")
@click.option("--calib-fraction", default=0.5, show_default=True, type=Finite(0.05, 0.95))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Split and random-control seed.")
@click.option("--random-controls", default=1, show_default=True, type=click.IntRange(min=0),
              help="Random head sets matched to the heads' layer profile, swept alongside.")
@TASKS
@click.option("--steer-at", type=click.Choice(["all", "prompt"]), default="all", show_default=True)
@click.option("--score", "score_mode", type=click.Choice(["generate", "logprob", "both"]), default="generate",
              show_default=True, help="As in eval; logprob or both add the correct option's margin per alpha "
              "(a graded curve, paired 95% CIs) and sweep_margin.png.")
@FORCE
def steer_sweep(heads_path, model, data, audio_dir, out, alphas, calib_fraction, seed, random_controls, limit, tasks,
                prompt, max_tokens, steer_at, score_mode, force):
    """Accuracy vs alpha on a calibration split; the best alpha applied to the disjoint test split."""
    from mlx_listen.eval.evaluate import EvalSpec
    from mlx_listen.headset import HeadSet
    from mlx_listen.method.directions import bindings, from_heads
    from mlx_listen.method.sweep import sweep, sweep_lines

    cfg = from_heads(HeadSet.load(heads_path), at=steer_at)
    spec = EvalSpec(data, audio_dir, model, out, limit=limit, tasks=tasks, prompt=prompt, max_tokens=max_tokens,
                    bindings=bindings(heads_path), force=force, score=score_mode)
    res = sweep(spec, cfg, alphas, calib_fraction=calib_fraction, seed=seed, n_random=random_controls)
    click.echo("\n".join(sweep_lines(res)))
    extra = " and sweep_margin.png" if "margin_shift" in res["calibration"] else ""
    click.echo(f"[INFO] wrote {out / 'sweep.json'} and {out / 'sweep.png'}{extra}", err=True)


@steer.command("inspect")
@click.argument("source", type=FILE, metavar="HEADS.json|VECTOR")
@data_options(required=False, max_tokens=False)
@TASKS
@click.option("--top-k", type=click.IntRange(min=1), default=20, show_default=True,
              help="Tokens listed per lens, promoted and demoted.")
@click.option("--alpha", type=Finite(), default=None,
              help="Strength of the exact lens (default: 1, or the vector file's stored strength).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for inspect.json, inspect.txt and the PNGs.")
@click.option("--show", type=click.IntRange(min=1), default=10, show_default=True,
              help="Tokens printed per lens in the summary.")
@FORCE
def steer_inspect(source, model, data, audio_dir, limit, prompt, tasks, top_k, alpha, out, show, force):
    """The logit lens of a steering direction: the tokens it promotes and demotes through the final
    norm and lm_head, and, with --data, the audio-silence contrast at every layer and the direction's
    cosine consistency across items and tasks.

    \b
    mlx-listen steer inspect runs/heads/HEADS.json --data mmau.json --audio-dir audio --out runs/inspect
    mlx-listen steer inspect runs/vector.safetensors
    """
    from mlx_listen.method.inspect import inspect
    from mlx_listen.method.inspect_report import inspect_lines

    if (data is None) != (audio_dir is None):
        raise click.UsageError("--data and --audio-dir go together")
    res = inspect(source, model, data, audio_dir, out, limit=limit, tasks=tasks, prompt=prompt, top_k=top_k,
                  alpha=alpha, force=force)
    failed = (res.get("data") or {}).get("failed") or []
    if failed:
        click.echo(f"[WARNING] {len(failed)} items could not be used, e.g. {failed[0]['id']}: {failed[0]['error']}",
                   err=True)
    click.echo("\n".join(inspect_lines(res, show)))
    if out is not None:
        click.echo(f"[INFO] wrote {', '.join(str(Path(out) / f) for f in res['files'])}", err=True)
