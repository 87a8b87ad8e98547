"""`mlx-listen eval`: MMAU-format evaluation with resume, official scoring and several Macs at once.

A run folder holds `run.json` (what identifies the run: the model's weight fingerprint, prompt,
decoding, data hash, conditions), and per condition a `predictions.jsonl` written one fsync'd
line per item, so a run killed at any moment resumes where it stopped: a half-written last line
is dropped, ids already present are never redone. At the end it writes `predictions.json` (a
JSON array the official MMAU `evaluation.py` reads unchanged) and `summary.json`.

The runner takes its conditions (`conditions.Condition`: baseline, steered, ablated…) from the
caller and answers each item under all of them at once (`conditions.Answerer`: one prefill and
one batched decode for everything that edits only the last block's output). An item that cannot
be run (audio too short, NaN samples…) is recorded with an `error` and no `model_output`, counted
and listed in the summary, and left out of the official JSON: a run always finishes.

Under `mlx.launch` each rank takes a share of the remaining items and writes its own
`predictions.rank{r}.jsonl`; rank 0 merges them when all ranks are done.
"""

from __future__ import annotations

import json
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import soundfile as sf
from tqdm import tqdm

from .. import __version__, presets
from ..errors import AudioWarning, ListenError, ListenWarning
from ..headset import check_heads
from ..identity import check_binding
from ..interp import scoring
from ..load import ModelRef
from ..prompt import prepare
from ..records import PRED_FILE, Stage, claim, file_sha256, locked, provisional, read_jsonl, write_atomic, write_json
from . import logprob, mmau
from .conditions import Answerer, Condition, baseline

RUN_FILE, SUMMARY_FILE, OFFICIAL_FILE = "run.json", "summary.json", "predictions.json"


@dataclass
class EvalSpec:
    data: Path
    audio_dir: Path
    model: object  # a folder, repo id or loaded pair (`load.ModelRef`)
    out: Path
    limit: int | None = None
    tasks: tuple[str, ...] = mmau.TASKS
    prompt: str = presets.DEFAULT_PRESET
    max_tokens: int = 256
    skip_missing: bool = False
    conditions: list[Condition] = field(default_factory=lambda: [baseline()])
    ids: set[str] | None = None  # only these items (e.g. one fold of an experiment)
    listen_heads: list[tuple[int, int]] = field(default_factory=list)  # record the listening score per token
    score: str = "generate"  # "generate": greedy answers; "logprob": the best choice by log-prob answers; "both"
    bindings: list[tuple[str, dict]] = field(default_factory=list)  # (label, meta) of head sets / vectors used
    force: bool = False  # use a head set or vector bound to another model or prompt (recorded)
    warnings: list[str] = field(default_factory=list, repr=False)  # what the run found to warn about

    def dir_for(self, cond: Condition) -> Path:
        """The first condition writes to the run folder itself, the others to a subfolder each."""
        return self.out if cond is self.conditions[0] else self.out / cond.name


def audio_problem(path: Path) -> str | None:
    """Why `path` cannot be evaluated (missing, unreadable, empty), or None. Reads the header only."""
    if not path.is_file():
        return "missing"
    try:
        info = sf.info(str(path))
    except Exception as e:  # LibsndfileError/RuntimeError/TypeError, depending on the failure
        return f"unreadable ({str(e).removeprefix(f'Error opening {str(path)!r}: ')})"
    if info.frames == 0:
        return "no audio samples"
    return None


def select_items(spec: EvalSpec) -> list[dict]:
    """The items to run: task filter, id filter, then limit."""
    items = [it for it in mmau.load_items(spec.data)
             if it["task"] in spec.tasks and (spec.ids is None or it["id"] in spec.ids)]
    return items[: spec.limit] if spec.limit is not None else items


def audio_problems(spec: EvalSpec, items: list[dict]) -> list[tuple[str, str]]:
    """(audio_id, reason) for each distinct file that cannot be read, checked up front."""
    out, seen = [], {}
    for it in items:
        a = it["audio_id"]
        if a not in seen:  # one entry per file, though several items may share it
            seen[a] = audio_problem(spec.audio_dir / a)
            if seen[a] is not None:
                out.append((a, seen[a]))
    return out


