"""`mlx-listen eval`: MMAU-format evaluation with resume, official scoring and several Macs at once.

A run folder holds `run.json` (what identifies the run: model, prompt, decoding, data hash,
conditions), and per condition a `predictions.jsonl` written one fsync'd line per item, so a
run killed at any moment resumes where it stopped: a half-written last line is dropped, ids
already present are never redone. At the end it writes `predictions.json` (a JSON array the
official MMAU `evaluation.py` reads unchanged) and `summary.json`.

Conditions are pluggable: "base" (greedy baseline) here; the steering issue adds steered ones.
Under `mlx.launch` each rank takes a share of the remaining items and writes its own
`predictions.rank{r}.jsonl`; rank 0 merges them when all ranks are done.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import __version__, mmau
from .errors import ListenError

RUN_FILE, PRED_FILE, SUMMARY_FILE, OFFICIAL_FILE = "run.json", "predictions.jsonl", "summary.json", "predictions.json"


@dataclass
class Condition:
    """A way of answering: `answer(model, processor, prompt, max_tokens) -> generate.Answer`."""

    name: str
    answer: Callable
    settings: dict = field(default_factory=dict)  # recorded in run.json; part of the run's identity


def steered(config, name: str = "steered", settings: dict | None = None) -> Condition:
    """Greedy answers with audio–silence steering (`steering.SteerConfig`)."""
    from .steering import Steerer

    steerers: dict[int, Steerer] = {}

    def answer(model, processor, prompt, max_tokens):
        st = steerers.get(id(model)) or steerers.setdefault(id(model), Steerer(model, config))
        return st.generate(processor, prompt, max_tokens=max_tokens, temp=0.0)

    return Condition(name, answer, {"decoding": "greedy", "steering": config.to_json(), **(settings or {})})


def baseline() -> Condition:
    from .generate import generate

    return Condition("base", lambda model, processor, prompt, max_tokens: generate(
        model, processor, prompt, max_tokens=max_tokens, temp=0.0), {"decoding": "greedy"})


# -- durable JSONL -----------------------------------------------------------------------------

def read_jsonl(path: Path, repair: bool = False) -> list[dict]:
    """Lines of a predictions file; a partial last line (a kill mid-write) is dropped (and cut
    from the file with `repair`). A bad line elsewhere is corruption, not a kill: refuse."""
    if not path.exists():
        return []
    data = path.read_bytes()
    rows, good = [], 0
    lines = data.split(b"\n")
    for k, line in enumerate(lines):
        last = k == len(lines) - 1
        if not line.strip():
            good += len(line) + (0 if last else 1)
            continue
        try:
            if last:  # no newline after it: the write did not finish
                raise ValueError("unterminated")
            row = json.loads(line)
            if not isinstance(row, dict) or "id" not in row:
                raise ValueError("not a prediction object")
            rows.append(row)
            good += len(line) + 1
        except ValueError:
            if not last and any(x.strip() for x in lines[k + 1:]):
                raise ListenError(f"{path}: line {k + 1} is corrupt (not a partial last line); fix or remove it")
            break
    if repair and good < len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
    return rows


def append_jsonl(path: Path, row: dict):
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# -- the run -------------------------------------------------------------------------------------

@dataclass
class EvalSpec:
    data: Path
    audio_dir: Path
    model: str
    out: Path
    limit: int | None = None
    tasks: tuple[str, ...] = mmau.TASKS
    prompt: str = mmau.DEFAULT_PRESET
    max_tokens: int = 256
    skip_missing: bool = False
    conditions: list[Condition] = field(default_factory=lambda: [baseline()])
    ids: set[str] | None = None  # only these items (e.g. one split of a sweep)

    def dir_for(self, cond: Condition) -> Path:
        """The first condition writes to the run folder itself, the others to a subfolder each."""
        return self.out if cond is self.conditions[0] else self.out / cond.name


def audio_problem(path: Path) -> str | None:
    """Why `path` cannot be evaluated (missing, unreadable, empty), or None. Reads the header only."""
    import soundfile as sf

    if not path.is_file():
        return "missing"
    try:
        info = sf.info(str(path))
    except Exception as e:  # LibsndfileError/RuntimeError/TypeError, depending on the failure
        return f"unreadable ({str(e).removeprefix(f'Error opening {str(path)!r}: ')})"
    if info.frames == 0:
        return "no audio samples"
    return None


def select_items(spec: EvalSpec) -> tuple[list[dict], list[str]]:
    """The items to run (task filter, then limit) and the audio_ids of the ones whose audio is
    missing or unreadable (each checked up front, so a bad file stops nothing halfway)."""
    items = _select(spec)
    return items, [a for a, _ in _problems(spec, items)]


def _select(spec: EvalSpec) -> list[dict]:
    items = [it for it in mmau.load_items(spec.data)
             if it["task"] in spec.tasks and (spec.ids is None or it["id"] in spec.ids)]
    return items[: spec.limit] if spec.limit is not None else items


def _problems(spec: EvalSpec, items: list[dict]) -> list[tuple[str, str]]:
    out, seen = [], {}
    for it in items:
        a = it["audio_id"]
        if a not in seen:  # one entry per file, though several items may share it
            seen[a] = audio_problem(spec.audio_dir / a)
            if seen[a] is not None:
                out.append((a, seen[a]))
    return out


def identity(spec: EvalSpec) -> dict:
    prompt = mmau.ALIASES.get(spec.prompt, spec.prompt)
    return {"model": spec.model, "prompt": prompt, "max_tokens": spec.max_tokens,
            "data_sha256": mmau.file_sha256(spec.data),
            "conditions": {c.name: c.settings for c in spec.conditions}}


def check_run_dir(spec: EvalSpec, rank: int):
    ident = identity(spec)
    path = spec.out / RUN_FILE
    if path.exists():
        old = json.loads(path.read_text())
        diff = [k for k in ident if old.get(k) != ident[k]]
        if diff:
            raise ListenError(f"{spec.out} holds a run with other settings ({', '.join(diff)} differ); "
                              "use another --out, or the same settings to resume")
    elif rank == 0:
        spec.out.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps({**ident, "data": str(spec.data), "created": time.strftime("%Y-%m-%dT%H:%M:%S")},
                                      indent=2))


def done_ids(cdir: Path, repair: bool) -> set[str]:
    ids = set()
    for f in sorted(cdir.glob("predictions*.jsonl")):
        ids |= {r["id"] for r in read_jsonl(f, repair=repair)}
    return ids


def prediction_row(item: dict, ans, cond: Condition, seconds: dict, *, prompt: str | None = None,
                   rank: int | None = None) -> dict:
    extracted, parsed = mmau.extract_answer(ans.text)
    return {
        **item,
        **({"prompt": prompt} if prompt is not None else {}),  # the preset name
        **({"rank": rank} if rank is not None else {}),       # the process that answered
        "model_output": extracted,       # what the official scorer reads
        "model_prediction": extracted,   # the key older copies of the scorer (and R1-AQA) read
        "raw_output": ans.text,
        "parsed": parsed,
        "correct": mmau.string_match(item["answer"], extracted, item["choices"]),
        "condition": cond.name,
        "audio_tokens": ans.audio_tokens,
        "prompt_tokens": ans.prompt_tokens,
        "generation_tokens": ans.generation_tokens,
        "seconds": {**seconds,
                    "prefill": ans.prompt_tokens / ans.prompt_tps if ans.prompt_tps else 0.0,
                    "decode": ans.generation_tokens / ans.generation_tps if ans.generation_tps else 0.0},
    }


def run_eval(spec: EvalSpec, progress: bool = True) -> dict[str, mmau.Report]:
    """Run (or resume) the evaluation; returns each condition's report (rank 0; others: {})."""
    import mlx.core as mx
    from tqdm import tqdm

    from .audio import audio_features, load_audio
    from .generate import prepare
    from .load import load

    group = mx.distributed.init()
    rank, size = group.rank(), group.size()
    spec.prompt = mmau.ALIASES.get(spec.prompt, spec.prompt)
    if spec.prompt not in mmau.PROMPTS:
        raise ListenError(f"unknown prompt preset {spec.prompt!r} (choose from {', '.join(mmau.PROMPTS)})")
    items = _select(spec)
    problems = _problems(spec, items)
    missing = [a for a, _ in problems]
    if missing and not spec.skip_missing:
        n_items = sum(it["audio_id"] in set(missing) for it in items)
        shown = "\n  ".join(f"{a}: {why}" for a, why in problems[:10])
        shown += f"\n  … and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ListenError(f"{n_items} of {len(items)} items have missing or unreadable audio under "
                          f"{spec.audio_dir}:\n  {shown}\nPass --skip-missing to evaluate without them.")
    missing_set = set(missing)
    items = [it for it in items if it["audio_id"] not in missing_set]
    check_run_dir(spec, rank)
    if rank == 0:  # one process cuts half-written last lines left by a kill, before anyone reads
        for cond in spec.conditions:
            spec.dir_for(cond).mkdir(parents=True, exist_ok=True)
            done_ids(spec.dir_for(cond), repair=True)
    _barrier(group)

    todo = []
    for cond in spec.conditions:
        done = done_ids(spec.dir_for(cond), repair=False)
        todo.append({it["id"] for it in items if it["id"] not in done})
    remaining = [it for it in items if any(it["id"] in t for t in todo)]
    mine = remaining[rank::size]

    if mine:
        model, processor = load(spec.model)
    suffix = f".rank{rank}" if size > 1 else ""
    bar = tqdm(mine, desc=f"eval{' rank %d' % rank if size > 1 else ''}", unit="item", file=sys.stderr,
               disable=not progress, initial=0, total=len(mine))
    for item in bar:
        tic = time.perf_counter()
        audio = load_audio(spec.audio_dir / item["audio_id"])
        load_s = time.perf_counter() - tic
        tic = time.perf_counter()
        feats = audio_features(audio, item["audio_id"])
        prompt = prepare(model, processor, [feats], mmau.build_prompt(item, spec.prompt))
        # log-mel, tokenising and embedding: the rest of preparing the prompt, outside the encoder
        features_s = max(time.perf_counter() - tic - prompt.encode_seconds, 0.0)
        for cond, t in zip(spec.conditions, todo):
            if item["id"] not in t:
                continue
            tic = time.perf_counter()
            ans = cond.answer(model, processor, prompt, spec.max_tokens)
            row = prediction_row(item, ans, cond, {"audio_load": load_s, "features": features_s,
                                                   "encoder": prompt.encode_seconds,
                                                   "answer": time.perf_counter() - tic},
                                 prompt=spec.prompt, rank=rank)
            append_jsonl(spec.dir_for(cond) / f"predictions{suffix}.jsonl", row)
    _barrier(group)
    if rank != 0:
        return {}
    return {c.name: finish(spec, c, items, missing) for c in spec.conditions}


