"""`mlx-listen profile`: several audio-LMs measured the same way, side by side.

Each model runs the cross-fitted experiment (`experiment.py`, the same `Settings` for all) into
`out/<name>/`, one model in memory at a time; the comparison (`profile_report.py`) then reads the
models' `report.json` and `base.jsonl` back and writes `out/profile.json`, `profile.md` and
`profile.png`: per model the audio attention mass per layer, the specialist heads beating the
permutation null and their layers, the listening AUC within strata, and baseline and steered
accuracy with paired intervals.

Before any model work, every input is checked: the models (`A,B,NAME=C`: a name from the folder or
the hub id's last part, or given; no two alike, no model twice), each model's config (its family,
shape and prompt preset; settings that need more heads than it has), the data and every clip, and
that `out/<name>/` holds neither another model's run nor one with other settings. A model that
fails while it runs (its weights will not load, a forward pass is not finite, too few usable items)
is reported as failed and the others go on; rerunning the same command retries it. Resumable: a model whose stages are all recorded is
not loaded at all (its backend loads the weights on the first item it has to answer), so a rerun of
a finished profile only rebuilds the reports.
"""

from __future__ import annotations

import gc
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .. import presets
from ..errors import ListenError, ListenWarning
from ..eval import mmau
from ..eval.evaluate import EvalSpec, audio_problems
from ..load import ModelRef
from ..records import claim, file_sha256, locked, provisional, read_json
from . import profile_report
from .experiment import Settings, run_experiment

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")
RESERVED = {"profile.json", "profile.md", "profile.png", "profile.meta.json"}


def model_name(spec: str) -> str:
    """A model's name in the report: its folder's name, or a hub id's last part (`Org/Name` -> `Name`)."""
    p = Path(spec).expanduser()
    return (p.resolve() if p.exists() else p).name


