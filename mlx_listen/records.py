"""Durable records: what every resumable run (eval, heads, validate-heads, sweep, patch,
experiment) writes, and how a folder says which run it belongs to.

- `Stage`: the one resumable per-item pass. Its rows live in a JSONL file, one fsync'd line per
  item: a run killed at any moment resumes where it stopped, nothing is redone or duplicated; a
  half-written last line (a kill mid-write) is dropped, any other bad line is corruption. An item
  whose work raises `ListenError` is recorded with its `error` and the run goes on.
- Atomic writes (temporary file, fsync, rename): a reader never sees half a file.
- Identity: `claim(path, identity)` writes what identifies a run (model fingerprint, data hash,
  prompt, decoding, conditions) on first use and refuses a later run with other settings.
- A lock per run folder, so a second process on the same folder stops at once instead of doing
  all the work again.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Sequence

from filelock import FileLock, Timeout
from tqdm import tqdm

from .errors import ListenError

PRED_FILE = "predictions.jsonl"  # a run folder's (or a condition's) rows, one per item


def file_sha256(path) -> str:
    """sha256 of a file: recorded with every result (MMAU's JSON kept changing after release)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_jsonl(path: Path, repair: bool = False) -> list[dict]:
    """Rows of a JSONL file; a partial last line (a kill mid-write) is dropped (and cut from the
    file with `repair`). A bad line elsewhere is corruption, not a kill: refuse."""
    path = Path(path)
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
                raise ValueError("not a record object")
            rows.append(row)
            good += len(line) + 1
        except (ValueError, UnicodeDecodeError):
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


def write_atomic(path: Path, data: str | bytes):
    """Write a whole file so that readers see the old one or the new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: Path, obj):
    write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: Path, what: str = "file"):
    """A JSON file written by us; a damaged one is one clear error, not a traceback."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ListenError(f"{path} is not a readable {what} ({type(e).__name__}: {e}); remove it to start over") from None


def claim(path: Path, identity: dict, *, keys=None, extra: dict | None = None, hint: str = "--out") -> dict:
    """Tie `path` (a run's identity file) to `identity`: written the first time; later, every key in
    `keys` (default: all of identity) must match, else a one-line error naming what differs."""
    path = Path(path)
    keys = list(identity) if keys is None else list(keys)
    if path.exists():
        old = read_json(path, "run identity file")
        if not isinstance(old, dict):
            raise ListenError(f"{path} is not a run identity file; remove it to start over")
        diff = [k for k in keys if old.get(k) != identity.get(k)]
        if diff:
            raise ListenError(f"{path.parent} holds a run with other settings ({', '.join(diff)} differ); "
                              f"use another {hint}, or the same settings to resume")
        return old
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {**identity, **(extra or {}), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_json(path, record)
    return record


@contextmanager
def provisional(path: Path):
    """Undo a run's claim on its folder when the run fails before it has recorded anything: if `path`
    (the run's identity file) did not exist before the block and the block raises while no record
    (a non-empty .jsonl) exists under its folder, `path` is removed, so a corrected rerun with other
    settings is not refused ("holds a run with other settings") by a run that never ran."""
    path = Path(path)
    existed = path.exists()
    try:
        yield
    except BaseException:
        if not existed and path.exists() and not any(p.stat().st_size for p in path.parent.rglob("*.jsonl")):
            path.unlink()
        raise


@contextmanager
def locked(folder: Path, name: str = ".lock"):
    """Hold an exclusive lock on `folder` for the block; a second holder is refused at once."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / name)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ListenError(f"{folder} is in use by another mlx-listen process; wait for it to finish "
                          "or use another output") from None
    try:
        yield
    finally:
        lock.release()


class Stage:
    """A resumable per-item pass whose rows are written to `path` (JSONL, one fsync'd line each).

    `sources`: the files whose rows count as done (default: `path` alone; e.g. every rank's file
    of an `eval` condition). `run(items, work)` computes what is missing, in order."""

    def __init__(self, path: Path, sources: Sequence[Path] | None = None, repair: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: dict = {}
        for f in sources if sources is not None else [self.path]:
            for r in read_jsonl(f, repair=repair):
                self.done.setdefault(r["id"], r)

    def todo(self, items: Iterable[dict]) -> list[dict]:
        return [it for it in items if it["id"] not in self.done]

    def add(self, row: dict):
        append_jsonl(self.path, row)
        self.done[row["id"]] = row

    def rows(self, items: Iterable[dict]) -> list[dict]:
        """The rows of `items` that are done, in the items' order."""
        return [self.done[it["id"]] for it in items if it["id"] in self.done]

    def run(self, items: Sequence[dict], work: Callable[[dict], dict], *, desc: str, progress: bool = True,
            seconds: bool = False) -> list[dict]:
        """Each missing item's row `{"id", "task", **work(item)}` (with its wall time in `seconds`
        if asked); `ListenError` in `work` gives `{"id", "task", "error"}`. Returns every item's row."""
        todo = self.todo(items)
        for item in tqdm(todo, desc=desc, unit="item", file=sys.stderr, disable=not progress or not todo):
            tic = time.perf_counter()
            base = {"id": item["id"], "task": item.get("task")}
            try:
                row = {**base, **work(item)}
            except ListenError as e:
                row = {**base, "error": str(e)}
            if seconds:
                row["seconds"] = round(time.perf_counter() - tic, 4)
            self.add(row)
        return self.rows(items)


def read_predictions(path: Path) -> list[dict]:
    """Our JSONL (a run folder or its file), or the official JSON array (`model_output` per item)."""
    path = Path(path)
    if path.is_dir():
        path = path / PRED_FILE
    if not path.exists():
        raise ListenError(f"{path} not found")
    try:
        text = path.read_text(encoding="utf-8").lstrip()
    except UnicodeDecodeError:
        raise ListenError(f"{path} is not a predictions file (not UTF-8 text)") from None
    if text.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ListenError(f"{path} is not valid JSON ({e})") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ListenError(f"{path}: expected a JSON array of prediction objects")
        if not rows:
            raise ListenError(f"{path} holds no predictions (an empty JSON array)")
        return rows
    if not text:
        raise ListenError(f"{path} is empty")
    if not text.startswith("{"):
        raise ListenError(f"{path} is not a predictions file (neither our JSONL nor the official JSON array)")
    rows = read_jsonl(path)
    if not rows:
        raise ListenError(f"{path} holds no predictions")
    return rows