def _barrier(group):
    if group.size() > 1:
        import mlx.core as mx

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
    scored = [rows[i] for i in order]
    write_atomic(cdir / OFFICIAL_FILE, json.dumps(scored, ensure_ascii=False, indent=1))
    report = mmau.score(scored, raw_key="raw_output")
    summary = {
        **report.to_dict(),
        "condition": cond.name, "settings": cond.settings,
        "model": spec.model, "prompt": spec.prompt, "max_tokens": spec.max_tokens, "decoding": "greedy",
        "data": str(spec.data), "data_sha256": mmau.file_sha256(spec.data),
        "tasks": list(spec.tasks), "limit": spec.limit,
        "missing_audio": missing, "n_missing_audio": len(missing),
        "truncated_clips": sum(1 for r in scored if r.get("audio_tokens", 0) >= 750),
        "timing": _timing(scored),
        "versions": _versions(),
    }
    write_atomic(cdir / SUMMARY_FILE, json.dumps(summary, indent=2))
    return report


def _timing(rows: list[dict]) -> dict:
    keys = ["audio_load", "features", "encoder", "prefill", "decode", "answer"]
    tot = {k: sum(r["seconds"].get(k, 0.0) for r in rows) for k in keys}
    n = max(len(rows), 1)
    total = sum(tot[k] for k in ("audio_load", "features", "encoder", "answer"))  # answer = prefill + decode
    return {"total_s": {k: round(v, 4) for k, v in tot.items()},
            "mean_s": {k: round(v / n, 5) for k, v in tot.items()},
            "items_per_s": round(len(rows) / total, 4) if total else None}


def _versions() -> dict:
    import mlx.core as mx
    import mlx_lm

    return {"mlx_listen": __version__, "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def read_predictions(path: Path) -> list[dict]:
    """Our JSONL, or the official JSON array (`model_output` per item)."""
    path = Path(path)
    if path.is_dir():
        path = path / PRED_FILE
    if not path.exists():
        raise ListenError(f"{path} not found")
    text = path.read_text(encoding="utf-8").lstrip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ListenError(f"{path} is not valid JSON ({e})") from None
    return read_jsonl(path)


def rekey(rows: list[dict], key_file: Path) -> list[dict]:
    """Score predictions against another answer key (e.g. the other MMAU version), matched by id."""
    key = {it["id"]: it for it in mmau.load_items(key_file)}
    out = []
    for r in rows:
        if r.get("id") in key:
            k = key[r["id"]]
            out.append({**r, **{f: k[f] for f in ("question", "choices", "answer", "task", "difficulty",
                                                   "category", "sub-category") if f in k}})
    return out