def identity(spec: EvalSpec, fingerprint: str) -> dict:
    return {"model_fingerprint": fingerprint, "prompt": presets.ALIASES.get(spec.prompt, spec.prompt),
            "max_tokens": spec.max_tokens, "data_sha256": file_sha256(spec.data),
            "conditions": {c.name: c.describe() for c in spec.conditions},
            "listen_heads": [list(h) for h in spec.listen_heads], "forced": spec.force,
            "score": spec.score if spec.score != "generate" else None}  # None: runs from before --score match


def stage(cdir: Path, rank: int | None = None, repair: bool = False) -> Stage:
    """A condition's rows: every rank's file counts as done; this process writes its own."""
    return Stage(cdir / f"predictions{'' if rank is None else f'.rank{rank}'}.jsonl",
                 sources=sorted(cdir.glob("predictions*.jsonl")), repair=repair)


def prediction_row(item: dict, ans, cond: Condition, seconds: dict, *, prompt: str, rank: int | None = None) -> dict:
    extracted, parsed = mmau.extract_answer(ans.text)
    row = {
        **item,
        "prompt": prompt,                # the preset name
        **({"rank": rank} if rank is not None else {}),  # the process that answered
        "model_output": extracted,       # what the official scorer reads
        "model_prediction": extracted,   # the key older copies of the scorer (and R1-AQA) read
        "raw_output": ans.text,
        "parsed": parsed,
        "correct": mmau.string_match(item["answer"], extracted, item["choices"]),
        "choice": mmau.matched_choice(extracted, item["choices"]),
        "condition": cond.name,
        "audio_tokens": ans.audio_tokens,
        "prompt_tokens": ans.prompt_tokens,
        "generation_tokens": ans.generation_tokens,
        "seconds": {**seconds, **{k: v for k, v in (ans.timing or {}).items()}},
    }
    if ans.listening is not None:
        row["listening"] = ans.listening
        row["listening_tokens"] = [round(x, 6) for x in ans.listening_tokens or []]
    return row


def logprob_row(item: dict, prompt, logprobs, cond: Condition, seconds: dict, timing: dict, *, preset: str,
                rank: int | None = None) -> dict:
    """An item answered by option log-probs alone: the best-scoring choice is the answer the official
    scorer reads (so predictions.json and `eval score` score it)."""
    best = scoring.choice(logprobs)
    chosen = item["choices"][best]
    return {
        **item,
        "prompt": preset,
        **({"rank": rank} if rank is not None else {}),
        "model_output": chosen,
        "model_prediction": chosen,
        "correct": mmau.string_match(item["answer"], chosen, item["choices"]),
        "choice": best,
        "condition": cond.name,
        "audio_tokens": prompt.n_audio_tokens,
        "prompt_tokens": len(prompt.ids),
        "seconds": {**seconds, **timing},
    }


def failed_row(item: dict, cond: Condition, error: Exception, *, prompt: str, rank: int | None = None) -> dict:
    """An item that could not be run: its reason, no `model_output` (so no scorer counts it)."""
    return {**item, "prompt": prompt, **({"rank": rank} if rank is not None else {}), "condition": cond.name,
            "error": str(error)}


def run_eval(spec: EvalSpec, progress: bool = True) -> dict[str, mmau.Report]:
    """Run (or resume) the evaluation; returns each condition's report (rank 0; others: {})."""
    group = mx.distributed.init()
    rank, size = group.rank(), group.size()
    spec.prompt = presets.canonical(spec.prompt)
    items = select_items(spec)
    if not items:
        raise ListenError(f"no items to evaluate in {spec.data} (after the task and id filters)")
    problems = audio_problems(spec, items)
    missing = [a for a, _ in problems]
    if missing and not spec.skip_missing:
        n_items = sum(it["audio_id"] in set(missing) for it in items)
        shown = "\n  ".join(f"{a}: {why}" for a, why in problems[:10])
        shown += f"\n  … and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ListenError(f"{n_items} of {len(items)} items have missing or unreadable audio under "
                          f"{spec.audio_dir}:\n  {shown}\nPass --skip-missing to evaluate without them.")
    items = [it for it in items if it["audio_id"] not in set(missing)]
    for label, meta in spec.bindings:  # prompt and item overlap now; the model once it is loaded
        spec.warnings += check_binding(meta, label, prompt=spec.prompt, ids=[it["id"] for it in items], force=spec.force,
                                       family=ModelRef.of(spec.model).family)
    for w in spec.warnings:
        warnings.warn(w, ListenWarning, stacklevel=2)
    ref = ModelRef.of(spec.model)
    check_conditions(spec, *ref.shape)  # from the config: before the folder is bound to anything
    fingerprint = ref.fingerprint()
    with locked(spec.out, ".lock" if rank == 0 else f".lock.rank{rank}"), provisional(spec.out / RUN_FILE):
        if rank == 0:
            claim(spec.out / RUN_FILE, identity(spec, fingerprint), extra={"model": str(ref), "data": str(spec.data)})
            for cond in spec.conditions:  # cut half-written last lines left by a kill, before anyone reads
                spec.dir_for(cond).mkdir(parents=True, exist_ok=True)
                stage(spec.dir_for(cond), repair=True)
        _barrier(group)
        if rank != 0:
            claim(spec.out / RUN_FILE, identity(spec, fingerprint))
        _answer_items(spec, ref, items, rank, size, progress)
        _barrier(group)
        if rank != 0:
            return {}
        return {c.name: finish(spec, c, items, missing) for c in spec.conditions}


