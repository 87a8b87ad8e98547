"""`mlx-listen eval` (run, `score`, `compare`) and `mlx-listen make-demo-set`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mlx_listen.errors import ListenError
from mlx_listen.eval import mmau

from .options import FILE, FORCE, TASKS, Group, ablate_options, ablation, data_options, steer_options, steering


@click.group("eval", cls=Group, invoke_without_command=True)
@data_options(required=False)  # not required: `eval score` and `eval compare` need none of them
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Run folder (resumable).")
@TASKS
@click.option("--skip-missing", is_flag=True, help="Go on without items whose audio file is missing or unreadable.")
@steer_options
@ablate_options
@click.option("--ablate-controls", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also ablate N random head sets matched to --ablate (same heads per layer, other layers).")
@click.option("--compare", is_flag=True, help="Also run the baseline on each item in the same pass (baseline in "
              "OUT, every other condition in OUT/<name>) and print the paired comparisons.")
@click.option("--listen", "listen_path", type=FILE, default=None,
              help="HEADS.json: record the listening score at every answer token in each row.")
@FORCE
@click.option("--score", "score_mode", type=click.Choice(["generate", "logprob", "both"]), default="generate",
              show_default=True, help="generate: greedy answers, official string match. logprob: each choice's "
              "log-prob in the prompt's answer format (<answer>choice</answer>; the choice text for --prompt mmau), "
              "the best one is the answer. both: both from one prefill (the generated answer is model_output).")
@click.pass_context
def evaluate(ctx, data, audio_dir, model, out, limit, tasks, prompt, max_tokens, skip_missing,
             steer_path, vector_path, alpha, steer_at, strength, normalize, steer_layer, ablate, ablate_mode,
             ablate_audio, ablate_means, ablate_controls, compare, listen_path, force, score_mode):
    """Evaluate on MMAU (greedy, official scoring); rerun the same command to resume.

    \b
    mlx-listen eval --data mmau-test-mini.json --audio-dir MMAU --out runs/base
    mlx-listen eval score runs/base/predictions.jsonl --data other-version.json
    mlx-listen eval compare runs/base runs/steered
    """
    if ctx.invoked_subcommand is not None:
        return
    missing = [n for n, v in (("--data", data), ("--audio-dir", audio_dir), ("--out", out)) if not v]
    if missing:
        raise click.UsageError(f"missing {', '.join(missing)} (or use a subcommand: score, compare)")
    from mlx_listen.eval.conditions import for_options
    from mlx_listen.eval.evaluate import EvalSpec, run_eval
    from mlx_listen.eval.logprob import summary_line
    from mlx_listen.headset import HeadSet
    from mlx_listen.load import ModelRef
    from mlx_listen.method.directions import bindings
    from mlx_listen.records import read_predictions

    steer_cfg, settings = steering(steer_path, vector_path, alpha, steer_at, strength, normalize, steer_layer)
    ablated = ablation(ablate, ablate_mode, ablate_audio, ablate_means)
    if ablate_controls and not ablated:
        raise click.UsageError("--ablate-controls needs --ablate HEADS")
    if compare and not (steer_cfg or ablated):
        raise click.UsageError("--compare needs a condition to compare: --steer, --vector or --ablate")
    ref = ModelRef(model)
    conditions = for_options(steer_cfg, settings, ablated, ablate_controls=ablate_controls, compare=compare,
                             shape=ref.shape if ablate_controls else None)
    listen_heads = list(HeadSet.load(listen_path).heads) if listen_path else []
    spec = EvalSpec(data, audio_dir, ref, out, limit=limit, tasks=tasks, prompt=prompt, max_tokens=max_tokens,
                    skip_missing=skip_missing, conditions=conditions, listen_heads=listen_heads,
                    bindings=bindings(steer_path, vector_path, listen_path, ablate, ablate_means), force=force, score=score_mode)
    reports = run_eval(spec)
    for cond in spec.conditions:
        if cond.name in reports:
            click.echo(f"== {cond.name}: {spec.dir_for(cond)}")
            click.echo(reports[cond.name].table())
            if score_mode != "generate":
                click.echo(summary_line(getattr(reports[cond.name], "logprob", None)))
    if compare and reports:
        a = spec.dir_for(conditions[0])
        for cond in conditions[1:]:
            b = spec.dir_for(cond)
            res = mmau.compare(read_predictions(a), read_predictions(b))
            click.echo("\n".join(mmau.compare_lines(res, str(a), str(b))))


@evaluate.command("score")
@click.argument("file", type=click.Path(exists=True, path_type=Path))
@click.option("--data", type=FILE, default=None,
              help="Score against this answer key instead (matched by id), e.g. the other MMAU version.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--official", is_flag=True, help="Print exactly the official evaluation.py layout.")
def eval_score(file, data, as_json, official):
    """Re-score a predictions FILE (our JSONL or the official JSON array) without a model."""
    from mlx_listen.records import read_predictions

    rows = read_predictions(file)
    if data:
        n_all = len(rows)
        rows, unmatched = mmau.rekey(rows, data)
        if not rows:
            raise ListenError(f"none of the {n_all} predictions has an id in {data}")
        if unmatched:
            click.echo(f"[INFO] scoring {len(rows)} of {n_all} predictions against {data}; "
                       f"{unmatched} ids are not in it", err=True)
    report = mmau.score(rows, raw_key="raw_output")
    click.echo(json.dumps(report.to_dict()) if as_json else report.official_text() if official else report.table())


@evaluate.command("compare")
@click.argument("run_a", type=click.Path(exists=True, path_type=Path))
@click.argument("run_b", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_compare(run_a, run_b, as_json):
    """Paired comparison of two runs (or predictions files): accuracy, flips, McNemar's exact p."""
    from mlx_listen.records import read_predictions

    res = mmau.compare(read_predictions(run_a), read_predictions(run_b))
    click.echo(json.dumps(res) if as_json else "\n".join(mmau.compare_lines(res, str(run_a), str(run_b))))


@click.command("make-demo-set")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--per-kind", type=click.IntRange(min=1), default=4, show_default=True,
              help="Items per kind of question.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
def make_demo_set(out_dir, per_kind, seed):
    """Write a small synthetic MMAU-format set (WAV clips + demo.json) to smoke-test `eval` offline."""
    from mlx_listen.eval.demo_set import make_demo_set as make

    path = make(out_dir, n_per_kind=per_kind, seed=seed)
    click.echo(f"[INFO] Wrote {path}; run: mlx-listen eval --data {path} --audio-dir {out_dir} --out RUN_DIR",
               err=True)