def parse_models(models) -> list[tuple[str, str]]:
    """`"A,B,NAME=C"` (or a list of such entries) -> [(name, model)]; a ListenError for an empty entry,
    a name that cannot be a folder name, or two models with one name."""
    parts = models.split(",") if isinstance(models, str) else list(models)
    parts = [str(p).strip() for p in parts]
    if not parts or any(not p for p in parts):
        raise ListenError(f"--models takes comma-separated models (folders or hub ids), e.g. qwen2-audio,af3,omni; "
                          f"got {models!r}, which has an empty entry")
    out = []
    for p in parts:
        name, spec = (x.strip() for x in p.split("=", 1)) if "=" in p else (model_name(p), p)
        if not spec:
            raise ListenError(f"--models entry {p!r} names no model")
        if not NAME.fullmatch(name) or name in RESERVED:
            raise ListenError(f"--models entry {p!r}: {name!r} cannot name a model's folder (letters, digits, "
                              "'.', '_', '+', '-'); name it with NAME=MODEL")
        out.append((name, spec))
    names = [n for n, _ in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        same = [s for n, s in out if n == dup[0]]
        raise ListenError(f"two models are named {dup[0]!r} ({', '.join(same)}); name them apart with NAME=MODEL")
    return out


@dataclass
class Entry:
    name: str
    spec: str
    ref: ModelRef
    family: str
    shape: tuple[int, int]
    fingerprint: str

    def to_json(self) -> dict:
        return {"name": self.name, "model": self.spec, "family": self.family, "layers": self.shape[0],
                "heads": self.shape[1], "fingerprint": self.fingerprint}


def check_model(name: str, spec: str, settings: Settings, out: Path) -> Entry:
    """What the config and the folder say, before any weight is loaded."""
    try:
        ref = ModelRef.of(spec)
        shape, family = ref.shape, ref.family
        presets.for_family(settings.prompt, family)
        settings.check_model(*shape)
        fingerprint = ref.fingerprint()
    except ListenError as e:
        raise ListenError(f"model {name} ({spec}): {e}") from None
    ident = out / name / "experiment.json"
    if ident.exists():
        old = read_json(ident, "run identity file")
        if not isinstance(old, dict) or old.get("model_fingerprint") != fingerprint:
            raise ListenError(f"{out / name} holds another model's experiment; name {spec} otherwise "
                              f"(NAME={spec}) or use another --out")
    return Entry(name, spec, ref, family, shape, fingerprint)


class LoadFailed(RuntimeError):
    """The model did not load: the model's failure, not one item's (`records.Stage` records a ListenError
    raised for an item as that item's error row, which a rerun would then take as done)."""


class LazyBackend:
    """The experiment's `ModelBackend` for one model, loaded on the first item it has to answer (a
    stage whose rows are all recorded asks nothing), and freed by `close()`."""

    def __init__(self, entry: Entry, audio_dir: Path, settings: Settings):
        self.entry, self.audio_dir, self.settings = entry, Path(audio_dir), settings
        self.shape, self.fingerprint = entry.shape, entry.fingerprint
        self._inner, self.loaded = None, False

    def _get(self):
        if self._inner is None:
            from .backend import ModelBackend

            self.loaded = True  # the model's work began (loading may still fail)
            try:
                self._inner = ModelBackend(self.entry.ref, self.audio_dir, self.settings)
            except ListenError as e:
                raise LoadFailed(f"it did not load: {e}") from None
        return self._inner

    def base(self, item):
        return self._get().base(item)

    def direction(self, item, layers):
        return self._get().direction(item, layers)

    def answer(self, item, conditions):
        return self._get().answer(item, conditions)

    def score(self, item, conditions):
        return self._get().score(item, conditions)

    def close(self):
        """Drop the model and its caches: the next model loads into free memory."""
        self._inner = None
        self.entry.ref._loaded = None
        gc.collect()
        if self.loaded:
            import mlx.core as mx

            mx.clear_cache()


def _one_line(e: BaseException) -> str:
    s = " ".join(str(e).split()) or type(e).__name__
    return s if isinstance(e, (ListenError, LoadFailed)) else f"{type(e).__name__}: {s}"


def run_model(entry: Entry, settings: Settings, data: Path, audio_dir: Path, out: Path, *, limit, tasks,
              progress: bool) -> dict:
    """One model's experiment into `out/<name>/`; a failure is this model's row, not the profile's end."""
    row = {**entry.to_json(), "status": "done"}
    backend = LazyBackend(entry, audio_dir, settings)
    try:
        run_experiment(settings, data, audio_dir, entry.spec, out / entry.name, limit=limit, tasks=tasks,
                       backend=backend, progress=progress)
    except Exception as e:  # noqa: BLE001 (any failure of one model: the others go on)
        row.update(status="failed", error=_one_line(e))
        warnings.warn(f"{entry.name} failed: {row['error']} (the other models go on; rerun to retry it)",
                      ListenWarning, stacklevel=2)
    finally:
        row["loaded"] = backend.loaded
        backend.close()
    return row


def profile(models, data, audio_dir, out, settings: Settings | None = None, *, limit: int | None = None,
            tasks: Sequence[str] = mmau.TASKS, progress: bool = True) -> dict:
    """`mlx-listen profile` (resumable: rerun the same command to continue). `models`: `"A,B,NAME=C"`
    or a list of entries. Returns profile.json's content; `out` gets profile.json, profile.md,
    profile.png and one experiment folder per model."""
    settings = settings or Settings()
    out, data, audio_dir = Path(out), Path(data), Path(audio_dir)
    named = parse_models(models)
    if out.exists() and not out.is_dir():
        raise ListenError(f"--out {out} is a file, not a folder")
    tasks = tuple(tasks)
    items = [it for it in mmau.load_items(data) if it["task"] in tasks][:limit]
    if len(items) < 2 * settings.folds:
        raise ListenError(f"{len(items)} items for {settings.folds} folds: use more items")
    problems = audio_problems(EvalSpec(data, audio_dir, "", out), items)
    if problems:
        shown = ", ".join(f"{a} ({why})" for a, why in problems[:5])
        raise ListenError(f"{len(problems)} audio files are missing or unreadable under {audio_dir}, e.g. {shown}")
    entries = [check_model(name, spec, settings, out) for name, spec in named]
    seen = {}
    for e in entries:
        if e.fingerprint in seen:
            raise ListenError(f"{seen[e.fingerprint]} and {e.name} are the same weights: give each model once")
        seen[e.fingerprint] = e.name
    identity = {"data_sha256": file_sha256(data), "tasks": list(tasks), "limit": limit, **settings.to_json()}
    for e in entries:  # an experiment folder put there by hand (`mlx-listen experiment`) must match too
        ident = out / e.name / "experiment.json"
        old = read_json(ident, "run identity file") if ident.exists() else {}
        diff = [k for k in identity if k in old and old[k] != identity[k]]
        if diff:
            raise ListenError(f"{out / e.name} holds an experiment with other settings ({', '.join(diff)} differ); "
                              "use the same settings to resume, or another --out")
    with locked(out), provisional(out / "profile.meta.json"):
        claim(out / "profile.meta.json", identity, extra={"data": str(data)})
        runs = [run_model(e, settings, data, audio_dir, out, limit=limit, tasks=tasks, progress=progress)
                for e in entries]
        meta = {"data": str(data), "data_sha256": identity["data_sha256"], "audio_dir": str(audio_dir),
                "tasks": list(tasks), "limit": limit, "n_items": len(items), "settings": settings.to_json()}
        result = profile_report.build(out, runs, meta)
        profile_report.write(out, result)
    return result
