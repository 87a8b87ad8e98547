"""`mlx-listen`: the command line, a click layer over `mlx_listen` (installed as `mlx_listen.cli`).

Each command parses and checks its options (click types with ranges, so a bad number is a usage
error, exit 2, before anything loads), calls one library function and prints. A user error
(`ListenError`) becomes click's `Error: …` line and exit 1; warnings from the library print as
one `[WARNING] …` line each. Model code is imported inside the commands that need it, so
`--help`, `eval score` and `make-demo-set` start fast.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path

import click

from mlx_listen import __version__, mmau
from mlx_listen.config import DEFAULT_MODEL
from mlx_listen.errors import ListenError

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3", ".m4a", ".aiff", ".aif", ".opus"}


# -- click plumbing ------------------------------------------------------------------------------

class Group(click.Group):
    """ListenError -> click's one `Error:` line (exit 1); Ctrl-C -> `Interrupted.` (exit 130)."""

    def invoke(self, ctx):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always", _warning_class())
                warnings.showwarning = _show_warning
                return super().invoke(ctx)
        except ListenError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            ctx.exit(130)


def _warning_class():
    from mlx_listen.errors import ListenWarning

    return ListenWarning


def _show_warning(message, category, filename, lineno, file=None, line=None):
    if issubclass(category, _warning_class()):
        click.echo(f"[WARNING] {message}", err=True)
    else:  # someone else's warning: Python's own format
        click.echo(warnings.formatwarning(message, category, filename, lineno, line).rstrip(), err=True)


