"""What every command shares: the group class that turns `ListenError` into one `Error:` line,
click parameter types (finite numbers, number lists, tasks, ablation modes) and option blocks."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import click

from mlx_listen.errors import ListenError, ListenWarning
from mlx_listen.eval.mmau import TASKS as TASK_NAMES
from mlx_listen.models import DEFAULT_MODEL
from mlx_listen.presets import DEFAULT_PRESET, PROMPTS

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3", ".m4a", ".aiff", ".aif", ".opus"}


class Group(click.Group):
    """ListenError -> click's one `Error:` line (exit 1); Ctrl-C -> `Interrupted.` (exit 130)."""

    def invoke(self, ctx):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always", ListenWarning)
                warnings.showwarning = show_warning
                return super().invoke(ctx)
        except ListenError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            ctx.exit(130)


def show_warning(message, category, filename, lineno, file=None, line=None):
    if issubclass(category, ListenWarning):
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
        bad = [t for t in tasks if t not in TASK_NAMES]
        if bad or not tasks:
            self.fail(f"unknown task {', '.join(bad) or '(none)'}; choose from {', '.join(TASK_NAMES)}", param, ctx)
        return tasks


FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
DIR = click.Path(exists=True, file_okay=False, path_type=Path)


def options(*opts):
    def apply(fn):
        for o in reversed(opts):
            fn = o(fn)
        return fn

    return apply


def _preset_fits_model(ctx, param, value):
    """--model and --prompt, whichever comes second: a preset that does not fit the model's family is a user
    error before anything loads (the family from the folder's or the hub cache's config, never the network)."""
    ctx.meta[f"mlx_listen.{param.name}"] = value
    model, preset = ctx.meta.get("mlx_listen.model"), ctx.meta.get("mlx_listen.prompt")
    given = any(ctx.get_parameter_source(n) not in (None, click.core.ParameterSource.DEFAULT) for n in ("model", "prompt"))
    if model is not None and preset is not None and given:  # the defaults fit each other
        from mlx_listen.models import family_if_known
        from mlx_listen.presets import for_family

        kind = family_if_known(model)
        if kind is not None:
            for_family(preset, kind)
    return value


MODEL = click.option("--model", "-M", default=DEFAULT_MODEL, show_default=True, callback=_preset_fits_model,
                     help="MLX or HF model folder, or a Hugging Face repo id.")
MAX_TOKENS = click.option("--max-tokens", "-m", type=click.IntRange(min=1), default=256, show_default=True,
                          help="Most tokens to generate.")
PROMPT = click.option("--prompt", default=DEFAULT_PRESET, show_default=True, type=click.Choice(list(PROMPTS)),
                      callback=_preset_fits_model,
                      help="Prompt preset: r1-aqa (R1-AQA's, answer in <answer> tags), r1-aqa-think (Qwen2-Audio "
                           "only), or mmau (the MMAU authors').")
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


class AblateMode(click.ParamType):
    """`zero`, `mean`, `scale:F` (F finite) or `audio`: how heads are ablated, in every command."""

    name = "zero|mean|scale:F|audio"

    def __init__(self, mean: bool = True):
        self.mean = mean  # the experiment has no means file to ablate with

    def convert(self, value, param, ctx):
        from mlx_listen.interp.ablation import parse_mode

        try:
            mode = parse_mode(value)[0]
        except ListenError as e:
            self.fail(str(e), param, ctx)
        if mode == "mean" and not self.mean:
            self.fail("zero, scale:F or audio (mean ablation needs a means file fitted per fold)", param, ctx)
        return value


class AblateModes(click.ParamType):
    """Comma-separated ablation modes (`zero,audio`), each as `AblateMode`, no repeats."""

    name = "modes"

    def __init__(self, mean: bool = False):
        self.one = AblateMode(mean=mean)

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        modes = [m.strip() for m in str(value).split(",") if m.strip()]
        if not modes:
            self.fail("give at least one mode, e.g. zero,audio", param, ctx)
        if len(set(modes)) != len(modes):
            self.fail(f"a mode is repeated: {value!r}", param, ctx)
        return tuple(self.one.convert(m, param, ctx) for m in modes)


ABLATE_MODE_HELP = ("zero: set the heads' outputs to 0; mean: replace them by their calibration mean (--ablate-means); "
                    "scale:F: multiply them by F; audio: keep them but stop them attending to the audio "
                    "(renormalised).")

ablate_options = options(
    click.option("--ablate", default=None, metavar="HEADS.json|L.H,...",
                 help="Ablate these heads (a HEADS.json, or heads written layer.head, comma-separated)."),
    click.option("--ablate-mode", type=AblateMode(), default=None, help=ABLATE_MODE_HELP + "  [default: zero]"),
    click.option("--ablate-audio", is_flag=True, hidden=True, help="The same as --ablate-mode audio."),
    click.option("--ablate-means", type=FILE, default=None, help="Mean head outputs (`mlx-listen ablate means`)."),
)


def ablation(ablate, ablate_mode, ablate_audio, ablate_means):
    """The `Ablation` of the ablation options, or None."""
    if ablate is None:
        if ablate_audio or ablate_means or ablate_mode is not None:
            raise click.UsageError("--ablate-mode/--ablate-means need --ablate HEADS")
        return None
    from mlx_listen.interp.ablation import from_options

    try:
        return from_options(ablate, ablate_mode or "zero", ablate_audio, ablate_means)
    except ListenError as e:
        raise click.BadParameter(str(e), param_hint="--ablate") from None


def steering(steer_path, vector_path, alpha, steer_at, strength, normalize, steer_layer):
    """(SteerConfig, settings) of the steering options, or (None, {}) when none is given."""
    if not steer_path and not vector_path:
        if alpha is not None:
            raise click.UsageError("--alpha needs --steer HEADS.json or --vector FILE")
        return None, {}
    from mlx_listen.headset import HeadSet
    from mlx_listen.method.directions import steer_config

    heads = HeadSet.load(steer_path) if steer_path else None
    return steer_config(heads, vector_path, alpha=alpha, at=steer_at, strength=strength, normalize=normalize,
                        apply_layer=steer_layer)


def check_png(path: Path | None, option: str):
    if path is not None and path.suffix.lower() != ".png":
        raise click.BadParameter(f"{path} must end in .png", param_hint=option)
    if path is not None and not path.parent.is_dir():
        raise click.BadParameter(f"the folder {path.parent} does not exist", param_hint=option)