def check_conditions(spec: EvalSpec, n_layers: int, n_heads: int):
    """Every condition's heads and layers, and the listening heads, against the model's shape (its
    config alone): a user error here is one line before any folder is bound or any weight is read."""
    if spec.listen_heads:
        check_heads(spec.listen_heads, n_layers, n_heads, "--listen heads")
    for c in spec.conditions:
        if c.steer is not None:
            c.steer.validate(n_layers, n_heads=n_heads)
        ablation = c.settings.get("ablation")
        if ablation:
            check_heads(ablation["heads"], n_layers, n_heads, "ablated heads")


def _answer_items(spec: EvalSpec, ref: ModelRef, items: list[dict], rank: int, size: int, progress: bool):
    stages = {c.name: stage(spec.dir_for(c), rank if size > 1 else None) for c in spec.conditions}
    todo = {name: {it["id"] for it in st.todo(items)} for name, st in stages.items()}
    remaining = [it for it in items if any(it["id"] in t for t in todo.values())]
    mine = remaining[rank::size]
    if not mine:
        return
    model, processor = ref.get()
    answer = Answerer(model, processor, spec.conditions, max_tokens=spec.max_tokens, listen_heads=spec.listen_heads)
    for label, meta in spec.bindings:  # after the conditions were checked against the model
        found = check_binding(meta, label, model=model, force=spec.force)
        for w in found:
            warnings.warn(w, ListenWarning, stacklevel=2)
        spec.warnings += found
    for item in tqdm(mine, desc=f"eval{' rank %d' % rank if size > 1 else ''}", unit="item", file=sys.stderr,
                     disable=not progress):
        conds = [c for c in spec.conditions if item["id"] in todo[c.name]]
        tic = time.perf_counter()
        try:
            with warnings.catch_warnings(record=True) as caught:  # kept per item, summed up at the end
                warnings.simplefilter("always", AudioWarning)
                audio = model.front_end.load(spec.audio_dir / item["audio_id"])
                load_s = time.perf_counter() - tic
                tic = time.perf_counter()
                feats = model.front_end.features(audio, item["audio_id"])
            prompt = prepare(model, processor, [feats], presets.build_prompt(item, spec.prompt))
            options = (scoring.option_ids(processor, prompt, item["choices"], spec.prompt)
                       if spec.score != "generate" else None)
        except ListenError as e:  # this item's audio is unusable: record it, go on
            for c in conds:
                stages[c.name].add(failed_row(item, c, e, prompt=spec.prompt, rank=rank))
            continue
        # log-mel, tokenising and embedding: the rest of preparing the prompt, outside the encoder
        seconds = {"audio_load": load_s, "features": max(time.perf_counter() - tic - prompt.encode_seconds, 0.0),
                   "encoder": prompt.encode_seconds}
        facts = {**feats.to_dict(), **({"warnings": [str(w.message) for w in caught]} if caught else {})}
        responses = answer.respond(prompt, options, only=[c.name for c in conds], generate=spec.score != "logprob")
        for c in conds:
            r = responses[c.name]
            if r.error is not None:  # a forward pass that is not finite: a failed row, never a score
                stages[c.name].add({**failed_row(item, c, ListenError(r.error), prompt=spec.prompt, rank=rank), **facts})
                continue
            if r.answer is not None:
                row = prediction_row(item, r.answer, c, seconds, prompt=spec.prompt, rank=rank)
            else:
                row = logprob_row(item, prompt, r.logprobs, c, seconds, r.timing, preset=spec.prompt, rank=rank)
            if r.logprobs is not None:
                row.update(logprob.row_fields(item, r.logprobs))
            stages[c.name].add({**row, **facts})


