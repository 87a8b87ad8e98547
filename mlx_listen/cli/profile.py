"""`mlx-listen profile`: several models through the same cross-fitted experiment, side by side."""

from __future__ import annotations

from pathlib import Path

import click

from mlx_listen.errors import ListenError

from .tools import experiment


class ModelList(click.ParamType):
    """`A,B,NAME=C`: models (folders or hub ids), each named by its folder or hub id unless NAME= is given."""

    name = "models"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        from mlx_listen.method.profile import parse_models

        try:
            return parse_models(value)
        except ListenError as e:
            self.fail(str(e), param, ctx)


# Every setting of `mlx-listen experiment`, with its defaults and checks; --models and --out are profile's own.
SHARED = [p for p in experiment.params if p.name not in ("model", "out")]


@click.command(params=[
    click.Option(["--models"], required=True, type=ModelList(),
                 help="Comma-separated models (MLX or HF folders, or hub repo ids), named in the report by their "
                      "folder or the hub id's last part; NAME=MODEL names one yourself."),
    click.Option(["--out"], required=True, type=click.Path(file_okay=False, path_type=Path),
                 help="Folder for profile.md, profile.json, profile.png and one experiment folder per model "
                      "(resumable: rerun the same command to continue)."),
    *SHARED])
def profile(models, data, audio_dir, limit, prompt, max_tokens, out, tasks, folds, repeats, seed, k, alphas, tune,
            random_sets, random_direction, center, n_perm, do_ablate, ablate_modes, ablate_sets):
    """Compare models: each runs `mlx-listen experiment` with the same settings (one model in memory at
    a time), then one report sets them side by side: audio attention mass per layer, specialist heads
    beating the permutation null and their layers, listening AUC within strata, and baseline and
    steered accuracy with paired intervals, with one PNG a column per model. A model that fails is
    reported as failed and the others go on (exit 1 only when every model failed).

    \b
    mlx-listen profile --models qwen2-audio-4bit,af3-4bit,omni-3b --data mmau-test-mini.json \\
        --audio-dir MMAU --out runs/profile
    Writes OUT/profile.md, OUT/profile.json, OUT/profile.png and OUT/<name>/ (each model's experiment).
    """
    from mlx_listen.method.experiment import Settings
    from mlx_listen.method.profile import profile as run_profile
    from mlx_listen.method.profile_report import rows

    settings = Settings(folds=folds, repeats=repeats, seed=seed, k=k, alphas=tuple(alphas), random_sets=random_sets,
                        tune=tune, prompt=prompt, max_tokens=max_tokens, center=center, n_perm=n_perm,
                        random_direction=random_direction, ablate=do_ablate, ablate_modes=ablate_modes,
                        ablate_sets=ablate_sets)
    result = run_profile([f"{name}={spec}" for name, spec in models], data, audio_dir, out, settings, limit=limit,
                         tasks=tasks)
    for m in result["models"]:
        click.echo(f"{m['name']}: " + "; ".join(f"{label} {cell}" for label, cell in rows(m)
                                                 if label in SUMMARY or m["status"] != "done"))
        if m["status"] == "done" and not m.get("loaded"):
            click.echo(f"[INFO] {m['name']}: every stage was recorded; nothing was run", err=True)
    click.echo(f"[INFO] wrote {out / 'profile.md'}, {out / 'profile.json'} and {out / 'profile.png'}", err=True)
    if not any(m["status"] == "done" for m in result["models"]):
        raise ListenError("every model failed (see the warnings above and profile.md)")


SUMMARY = ("audio mass per head, mean over layers", "listening AUC within strata", "baseline accuracy",
           "steered - baseline (paired)")