class Finite(click.FloatRange):
    """A float in a range that is also finite (click's FloatRange lets NaN through)."""

    name = "number"

    def _describe_range(self) -> str:
        if self.min is None and self.max is None:
            return "finite"
        return super()._describe_range()

    def convert(self, value, param, ctx):
        v = super().convert(value, param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return v


class NumberList(click.ParamType):
    """Comma-separated finite numbers, at least one, no repeats (`--alphas 0,0.5,1`)."""

    name = "numbers"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        parts = [p.strip() for p in str(value).split(",") if p.strip()]
        if not parts:
            self.fail("give at least one number, e.g. 0,0.5,1", param, ctx)
        try:
            nums = [float(p) for p in parts]
        except ValueError:
            self.fail(f"not a list of numbers: {value!r}", param, ctx)
        if not all(math.isfinite(x) for x in nums):
            self.fail(f"every value must be a finite number: {value!r}", param, ctx)
        if len(set(nums)) != len(nums):
            self.fail(f"a value is repeated: {value!r}", param, ctx)
        return nums


class TaskList(click.ParamType):
    """Comma-separated MMAU tasks (`sound,music,speech`)."""

    name = "tasks"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        tasks = tuple(dict.fromkeys(t.strip() for t in str(value).split(",") if t.strip()))
        bad = [t for t in tasks if t not in mmau.TASKS]
        if bad or not tasks:
            self.fail(f"unknown task {', '.join(bad) or '(none)'}; choose from {', '.join(mmau.TASKS)}", param, ctx)
        return tasks


FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
DIR = click.Path(exists=True, file_okay=False, path_type=Path)


def options(*opts):
    def apply(fn):
        for o in reversed(opts):
            fn = o(fn)
        return fn

    return apply


MODEL = click.option("--model", "-M", default=DEFAULT_MODEL, show_default=True,
                     help="MLX or HF model folder, or a Hugging Face repo id.")
MAX_TOKENS = click.option("--max-tokens", "-m", type=click.IntRange(min=1), default=256, show_default=True,
                          help="Most tokens to generate.")
PROMPT = click.option("--prompt", default=mmau.DEFAULT_PRESET, show_default=True, type=click.Choice(list(mmau.PROMPTS)),
                      help="Prompt preset (shared/design/mmau.md §7).")
FORCE = click.option("--force", is_flag=True,
                     help="Use a head set or vector found on another model or prompt (recorded in the outputs).")
TASKS = click.option("--task", "tasks", type=TaskList(), default="sound,music,speech", show_default=True,
                     help="Comma-separated tasks (applied before --limit).")


def data_options(required: bool = True, max_tokens: bool = True):
    """--model/--data/--audio-dir/--limit/--prompt[/--max-tokens]: every command that runs a data set."""
    opts = [MODEL,
            click.option("--data", required=required, type=FILE, help="MMAU-format JSON (labelled items)."),
            click.option("--audio-dir", required=required, type=DIR,
                         help="Folder the items' audio_id paths are relative to."),
            click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N items."),
            PROMPT]
    return options(*opts, *([MAX_TOKENS] if max_tokens else []))


steer_options = options(
    click.option("--steer", "steer_path", type=FILE, default=None,
                 help="Steer with the audio-silence direction over the layers of these HEADS.json heads."),
    click.option("--vector", "vector_path", type=FILE, default=None,
                 help="Steer with a fixed direction file (`mlx-listen steer build`)."),
    click.option("--alpha", type=Finite(), default=None,
                 help="Steering strength [default: 1, or a --vector file's own strength]."),
    click.option("--steer-at", type=click.Choice(["all", "prompt"]), default="all", show_default=True,
                 help="Steer the last prompt position and every generated token, or the prompt only."),
    click.option("--strength", type=click.Choice(["fixed", "listening"]), default="fixed", show_default=True,
                 help="'listening': alpha x clip(calibration mean L / L(x), 0, 2): steer harder when the model "
                      "listens less (needs --steer HEADS.json)."),
    click.option("--normalize", type=click.Choice(["none", "unit", "relative"]), default="none", show_default=True,
                 help="Scale of the direction: raw, unit, or relative to |h_final[T]|."),
    click.option("--steer-layer", type=int, default=-1, show_default=True,
                 help="Decoder block whose output is edited (-1: the last, i.e. before the final norm)."),
)


ablate_options = options(
    click.option("--ablate", default=None, metavar="HEADS.json|L.H,...",
                 help="Ablate these heads (a HEADS.json, or heads written layer.head, comma-separated)."),
    click.option("--ablate-mode", default="zero", show_default=True, metavar="zero|mean|scale:F",
                 help="Zero the heads' outputs, replace them by their calibration mean (--ablate-means), or "
                      "scale them by F."),
    click.option("--ablate-audio", is_flag=True,
                 help="Instead of editing the heads' outputs, stop them attending to the audio (renormalised)."),
    click.option("--ablate-means", type=FILE, default=None, help="Mean head outputs (`mlx-listen ablate means`)."),
)


def _ablation(ablate, ablate_mode, ablate_audio, ablate_means):
    if ablate is None:
        if ablate_audio or ablate_means or ablate_mode != "zero":
            raise click.UsageError("--ablate-mode/--ablate-audio/--ablate-means need --ablate HEADS")
        return None
    from mlx_listen.ablation import from_options

    try:
        return from_options(ablate, ablate_mode, ablate_audio, ablate_means)
    except ListenError as e:
        raise click.BadParameter(str(e), param_hint="--ablate") from None


def _steering(steer_path, vector_path, alpha, steer_at, strength, normalize, steer_layer):
    """(SteerConfig, settings) or (None, {}) when no steering option is given."""
    if not steer_path and not vector_path:
        if alpha is not None:
            raise click.UsageError("--alpha needs --steer HEADS.json or --vector FILE")
        return None, {}
    from mlx_listen.heads import HeadSet
    from mlx_listen.steering import steer_config

    heads = HeadSet.load(steer_path) if steer_path else None
    return steer_config(heads, vector_path, alpha=alpha, at=steer_at, strength=strength, normalize=normalize,
                        apply_layer=steer_layer)


def _bindings(*paths) -> list[tuple[str, dict]]:
    """(label, meta) of each HEADS.json / vector file given, for `identity.check_binding`."""
    from mlx_listen.heads import HeadSet
    from mlx_listen.steering import vector_binding

    out = []
    for p in paths:
        if p is None or not Path(p).is_file():
            continue
        out.append((str(p), vector_binding(p) if Path(p).suffix == ".safetensors" else HeadSet.load(p).meta or {}))
    return out


def _png(path: Path | None, option: str):
    if path is not None and path.suffix.lower() != ".png":
        raise click.BadParameter(f"{path} must end in .png", param_hint=option)
    if path is not None and not path.parent.is_dir():
        raise click.BadParameter(f"the folder {path.parent} does not exist", param_hint=option)


# -- commands --------------------------------------------------------------------------------------

@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(message="%(version)s", version=__version__, package_name="mlx-listen")
def main():
    """Run Qwen2-Audio in MLX, see whether it listens to the audio, and steer it to listen more."""


@main.command()
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
    _png(png, "--png")
    if Path(question).suffix.lower() in AUDIO_SUFFIXES and Path(question).is_file():
        warnings.warn(f"the question {question!r} is an audio file; the last argument is the question",
                      _warning_class())
    from mlx_listen.ask import ask as run
    from mlx_listen.heads import HeadSet
    from mlx_listen.load import load
    from mlx_listen.prompt import as_features, prepare

    heads = HeadSet.load(heads_path or steer_path) if listen else None
    steer_cfg, _ = _steering(steer_path, vector_path, alpha, steer_at, strength, normalize, steer_layer)
    ablation = _ablation(ablate, ablate_mode, ablate_audio, ablate_means)
    if steer_cfg and ablation:
        raise click.UsageError("--steer/--vector and --ablate cannot be combined in one answer")
    feats = [as_features(c) for c in clips]  # bad audio fails before the model loads
    mdl, processor = load(model)
    if heads:
        heads.check(len(mdl.layers), mdl.config.text_config.num_attention_heads)
    if ablation:
        ablation.check(mdl)
    if steer_cfg:  # before anything is printed
        t = mdl.config.text_config
        steer_cfg.validate(len(mdl.layers), t.hidden_size, t.num_attention_heads)
    from mlx_listen.identity import check_binding

    for label, meta in _bindings(heads_path, steer_path, vector_path, ablate):
        for w in check_binding(meta, label, model=mdl, force=force):
            warnings.warn(w, _warning_class())
    prompt = prepare(mdl, processor, feats, question, system)
    if not quiet:
        click.echo("=" * 10)
    answer = run(mdl, processor, clips, question, prompt=prompt, heads=heads, steer=steer_cfg, ablate=ablation,
                 on_text=None if quiet else (lambda s: click.echo(s, nl=False)), max_tokens=max_tokens, temp=temp,
                 top_p=top_p, top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed)
    if quiet:
        click.echo(answer.text)
    else:
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
        if ablation:
            stats.append(f"Ablation: {ablation.to_json()['mode']} of heads {ablation.heads}")
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
        if ablation:
            extra["ablation"] = ablation.to_json()
        click.echo(json.dumps({**answer.to_json(), **extra}))


@main.command()
@click.option("--hf-path", "--model", "hf_path", required=True, help="HF folder or repo id to convert.")
@click.option("--mlx-path", default="mlx_model", show_default=True, type=click.Path(path_type=Path),
              help="Output folder.")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
              help="Cast weights (default: keep the checkpoint's dtype).")
