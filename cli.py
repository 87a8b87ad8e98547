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
@click.option("--listen", is_flag=True, help="Also print the listening score (needs --heads).")
@click.option("--heads", "heads_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="HEADS.json from `mlx-listen heads`.")
@_friendly
def ask(args, model, max_tokens, temp, top_p, top_k, min_p, repetition_penalty, seed, system, as_json, quiet,
        listen, heads_path):
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

    if listen and not heads_path:
        raise click.UsageError("--listen needs --heads HEADS.json (from `mlx-listen heads`)")
    from mlx_listen.heads import HeadSet

    heads = HeadSet.load(heads_path) if listen else None
    feats = [audio_features(load_audio(c), c) for c in clips]  # bad audio fails before the model loads
    mdl, processor = load(model)
    if heads:
        heads.check(len(mdl.layers), mdl.config.text_config.num_attention_heads)
    prompt = prepare(mdl, processor, feats, question, system)
    stream = not quiet
    if stream:
        click.echo("=" * 10)
    from contextlib import nullcontext

    from mlx_listen.capture import AUDIO_MASS, Capture

    with Capture(mdl, AUDIO_MASS.format("*"), prompt.audio_positions) if heads else nullcontext() as cap:
        answer = generate(
            mdl, processor, prompt, on_text=(lambda s: click.echo(s, nl=False)) if stream else None,
            max_tokens=max_tokens, temp=temp, top_p=top_p, top_k=top_k, min_p=min_p,
            repetition_penalty=repetition_penalty, seed=seed,
        )
    listening = heads.listening(cap.audio_mass(len(prompt.ids) - 1)) if heads else None
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
    if heads:
        print(f"Listening: {listening:.4f} (mean audio attention of {len(heads.heads)} heads at the last prompt "
              "token)", file=sys.stderr)
    if as_json:
        click.echo(json.dumps({**answer.to_json(), **({"listening": listening} if heads else {})}))


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
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--model", "-M", default=None, help="MLX or HF folder or repo id (default: the bundle's model).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@_friendly
def parity(bundle, model, as_json):
    """Check an MLX model against a reference BUNDLE from `mlx-listen-reference` (exit 0 only if all pass)."""
    from mlx_listen.parity import parity as run

    report = run(bundle, model, progress=not as_json)
    click.echo(json.dumps(report.to_dict()) if as_json else report.table())
    sys.exit(0 if report.ok else 1)


@main.group(invoke_without_command=True)
@click.option("--data", type=click.Path(exists=True, dir_okay=False), help="MMAU-format JSON (test-mini).")
@click.option("--audio-dir", type=click.Path(exists=True, file_okay=False),
              help="Folder the items' audio_id paths are relative to.")
@click.option("--model", "-M", default=DEFAULT_MODEL, show_default=True, help="MLX or HF folder, or a repo id.")
@click.option("--out", type=click.Path(file_okay=False), help="Run folder (resumable).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N items (after --task).")
@click.option("--task", "tasks", default="sound,music,speech", show_default=True, help="Comma-separated tasks.")
@click.option("--prompt", default="r1-aqa", show_default=True,
              type=click.Choice(["r1-aqa", "mmau", "r1-aqa-think"]), help="Prompt preset (shared/design/mmau.md §7).")
@click.option("--max-tokens", "-m", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--skip-missing", is_flag=True, help="Go on without items whose audio file is missing.")
@click.pass_context
@_friendly
def eval(ctx, data, audio_dir, model, out, limit, tasks, prompt, max_tokens, skip_missing):  # noqa: A001
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
    from pathlib import Path

    from mlx_listen.evaluate import EvalSpec, run_eval

    task_list = tuple(t.strip() for t in tasks.split(",") if t.strip())
    bad = [t for t in task_list if t not in ("sound", "music", "speech")]
    if bad or not task_list:
        raise click.BadParameter(f"unknown task {', '.join(bad) or '(none)'}", param_hint="--task")
    spec = EvalSpec(Path(data), Path(audio_dir), model, Path(out), limit=limit, tasks=task_list,
                    prompt=prompt, max_tokens=max_tokens, skip_missing=skip_missing)
    for name, report in run_eval(spec).items():
        click.echo(f"== {name}: {spec.out if name == 'base' else spec.out / name}")
        click.echo(report.table())


@eval.command("score")
@click.argument("file", type=click.Path(exists=True))
@click.option("--data", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Score against this answer key instead (matched by id), e.g. the other MMAU version.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--official", is_flag=True, help="Print exactly the official evaluation.py layout.")
@_friendly
def eval_score(file, data, as_json, official):
    """Re-score a predictions FILE (our JSONL or the official JSON array) without a model."""
    from pathlib import Path

    from mlx_listen import mmau
    from mlx_listen.evaluate import read_predictions, rekey

    rows = read_predictions(Path(file))
    if data:
        rows = rekey(rows, Path(data))
    report = mmau.score(rows, raw_key="raw_output")
    click.echo(json.dumps(report.to_dict()) if as_json else report.official_text() if official else report.table())


@eval.command("compare")
@click.argument("run_a", type=click.Path(exists=True))
@click.argument("run_b", type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_friendly
def eval_compare(run_a, run_b, as_json):
    """Paired comparison of two runs (or predictions files): accuracy, flips, McNemar's exact p."""
    from pathlib import Path

    from mlx_listen import mmau
    from mlx_listen.evaluate import read_predictions

    res = mmau.compare(read_predictions(Path(run_a)), read_predictions(Path(run_b)))
    if as_json:
        click.echo(json.dumps(res))
        return
    click.echo(f"A = {run_a}\nB = {run_b}\n{res['n']} paired items")
    click.echo(f"{'':<8} {'n':>5} {'A':>7} {'B':>7} {'wrong->right':>13} {'right->wrong':>13} {'McNemar p':>10}")
    for k in ("overall", "sound", "music", "speech"):
        r = res[k]
        if r["n"]:
            click.echo(f"{k:<8} {r['n']:>5} {r['a']:>7.2%} {r['b']:>7.2%} {r['wrong_to_right']:>13} "
                       f"{r['right_to_wrong']:>13} {r['p_mcnemar']:>10.4g}")


@main.command("make-demo-set")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--per-kind", type=click.IntRange(min=1), default=4, show_default=True,
              help="Items per kind of question.")
@click.option("--seed", default=0, show_default=True)
@_friendly
def make_demo_set(out_dir, per_kind, seed):
    """Write a small synthetic MMAU-format set (WAV clips + demo.json) to smoke-test `eval` offline."""
    from mlx_listen.demo_set import make_demo_set as make

    path = make(out_dir, n_per_kind=per_kind, seed=seed)
    click.echo(f"[INFO] Wrote {path}; run: mlx-listen eval --data {path} --audio-dir {out_dir} --out RUN_DIR",
               err=True)


@main.command()
@click.argument("clip", type=click.Path())
@click.argument("question")
@click.option("--model", "-M", default=DEFAULT_MODEL, show_default=True, help="MLX or HF folder, or a repo id.")
@click.option("--json", "json_out", required=True, type=click.Path(dir_okay=False), help="Write the result here.")
@click.option("--heads", "heads_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="HEADS.json: also compute the listening score.")
@click.option("--png", type=click.Path(dir_okay=False), default=None, help="Draw the layers x heads heatmap.")
@click.option("--system", default=None, help="System prompt.")
@_friendly
def attention(clip, question, model, json_out, heads_path, png, system):
    """Per layer and head, the attention mass on the audio at the last prompt token."""
    from pathlib import Path

    from mlx_listen.audio import audio_features, load_audio
    from mlx_listen.capture import AUDIO_MASS, run_with_cache
    from mlx_listen.generate import prepare
    from mlx_listen.heads import HeadSet
    from mlx_listen.load import load

    feats = audio_features(load_audio(clip), clip)
    heads = HeadSet.load(heads_path) if heads_path else None
    mdl, processor = load(model)
    if heads:
        heads.check(len(mdl.layers), mdl.config.text_config.num_attention_heads)
    prompt = prepare(mdl, processor, [feats], question, system)
    _, cap = run_with_cache(mdl, prompt, AUDIO_MASS.format("*"))
    mass = cap.audio_mass(len(prompt.ids) - 1)
    out = {"layers": int(mass.shape[0]), "heads": int(mass.shape[1]),
           "audio_mass": [[round(float(v), 7) for v in row] for row in mass],
           "listening": heads.listening(mass) if heads else None, "audio_tokens": prompt.n_audio_tokens}
    Path(json_out).write_text(json.dumps(out))
    if png:
        from mlx_listen.plots import heatmap

        heatmap(mass, Path(png), f"Audio attention mass at the last prompt token ({prompt.n_audio_tokens} audio tokens)",
                "attention mass on audio", marked=heads.heads if heads else ())
    click.echo(f"[INFO] audio mass of {mass.shape[0]}x{mass.shape[1]} heads written to {json_out}"
               + (f"; listening score {out['listening']:.4f}" if heads else ""), err=True)


@main.command()
@click.option("--model", "-M", default=DEFAULT_MODEL, show_default=True, help="MLX or HF folder, or a repo id.")
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False), help="Labelled MMAU-format JSON.")
@click.option("--audio-dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="HEADS.json to write.")
@click.option("--k", default=20, show_default=True, type=click.IntRange(min=1), help="Heads to select.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N items.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random-head control in the plots.")
@click.option("--prompt", default="r1-aqa", show_default=True, type=click.Choice(["r1-aqa", "mmau", "r1-aqa-think"]))
@click.option("--max-tokens", "-m", type=click.IntRange(min=1), default=256, show_default=True)
@_friendly
def heads(model, data, audio_dir, out, k, limit, seed, prompt, max_tokens):
    """Find the audio-specialist heads on a calibration set (resumable; rerun to continue).

    Writes HEADS.json, HEADS.csv (every head's score), HEADS.scores.png, HEADS.listening.png and
    HEADS.items.jsonl (per-item records, what a rerun resumes from).
    """
    from pathlib import Path

    from mlx_listen import mmau
    from mlx_listen.heads import calibrate, find_heads, write_side_files
    from mlx_listen.load import load

    out = Path(out)
    items = mmau.load_items(data)[:limit]
    missing = [it["audio_id"] for it in items if not (Path(audio_dir) / it["audio_id"]).is_file()]
    if missing:
        raise ListenError(f"{len(missing)} audio files missing under {audio_dir}, e.g. {missing[0]}")
    records = out.with_name(out.stem + ".items.jsonl")
    meta = {"model": model, "data": mmau.file_sha256(data), "prompt": prompt, "seed": seed}
    _check_records_meta(records, meta)
    mdl, processor = load(model)
    rows = calibrate(mdl, processor, items, Path(audio_dir), records, prompt, max_tokens)
    hs = find_heads(rows, k, meta)
    hs.save(out)
    write_side_files(hs, rows, out, seed)
    click.echo(f"{len(rows)} items, accuracy {hs.meta['accuracy']:.1%}; top {len(hs.heads)} heads (layer, head, r):")
    for l, h in hs.heads:
        click.echo(f"  {l:>3} {h:>3}  {hs.scores[l, h]:+.3f}")
    click.echo(f"[INFO] wrote {out} and its .csv, .scores.png, .listening.png", err=True)


def _check_records_meta(records, meta: dict):
    """A resumable record file belongs to one model/data/prompt: refuse to mix."""
    side = records.with_suffix(".meta.json")
    if side.exists():
        old = json.loads(side.read_text())
        diff = [k for k in ("model", "data", "prompt") if old.get(k) != meta.get(k)]
        if diff:
            raise ListenError(f"{records} was made with other settings ({', '.join(diff)} differ); use another --out")
    else:
        records.parent.mkdir(parents=True, exist_ok=True)
        side.write_text(json.dumps(meta))


@main.command("validate-heads")
@click.option("--heads", "heads_path", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--model", "-M", default=DEFAULT_MODEL, show_default=True)
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--audio-dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Report folder (resumable).")
@click.option("--limit", type=click.IntRange(min=1), default=None)
@click.option("--seed", default=0, show_default=True, help="Bootstrap and random-control seed.")
@click.option("--prompt", default="r1-aqa", show_default=True, type=click.Choice(["r1-aqa", "mmau", "r1-aqa-think"]))
@click.option("--max-tokens", "-m", type=click.IntRange(min=1), default=256, show_default=True)
@_friendly
def validate_heads(heads_path, model, data, audio_dir, out, limit, seed, prompt, max_tokens):
    """Does the listening score rise when the audio changes the answer? (audio vs equal-length silence)"""
    from pathlib import Path

    import numpy as np

    from mlx_listen import mmau
    from mlx_listen.heads import HeadSet, random_heads, validate, validation_records
    from mlx_listen.load import load
    from mlx_listen.plots import listening_plot

    out = Path(out)
    hs = HeadSet.load(heads_path)
    items = mmau.load_items(data)[:limit]
    records = out / "items.jsonl"
    _check_records_meta(records, {"model": model, "data": mmau.file_sha256(data), "prompt": prompt})
    mdl, processor = load(model)
    hs.check(len(mdl.layers), mdl.config.text_config.num_attention_heads)
    rows = validation_records(mdl, processor, items, Path(audio_dir), records, prompt, max_tokens)
    rep = validate(hs, rows, seed)
    (out / "validation.json").write_text(json.dumps(rep, indent=2))
    mass = np.array([r["audio_mass"] for r in rows])
    changed = np.array([r["changed"] for r in rows], bool)
    rand = HeadSet(random_heads(*mass.shape[1:], len(hs.heads), seed))
    L = np.array([hs.listening(m) for m in mass])
    Lr = np.array([rand.listening(m) for m in mass])
    listening_plot({"selected heads": (L[changed], L[~changed]), "random heads (control)": (Lr[changed], Lr[~changed])},
                   ("audio changed answer", "unchanged"), out / "validation.png")
    h = rep["heads"]
    click.echo(f"{rep['n']} items; the audio changed the answer on {rep['n_changed']}")
    click.echo(f"listening score: changed {h['mean_changed']}, unchanged {h['mean_unchanged']}, difference "
               f"{h['difference']} (95% CI {h['difference_ci95']}), AUC {h['auc']:.3f}")
    click.echo(f"random-head control AUC: {rep['random_auc_mean']:.3f} ± {rep['random_auc_sd']:.3f}")
    click.echo(f"[INFO] wrote {out / 'validation.json'} and {out / 'validation.png'}", err=True)


@main.command()
def version():
    """Print the versions of mlx-listen, mlx and mlx-lm."""
    click.echo(_versions())


if __name__ == "__main__":
    main()