def _barrier(group):
    if group.size() > 1:
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))


def finish(spec: EvalSpec, cond: Condition, items: list[dict], missing: list[str]) -> mmau.Report:
    """Merge rank files into predictions.jsonl (data order), write predictions.json and summary.json."""
    cdir = spec.dir_for(cond)
    rows = {}
    for f in sorted(cdir.glob("predictions*.jsonl")):
        for r in read_jsonl(f):
            rows.setdefault(r["id"], r)
    order = [it["id"] for it in items if it["id"] in rows]
    ordered = [rows[i] for i in order] + [r for i, r in rows.items() if i not in set(order)]
    write_atomic(cdir / PRED_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered))
    for f in cdir.glob("predictions.rank*.jsonl"):
        f.unlink()
    answered = [rows[i] for i in order if "error" not in rows[i]]
    failed = [{"id": rows[i]["id"], "audio_id": rows[i]["audio_id"], "error": rows[i]["error"]}
              for i in order if "error" in rows[i]]
    write_atomic(cdir / OFFICIAL_FILE, json.dumps(answered, ensure_ascii=False, indent=1))
    if not answered:
        raise ListenError(f"{cond.name}: no item could be answered ({len(failed)} failed, e.g. {failed[0]['id']}: "
                          f"{failed[0]['error']})" if failed else f"{cond.name}: no item was answered")
    report = mmau.score(answered, raw_key="raw_output")
    summary = {
        **report.to_dict(),
        "condition": cond.name, "settings": cond.describe(),
        "model": str(ModelRef.of(spec.model)), "prompt": spec.prompt, "max_tokens": spec.max_tokens, "decoding": "greedy",
        "score": spec.score, **({"logprob": logprob.summary(answered)} if spec.score != "generate" else {}),
        "data": str(spec.data), "data_sha256": file_sha256(spec.data),
        "tasks": list(spec.tasks), "limit": spec.limit,
        "missing_audio": missing, "n_missing_audio": len(missing),
        "failed": failed, "n_failed": len(failed), "warnings": spec.warnings,
        "official_json_note": f"{OFFICIAL_FILE} holds the {len(answered)} answered items"
                              + (f"; the {len(failed)} failed items are left out (see 'failed')" if failed else ""),
        "truncated_clips": sum(1 for r in answered if r.get("audio_truncated")),
        "damaged_clips": sum(1 for r in answered if r.get("audio_damage")),
        "timing": _timing(answered),
        "versions": versions(),
    }
    write_json(cdir / SUMMARY_FILE, summary)
    if cond is spec.conditions[0] and (summary["truncated_clips"] or summary["damaged_clips"]):
        warnings.warn(f"{summary['truncated_clips']} of {len(answered)} clips were longer than 30 s (only their first "
                      f"30 s used); {summary['damaged_clips']} damaged (see audio_damage in {PRED_FILE})",
                      ListenWarning, stacklevel=2)
    report.failed = failed
    report.logprob = summary.get("logprob")  # log-prob accuracy and margins, for the terminal
    return report


def _timing(rows: list[dict]) -> dict:
    keys = ["audio_load", "features", "encoder", "prefill", "silence", "decode"]
    keys += ["score"] if any("score" in r["seconds"] for r in rows) else []
    tot = {k: sum(r["seconds"].get(k, 0.0) for r in rows) for k in keys}
    n = max(len(rows), 1)
    total = sum(tot.values())  # the work of the whole item, shared by every condition answered with it
    return {"total_s": {k: round(v, 4) for k, v in tot.items()},
            "mean_s": {k: round(v / n, 5) for k, v in tot.items()},
            "items_per_s": round(len(rows) / total, 4) if total else None}


def versions() -> dict:
    import mlx_lm

    return {"mlx_listen": __version__, "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__,
            "python": platform.python_version(), "platform": platform.platform()}