@click.option("-q", "--quantize", is_flag=True, help="Quantise the language model (affine).")
@click.option("--q-bits", type=click.Choice(["4", "8"]), default="4", show_default=True)
@click.option("--q-group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True,
              help="Weights per quantisation group (the sizes MLX supports).")
@click.option("--force", is_flag=True, help="Replace an existing model folder (one with config.json) or an "
              "empty folder; never a file, the source checkpoint, or a folder inside or around it.")
def convert(hf_path, mlx_path, dtype, quantize, q_bits, q_group_size, force):
    """Convert a Hugging Face Qwen2-Audio checkpoint to an MLX folder."""
    from mlx_listen.convert.convert import convert as run

    out = run(hf_path, str(mlx_path), dtype=dtype, quantize=quantize, q_bits=int(q_bits),
              q_group_size=int(q_group_size), force=force)
    click.echo(f"[INFO] Saved the MLX model to {out}", err=True)


@main.command()
@click.argument("bundle", type=DIR)
@click.option("--model", "-M", default=None, help="MLX or HF folder or repo id (default: the bundle's model).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def parity(bundle, model, as_json):
    """Check an MLX model against a reference BUNDLE from `mlx-listen-reference` (exit 0 only if all pass)."""
    from mlx_listen.parity import parity as run

    report = run(bundle, model, progress=not as_json)
    click.echo(json.dumps(report.to_dict()) if as_json else report.table())
    sys.exit(0 if report.ok else 1)


@main.group(cls=Group, invoke_without_command=True)
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
def eval(ctx, data, audio_dir, model, out, limit, tasks, prompt, max_tokens, skip_missing,  # noqa: A001
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
    from mlx_listen.ablation import conditions_for
    from mlx_listen.conditions import baseline, steered
    from mlx_listen.evaluate import EvalSpec, run_eval
    from mlx_listen.heads import HeadSet
    from mlx_listen.records import read_predictions

    steer_cfg, settings = _steering(steer_path, vector_path, alpha, steer_at, strength, normalize, steer_layer)
    ablation = _ablation(ablate, ablate_mode, ablate_audio, ablate_means)
    if ablate_controls and not ablation:
        raise click.UsageError("--ablate-controls needs --ablate HEADS")
    conditions = []
    if steer_cfg:
        conditions.append(steered(steer_cfg, settings=settings))
    if ablation:
        conditions += conditions_for(ablation, model, ablate_controls)
    if compare and not conditions:
        raise click.UsageError("--compare needs a condition to compare: --steer, --vector or --ablate")
    if compare or not conditions:
        conditions.insert(0, baseline())
    listen_heads = list(HeadSet.load(listen_path).heads) if listen_path else []
    spec = EvalSpec(data, audio_dir, model, out, limit=limit, tasks=tasks, prompt=prompt, max_tokens=max_tokens,
                    skip_missing=skip_missing, conditions=conditions, listen_heads=listen_heads,
                    bindings=_bindings(steer_path, vector_path, listen_path, ablate), force=force, score=score_mode)
    reports = run_eval(spec)
    for cond in spec.conditions:
        if cond.name in reports:
            click.echo(f"== {cond.name}: {spec.dir_for(cond)}")
            click.echo(reports[cond.name].table())
            if score_mode != "generate":
                from mlx_listen.scoring import summary_line

                click.echo(summary_line(getattr(reports[cond.name], "logprob", None)))
    if compare and reports:
        a = spec.dir_for(conditions[0])
        for cond in conditions[1:]:
            b = spec.dir_for(cond)
            res = mmau.compare(read_predictions(a), read_predictions(b))
            click.echo("\n".join(mmau.compare_lines(res, str(a), str(b))))


@eval.command("score")
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


@eval.command("compare")
@click.argument("run_a", type=click.Path(exists=True, path_type=Path))
@click.argument("run_b", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_compare(run_a, run_b, as_json):
    """Paired comparison of two runs (or predictions files): accuracy, flips, McNemar's exact p."""
    from mlx_listen.records import read_predictions

    res = mmau.compare(read_predictions(run_a), read_predictions(run_b))
    click.echo(json.dumps(res) if as_json else "\n".join(mmau.compare_lines(res, str(run_a), str(run_b))))


@main.command("make-demo-set")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--per-kind", type=click.IntRange(min=1), default=4, show_default=True,
              help="Items per kind of question.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
def make_demo_set(out_dir, per_kind, seed):
    """Write a small synthetic MMAU-format set (WAV clips + demo.json) to smoke-test `eval` offline."""
    from mlx_listen.demo_set import make_demo_set as make

    path = make(out_dir, n_per_kind=per_kind, seed=seed)
    click.echo(f"[INFO] Wrote {path}; run: mlx-listen eval --data {path} --audio-dir {out_dir} --out RUN_DIR",
               err=True)


@main.command()
@click.argument("clip", type=click.Path(path_type=Path))
@click.argument("question")
@MODEL
@click.option("--json", "json_out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Write the result here.")
@click.option("--heads", "heads_path", type=FILE, default=None, help="HEADS.json: also compute the listening score.")
@click.option("--png", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Draw the layers x heads heatmap.")
@click.option("--system", default=None, help="System prompt.")
def attention(clip, question, model, json_out, heads_path, png, system):
    """Per layer and head, the attention mass on the audio at the last prompt token."""
    _png(png, "--png")
    from mlx_listen.heads import HeadSet, attention_map
    from mlx_listen.load import load
    from mlx_listen.prompt import as_features

    feats = as_features(clip)
    heads = HeadSet.load(heads_path) if heads_path else None
    mdl, processor = load(model)
    if heads:
        heads.check(len(mdl.layers), mdl.config.text_config.num_attention_heads)
    out = attention_map(mdl, processor, feats, question, system=system, heads=heads, json_out=json_out, png=png)
    click.echo(f"[INFO] audio mass of {out['layers']}x{out['heads']} heads written to {json_out}"
               + (f"; listening score {out['listening']:.4f}" if heads else ""), err=True)


@main.command()
@data_options()
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="HEADS.json to write.")
@click.option("--k", default=20, show_default=True, type=click.IntRange(min=1), help="Heads to select.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed of the permutation null, the bootstrap and the random-head control in the plots.")
@click.option("--center", type=click.Choice(["none", "task"]), default="none", show_default=True,
              help="Head scores: the paper's pooled Pearson r, or within task with clip length partialled out.")
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
    from mlx_listen.heads import discover, usable

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
    click.echo(f"permutation null ({null['n_perm']} shuffles within task): {null['n_beating_null']} heads above the "
               f"family-wise 5% threshold r = {null['fwer_threshold']:.3f}; set p = {null['p_set']:.3g}; overlap with "
               f"center={hs.meta['other_center']['center']}: Jaccard {hs.meta['other_center']['jaccard']:.2f}")
    if failed:
        click.echo(f"[WARNING] {len(failed)} items could not be used (see {out.stem}.items.jsonl), e.g. "
                   f"{failed[0]['id']}: {failed[0]['error']}", err=True)
    click.echo(f"[INFO] wrote {out} and its .csv, .scores.png, .listening.png", err=True)


@main.command("validate-heads")
@click.option("--heads", "heads_path", required=True, type=FILE)
@data_options()
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Report folder (resumable).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Bootstrap and random-control seed.")
@FORCE
def validate_heads(heads_path, model, data, audio_dir, out, limit, seed, prompt, max_tokens, force):
    """Does the listening score rise when the audio changes the answer? (audio vs equal-length silence)"""
    from mlx_listen.heads import HeadSet, validate_run, validation_lines

    rep = validate_run(HeadSet.load(heads_path), model, data, audio_dir, out, limit=limit, seed=seed, prompt=prompt,
                       max_tokens=max_tokens, force=force)
    click.echo("\n".join(validation_lines(rep)))
    click.echo(f"[INFO] wrote {out / 'validation.json'} and {out / 'validation.png'}", err=True)


@main.group(cls=Group)
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

    from mlx_listen.heads import HeadSet
    from mlx_listen.sweep import build

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
              help="Random-head control sets (same K) swept alongside.")
@TASKS
@click.option("--steer-at", type=click.Choice(["all", "prompt"]), default="all", show_default=True)
@click.option("--score", "score_mode", type=click.Choice(["generate", "logprob", "both"]), default="generate",
              show_default=True, help="As in eval; logprob or both add the correct option's margin per alpha "
              "(a graded curve, paired 95% CIs) and sweep_margin.png.")
@FORCE
def steer_sweep(heads_path, model, data, audio_dir, out, alphas, calib_fraction, seed, random_controls, limit, tasks,
                prompt, max_tokens, steer_at, score_mode, force):
    """Accuracy vs alpha on a calibration split; the best alpha applied to the disjoint test split."""
    from mlx_listen.evaluate import EvalSpec
    from mlx_listen.heads import HeadSet
    from mlx_listen.steering import from_heads
    from mlx_listen.sweep import sweep, sweep_lines

    cfg = from_heads(HeadSet.load(heads_path), at=steer_at)
    spec = EvalSpec(data, audio_dir, model, out, limit=limit, tasks=tasks, prompt=prompt, max_tokens=max_tokens,
                    bindings=_bindings(heads_path), force=force, score=score_mode)
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
def steer_inspect(source, model, data, audio_dir, limit, prompt, tasks, top_k, alpha, out, show):
    """The logit lens of a steering direction: the tokens it promotes and demotes through the final
    norm and lm_head, and, with --data, the audio-silence contrast at every layer and the direction's
    cosine consistency across items and tasks.

    \b
    mlx-listen steer inspect runs/heads/HEADS.json --data mmau.json --audio-dir audio --out runs/inspect
    mlx-listen steer inspect runs/vector.safetensors
    """
    from mlx_listen.lens import inspect, inspect_lines

    if (data is None) != (audio_dir is None):
        raise click.UsageError("--data and --audio-dir go together")
    res = inspect(source, model, data, audio_dir, out, limit=limit, tasks=tasks, prompt=prompt, top_k=top_k,
                  alpha=alpha)
    failed = (res.get("data") or {}).get("failed") or []
    if failed:
        click.echo(f"[WARNING] {len(failed)} items could not be used, e.g. {failed[0]['id']}: {failed[0]['error']}",
                   err=True)
    click.echo("\n".join(inspect_lines(res, show)))
    if out is not None:
        click.echo(f"[INFO] wrote {', '.join(str(Path(out) / f) for f in res['files'])}", err=True)


@main.command()
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
def patch(args, model, data, audio_dir, limit, tasks, prompt, out, tokens, head_at, min_gap, first_diff, heads_path,
          system, max_rows):
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
    from mlx_listen.heads import HeadSet
    from mlx_listen.load import load, resolve, weights_fingerprint
    from mlx_listen.patching import PatchConfig, patch_lines, patch_run
    from mlx_listen.prompt import as_features

    heads = HeadSet.load(heads_path) if heads_path else None
    cfg = PatchConfig(head_at=head_at, tokens=tokens, min_gap=min_gap, first_diff=first_diff, preset=prompt,
                      max_rows=max_rows)
    items = identity = clip = question = None
    if data is not None:
        items = [it for it in mmau.load_items(data) if it["task"] in tasks][:limit]
        if not items:
            raise ListenError(f"no items in {data} for tasks {', '.join(tasks)}")
        identity = {"model_fingerprint": weights_fingerprint(resolve(model)), "data_sha256": mmau.file_sha256(data)}
    else:
        clip, question = as_features(args[0]), args[1]  # bad audio fails before the model loads
        if Path(question).suffix.lower() in AUDIO_SUFFIXES and Path(question).is_file():
            warnings.warn(f"the question {question!r} is an audio file; the last argument is the question",
                          _warning_class())
    mdl, processor = load(model)
    if heads:
        heads.check(len(mdl.layers), mdl.config.text_config.num_attention_heads)
    marked = heads.heads if heads else ()
    summary = patch_run(mdl, processor, out, clip=clip, question=question, system=system,
                        name=args[0] if args else None, items=items, audio_dir=audio_dir, identity=identity,
                        config=cfg, marked=marked)
    click.echo("\n".join(patch_lines(summary, marked)))
    click.echo(f"[INFO] wrote {out / 'patch.json'}" + "".join(f", {out / f}" for f in summary["files"]), err=True)


@main.command()
@data_options()
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Experiment folder (resumable: rerun the same command to continue).")
@TASKS
@click.option("--folds", type=click.IntRange(min=2), default=2, show_default=True, help="Cross-fitting folds.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Folds, random head sets, permutations and bootstraps.")
@click.option("--k", type=click.IntRange(min=1), default=20, show_default=True, help="Specialist heads per fold.")
@click.option("--alphas", type=NumberList(), default="0.5,1,1.5,2,3", show_default=True,
              help="Steering strengths to choose from, per condition, on each fold's calibration items.")
@click.option("--random-sets", type=click.IntRange(min=1), default=10, show_default=True,
              help="Matched random head sets (19 or more can show p < 0.05).")
@click.option("--center", type=click.Choice(["none", "task"]), default="none", show_default=True,
              help="Head scores: the paper's pooled Pearson r, or within task with clip length partialled out.")
@click.option("--n-perm", type=click.IntRange(min=20), default=200, show_default=True,
              help="Permutations of the head-score null.")
@click.option("--ablate/--no-ablate", "do_ablate", default=True, show_default=True,
              help="Also test specialist-head and random-head ablation.")
@click.option("--ablate-mode", default="zero", show_default=True, metavar="zero|scale:F|audio",
              help="How the heads are ablated (audio: masked off the audio positions).")
@click.option("--ablate-sets", type=click.IntRange(min=0), default=None,
              help="Random-head ablations [default: one per random set].")
def experiment(model, data, audio_dir, limit, prompt, max_tokens, out, tasks, folds, seed, k, alphas, random_sets,
               center, n_perm, do_ablate, ablate_mode, ablate_sets):
    """The paper's protocol, cross-fitted: heads and alpha fitted on other folds, reported on held-out
    items, against matched random head sets, the dataset-mean vector and head ablation.

    \b
    mlx-listen experiment --data mmau-test-mini.json --audio-dir MMAU --out exp/qwen2-audio
    Writes EXP/report.md (the verdict and its tables, with PNGs) and EXP/report.json.
    """
    from mlx_listen.experiment import Settings, run_experiment

    if ablate_mode not in ("zero", "audio") and not ablate_mode.startswith("scale:"):
        raise click.BadParameter("zero, scale:F or audio", param_hint="--ablate-mode")
    settings = Settings(folds=folds, seed=seed, k=k, alphas=tuple(alphas), random_sets=random_sets, prompt=prompt,
                        max_tokens=max_tokens, center=center, n_perm=n_perm, ablate=do_ablate, ablate_mode=ablate_mode,
                        ablate_sets=ablate_sets)
    report = run_experiment(settings, data, audio_dir, model, out, limit=limit, tasks=tasks)
    click.echo("\n".join(report["verdict"]))
    click.echo(f"[INFO] wrote {out / 'report.md'} and {out / 'report.json'}", err=True)


@main.group(cls=Group)
def ablate():
    """Head ablation helpers (the ablation itself is `--ablate` on ask and eval)."""


@ablate.command("means")
@data_options(max_tokens=False)
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Means file to write (.safetensors).")
def ablate_means_cmd(model, data, audio_dir, out, limit, prompt):
    """Every head's mean output over the calibration prompts, for `--ablate-mode mean`."""
    from mlx_listen.ablation import means_from_data

    if not out.parent.is_dir():
        raise click.BadParameter(f"the folder {out.parent} does not exist", param_hint="--out")
    path, meta = means_from_data(model, data, audio_dir, out, limit=limit, prompt=prompt)
    click.echo(f"[INFO] wrote {path}: mean head outputs over {meta['n_items']} prompts ({meta['n_positions']} "
               "positions)", err=True)


@main.command()
def version():
    """Print the versions of mlx-listen, mlx and mlx-lm."""
    import mlx.core as mx
    import mlx_lm

    click.echo(f"mlx-listen {__version__}, mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}")


if __name__ == "__main__":
    main()
