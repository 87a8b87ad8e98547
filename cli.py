"""`mlx-listen`: the command line, a thin click layer over `mlx_listen` and `mlx_listen.convert`.

Installed as `mlx_listen.cli` (a symlink in the package; see pyproject.toml). User errors (`ListenError`) print one
line on stderr and exit 1, never a traceback.
"""

from __future__ import annotations

import functools
import json
import sys

import click
import numpy as np

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


def _steer_options(fn):
    """--steer/--vector/--alpha/--steer-at/--strength/--normalize (shared by ask and eval)."""
    opts = [
        click.option("--steer", "steer_path", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="Steer with the audio-silence direction over the layers of these HEADS.json heads."),
        click.option("--vector", "vector_path", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="Steer with a fixed direction file (`mlx-listen steer build`)."),
        click.option("--alpha", type=float, default=1.0, show_default=True, help="Steering strength."),
        click.option("--steer-at", type=click.Choice(["all", "prompt"]), default="all", show_default=True,
                     help="Steer the last prompt position and every generated token, or the prompt only."),
        click.option("--strength", type=click.Choice(["fixed", "listening"]), default="fixed", show_default=True,
                     help="'listening': alpha x clip(calibration mean L / L(x), 0, 2): steer harder when the model "
                          "listens less (needs HEADS.json)."),
        click.option("--normalize", type=click.Choice(["none", "unit", "relative"]), default="none",
                     show_default=True, help="Scale of the direction: raw, unit, or relative to |h_final[T]|."),
        click.option("--steer-layer", type=int, default=-1, show_default=True,
                     help="Decoder block whose output is edited (-1: the last, i.e. before the final norm)."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _data_options(required: bool = True, max_tokens: bool = True):
    """--model/--data/--audio-dir/--limit/--prompt[/--max-tokens]: every command that runs a data set."""
    from mlx_listen.mmau import DEFAULT_PRESET, PROMPTS

    opts = [
        click.option("--model", "-M", default=DEFAULT_MODEL, show_default=True, help="MLX or HF folder, or a repo id."),
        click.option("--data", required=required, type=click.Path(exists=True, dir_okay=False),
                     help="MMAU-format JSON (labelled items)."),
        click.option("--audio-dir", required=required, type=click.Path(exists=True, file_okay=False),
                     help="Folder the items' audio_id paths are relative to."),
        click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N items."),
        click.option("--prompt", default=DEFAULT_PRESET, show_default=True, type=click.Choice(list(PROMPTS)),
                     help="Prompt preset (shared/design/mmau.md §7)."),
    ]
    if max_tokens:
        opts.append(click.option("--max-tokens", "-m", type=click.IntRange(min=1), default=256, show_default=True))

    def apply(fn):
        for o in reversed(opts):
            fn = o(fn)
        return fn

    return apply


def _steer_config(steer_path, vector_path, alpha, steer_at, strength, normalize, steer_layer):
    if not steer_path and not vector_path:
        return None
    from mlx_listen.steering import config_from

    cfg = config_from(steer_path, vector_path, alpha=alpha, at=steer_at, strength=strength, normalize=normalize,
                      apply_layer=steer_layer)
    if strength == "listening" and not steer_path:
        raise click.UsageError("--strength listening needs --steer HEADS.json")
    return cfg


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
@_steer_options
@_friendly
def ask(args, model, max_tokens, temp, top_p, top_k, min_p, repetition_penalty, seed, system, as_json, quiet,
        listen, heads_path, steer_path, vector_path, alpha, steer_at, strength, normalize, steer_layer):
    """Ask QUESTION about one or more audio CLIPs (wav, flac, ogg, mp3; any rate; any channels).

    \b
    mlx-listen ask clip.wav "What is making this sound?"
    mlx-listen ask a.wav b.wav "Which clip is louder?" --json
    """
    if len(args) < 2:
        raise click.UsageError("give at least one CLIP and a QUESTION")
    if listen and not (heads_path or steer_path):
        raise click.UsageError("--listen needs --heads HEADS.json (from `mlx-listen heads`)")
    *clips, question = args
    from contextlib import nullcontext

    from mlx_listen.audio import audio_features, load_audio
    from mlx_listen.capture import AUDIO_MASS, Capture
    from mlx_listen.generate import generate, prepare
    from mlx_listen.heads import HeadSet
    from mlx_listen.load import load
    from mlx_listen.steering import Steerer

    heads = HeadSet.load(heads_path or steer_path) if listen else None
    steer_cfg = _steer_config(steer_path, vector_path, alpha, steer_at, strength, normalize, steer_layer)
    feats = [audio_features(load_audio(c), c) for c in clips]  # bad audio fails before the model loads
    mdl, processor = load(model)
    if heads:
        heads.check(len(mdl.layers), mdl.config.text_config.num_attention_heads)
    prompt = prepare(mdl, processor, feats, question, system)

    capture = Capture(mdl, AUDIO_MASS.format("*"), prompt.audio_positions) if heads else nullcontext()
    steering = Steerer(mdl, steer_cfg).applied(prompt) if steer_cfg else nullcontext()
    if not quiet:
        click.echo("=" * 10)
    with capture as cap, steering:
        answer = generate(
            mdl, processor, prompt, on_text=None if quiet else (lambda s: click.echo(s, nl=False)),
            max_tokens=max_tokens, temp=temp, top_p=top_p, top_k=top_k, min_p=min_p,
            repetition_penalty=repetition_penalty, seed=seed,
        )
    listening = heads.listening(cap.audio_mass(len(prompt.ids) - 1)) if heads else None
    if quiet:
        click.echo(answer.text)
    else:
        click.echo("\n" + "=" * 10)
        stats = [
            f"Audio: {answer.audio_seconds:.1f} s -> {answer.audio_tokens} tokens, encoder {answer.encode_seconds:.2f} s",
            f"Prompt: {answer.prompt_tokens} tokens, {answer.prompt_tps:.3f} tokens-per-sec",
            f"Generation: {answer.generation_tokens} tokens, {answer.generation_tps:.3f} tokens-per-sec",
            f"Peak memory: {answer.peak_memory:.3f} GB",
        ]
        if steer_cfg:
            stats.append(f"Steering: alpha {steer_cfg.alpha} at {steer_cfg.at}, "
                         + (f"read layers {steer_cfg.layers}" if steer_cfg.vector is None else "fixed vector"))
        click.echo("\n".join(stats), err=True)
    if heads:
        click.echo(f"Listening: {listening:.4f} (mean audio attention of {len(heads.heads)} heads at the last "
                   "prompt token)", err=True)
    if as_json:
        extra = {"listening": listening} if heads else {}
        if steer_cfg:
            extra["steering"] = steer_cfg.to_json()
        click.echo(json.dumps({**answer.to_json(), **extra}))


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
@_data_options(required=False)  # not required: `eval score` and `eval compare` need none of them
@click.option("--out", type=click.Path(file_okay=False), help="Run folder (resumable).")
@click.option("--task", "tasks", default="sound,music,speech", show_default=True,
              help="Comma-separated tasks (applied before --limit).")
@click.option("--skip-missing", is_flag=True, help="Go on without items whose audio file is missing.")
@_steer_options
@click.option("--compare", is_flag=True, help="With --steer/--vector: run the baseline and the steered model on "
              "each item in one pass (baseline in OUT, steered in OUT/steered) and print the paired comparison.")
@click.pass_context
@_friendly
def eval(ctx, data, audio_dir, model, out, limit, tasks, prompt, max_tokens, skip_missing,  # noqa: A001
         steer_path, vector_path, alpha, steer_at, strength, normalize, steer_layer, compare):
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
    from mlx_listen.evaluate import baseline, steered

    steer_cfg = _steer_config(steer_path, vector_path, alpha, steer_at, strength, normalize, steer_layer)
    if compare and not steer_cfg:
        raise click.UsageError("--compare needs --steer HEADS.json or --vector FILE")
    settings = {}
    for label, f in (("heads_sha256", steer_path), ("vector_sha256", vector_path)):
        if f:
            from mlx_listen.mmau import file_sha256

            settings[label] = file_sha256(f)
    conditions = [baseline()] if not steer_cfg else [steered(steer_cfg, settings=settings)]
    if compare:
        conditions.insert(0, baseline())
    spec = EvalSpec(Path(data), Path(audio_dir), model, Path(out), limit=limit, tasks=task_list,
                    prompt=prompt, max_tokens=max_tokens, skip_missing=skip_missing, conditions=conditions)
    reports = run_eval(spec)
    for cond in spec.conditions:
        if cond.name in reports:
            click.echo(f"== {cond.name}: {spec.dir_for(cond)}")
            click.echo(reports[cond.name].table())
    if compare and reports:
        ctx.invoke(eval_compare, run_a=str(spec.dir_for(conditions[0])), run_b=str(spec.dir_for(conditions[1])),
                   as_json=False)


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
    Path(json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(json_out).write_text(json.dumps(out))
    if png:
        from mlx_listen.plots import heatmap

        Path(png).parent.mkdir(parents=True, exist_ok=True)

        heatmap(mass, Path(png), f"Audio attention mass at the last prompt token ({prompt.n_audio_tokens} audio tokens)",
                "attention mass on audio", marked=heads.heads if heads else ())
    click.echo(f"[INFO] audio mass of {mass.shape[0]}x{mass.shape[1]} heads written to {json_out}"
               + (f"; listening score {out['listening']:.4f}" if heads else ""), err=True)


@main.command()
@_data_options()
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="HEADS.json to write.")
@click.option("--k", default=20, show_default=True, type=click.IntRange(min=1), help="Heads to select.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random-head control in the plots.")
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
    items = _heads_items(data, audio_dir, limit)
    records = out.with_name(out.stem + ".items.jsonl")
    meta = {"model": model, "data": mmau.file_sha256(data), "prompt": prompt, "max_tokens": max_tokens,
            "seed": seed}
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


def _heads_items(data, audio_dir, limit) -> list[dict]:
    """The items of a `heads` / `validate-heads` run; refuse an empty set or missing audio up front."""
    from pathlib import Path

    from mlx_listen import mmau

    items = mmau.load_items(data)[:limit]
    if not items:
        raise ListenError(f"{data} holds no items")
    missing = [it["audio_id"] for it in items if not (Path(audio_dir) / it["audio_id"]).is_file()]
    if missing:
        raise ListenError(f"{len(missing)} audio files missing under {audio_dir}, e.g. {missing[0]}")
    return items


def _check_records_meta(records, meta: dict):
    """A resumable record file belongs to one model/data/prompt/decoding: refuse to mix."""
    side = records.with_suffix(".meta.json")
    if side.exists():
        old = json.loads(side.read_text())
        diff = [k for k in ("model", "data", "prompt", "max_tokens") if old.get(k) != meta.get(k)]
        if diff:
            raise ListenError(f"{records} was made with other settings ({', '.join(diff)} differ); use another --out")
    else:
        records.parent.mkdir(parents=True, exist_ok=True)
        side.write_text(json.dumps(meta))


@main.command("validate-heads")
@click.option("--heads", "heads_path", required=True, type=click.Path(exists=True, dir_okay=False))
@_data_options()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Report folder (resumable).")
@click.option("--seed", default=0, show_default=True, help="Bootstrap and random-control seed.")
@_friendly
def validate_heads(heads_path, model, data, audio_dir, out, limit, seed, prompt, max_tokens):
    """Does the listening score rise when the audio changes the answer? (audio vs equal-length silence)"""
    from pathlib import Path

    import numpy as np

    from mlx_listen import mmau
    from mlx_listen.heads import HeadSet, plot_listening_split, validate, validation_records
    from mlx_listen.load import load

    out = Path(out)
    hs = HeadSet.load(heads_path)
    items = _heads_items(data, audio_dir, limit)
    records = out / "items.jsonl"
    _check_records_meta(records, {"model": model, "data": mmau.file_sha256(data), "prompt": prompt,
                                  "max_tokens": max_tokens})
    mdl, processor = load(model)
    hs.check(len(mdl.layers), mdl.config.text_config.num_attention_heads)
    rows = validation_records(mdl, processor, items, Path(audio_dir), records, prompt, max_tokens)
    rep = validate(hs, rows, seed)
    (out / "validation.json").write_text(json.dumps(rep, indent=2))
    plot_listening_split(hs, np.array([r["audio_mass"] for r in rows]), np.array([r["changed"] for r in rows], bool),
                         ("audio changed answer", "unchanged"), out / "validation.png", seed)

    def f(v, spec=".4f"):
        return "n/a" if v is None else format(v, spec)

    h = rep["heads"]
    ci = h["difference_ci95"]
    click.echo(f"{rep['n']} items; the audio changed the answer on {rep['n_changed']}")
    click.echo(f"listening score: changed {f(h['mean_changed'])}, unchanged {f(h['mean_unchanged'])}, difference "
               f"{f(h['difference'], '+.4f')} (95% CI {f(ci and ci[0], '+.4f')} to {f(ci and ci[1], '+.4f')}), "
               f"AUC {f(h['auc'], '.3f')}")
    click.echo(f"random-head control AUC: {f(rep['random_auc_mean'], '.3f')} ± {f(rep['random_auc_sd'], '.3f')}")
    click.echo(f"[INFO] wrote {out / 'validation.json'} and {out / 'validation.png'}", err=True)


@main.group()
def steer():
    """Steering vectors and strength sweeps (audio-silence steering, arXiv 2603.06854)."""


@steer.command("build")
@click.option("--heads", "heads_path", required=True, type=click.Path(exists=True, dir_okay=False))
@_data_options(max_tokens=False)  # a direction needs prefills only, no answers
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Vector file (.safetensors).")
@click.option("--alpha", type=float, default=1.0, show_default=True, help="Default strength stored with the vector.")
@_friendly
def steer_build(heads_path, model, data, audio_dir, out, limit, alpha, prompt):
    """A fixed direction: the mean of the per-input audio-silence directions over calibration items."""
    from pathlib import Path

    from mlx_listen import mmau
    from mlx_listen.load import load
    from mlx_listen.steering import from_heads, save_vector
    from mlx_listen.sweep import build_vector

    cfg = from_heads(heads_path)
    items = mmau.load_items(data)[:limit]
    mdl, processor = load(model)
    vec, n = build_vector(mdl, processor, items, Path(audio_dir), cfg, prompt)
    save_vector(out, vec, apply_layer=len(mdl.layers) - 1, hidden_size=mdl.config.text_config.hidden_size,
                meta={"model": model, "layers": cfg.layers, "heads": [list(h) for h in cfg.heads], "coeff": alpha,
                      "normalize": "none", "positions": "prompt_last+generated", "source": "dataset_mean",
                      "calibration": {"data_sha256": mmau.file_sha256(data), "n_items": n, "prompt": prompt}})
    click.echo(f"[INFO] wrote {out}: mean direction over {n} items, |d| = {float(np.linalg.norm(vec)):.4g}", err=True)


@steer.command("sweep")
@click.option("--heads", "heads_path", required=True, type=click.Path(exists=True, dir_okay=False))
@_data_options()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Sweep folder (resumable).")
@click.option("--alphas", default="0,0.5,1,2,4", show_default=True, help="Comma-separated strengths.")
@click.option("--calib-fraction", default=0.5, show_default=True, type=click.FloatRange(0.05, 0.95))
@click.option("--seed", default=0, show_default=True, help="Split and random-control seed.")
@click.option("--random-controls", default=1, show_default=True, type=click.IntRange(min=0),
              help="Random-head control sets (same K) swept alongside.")
@click.option("--task", "tasks", default="sound,music,speech", show_default=True)
@click.option("--steer-at", type=click.Choice(["all", "prompt"]), default="all", show_default=True)
@_friendly
def steer_sweep(heads_path, model, data, audio_dir, out, alphas, calib_fraction, seed, random_controls, limit, tasks,
                prompt, max_tokens, steer_at):
    """Accuracy vs alpha on a calibration split; the best alpha applied to the disjoint test split."""
    from pathlib import Path

    from mlx_listen.config import ModelConfig
    from mlx_listen.evaluate import EvalSpec
    from mlx_listen.load import read_config, resolve
    from mlx_listen.steering import from_heads
    from mlx_listen.sweep import sweep

    try:
        grid = [float(a) for a in alphas.split(",") if a.strip()]
    except ValueError:
        raise click.BadParameter(f"not a list of numbers: {alphas}", param_hint="--alphas") from None
    cfg = from_heads(heads_path, at=steer_at)
    text = ModelConfig.from_dict(read_config(resolve(model))).text_config
    spec = EvalSpec(Path(data), Path(audio_dir), model, Path(out), limit=limit,
                    tasks=tuple(t.strip() for t in tasks.split(",")), prompt=prompt, max_tokens=max_tokens)
    res = sweep(spec, cfg, grid, calib_fraction=calib_fraction, seed=seed, n_random=random_controls,
                n_layers=text.num_hidden_layers, n_heads=text.num_attention_heads)
    click.echo(f"calibration split ({len(res['splits']['calibration'])} items): accuracy by alpha")
    for a in grid:
        r = res["calibration"]["heads"][f"{a:g}"]
        ctl = "  ".join(f"random#{i} {c[f'{a:g}']['overall']:.1%}" for i, c in enumerate(res["calibration"]["random"]))
        click.echo(f"  alpha {a:>5g}: {r['overall']:.1%}  {ctl}")
    t = res["test"]
    click.echo(f"chosen alpha {res['chosen_alpha']:g}; test split ({len(res['splits']['test'])} items): "
               f"base {t['base']['overall']:.1%} -> steered {t['steered']['overall']:.1%} "
               f"(flips +{t['compare']['overall']['wrong_to_right']} / -{t['compare']['overall']['right_to_wrong']}, "
               f"McNemar p {t['compare']['overall']['p_mcnemar']:.3g})")
    click.echo(f"[INFO] wrote {Path(out) / 'sweep.json'} and {Path(out) / 'sweep.png'}", err=True)


@main.command()
def version():
    """Print the versions of mlx-listen, mlx and mlx-lm."""
    click.echo(_versions())


if __name__ == "__main__":
    main()
