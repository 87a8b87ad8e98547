"""MMAU test-mini: load the questions, build prompts, extract answers, score like the official script.

The scorer reproduces MMAU's `evaluation.py` (`string_match` plus its aggregation) exactly, so our
numbers are comparable with the published string-match numbers.
Everything else here (confidence intervals, per-category tables, the always-first baseline,
paired comparison) is extra reporting that never changes the headline accuracy.

Pure Python: no torch, transformers or mlx.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ListenError
from ..stats.exact import mcnemar_exact, wilson

TASKS = ("sound", "music", "speech")
DIFFICULTIES = ("easy", "hard", "medium")  # the official script's order, not easy-medium-hard
REQUIRED = ("id", "audio_id", "question", "choices", "answer", "task", "difficulty")

# ---------------------------------------------------------------------------------------------
# Data

def _category(item: dict):
    """13 items store `category` as `["Reasoning"]`; use one string everywhere."""
    cat = item.get("category")
    if isinstance(cat, list):
        return "; ".join(str(c) for c in cat)
    return cat


def load_items(path) -> list[dict]:
    """Read an MMAU-schema JSON array, validate it and normalise `category` to a string.

    Raises ListenError naming the item on anything the official scorer would choke on (unknown
    task or difficulty) or that would make scoring meaningless (answer not among the choices).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ListenError(f"cannot read MMAU questions from {path}: {e}") from e
    if not isinstance(data, list):
        raise ListenError(f"{path}: expected a JSON array of MMAU items, got {type(data).__name__}")
    if not data:
        raise ListenError(f"{path} holds no items (an empty JSON array)")
    items, seen = [], set()
    for i, raw in enumerate(data):
        name = raw.get("id", f"#{i}") if isinstance(raw, dict) else f"#{i}"
        if not isinstance(raw, dict):
            raise ListenError(f"{path}: item {name} is not an object")
        missing = [k for k in REQUIRED if k not in raw]
        if missing:
            raise ListenError(f"{path}: item {name} lacks {', '.join(missing)}")
        choices = raw["choices"]
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            raise ListenError(f"{path}: item {name}: choices must be a non-empty list of strings")
        if not isinstance(raw["answer"], str) or not isinstance(raw["question"], str):
            raise ListenError(f"{path}: item {name}: question and answer must be strings")
        # Upstream answers match a choice exactly; compare stripped so stray spaces are not fatal.
        if raw["answer"].strip() not in {c.strip() for c in choices}:
            raise ListenError(f"{path}: item {name}: answer {raw['answer']!r} is not one of its choices")
        if raw["task"] not in TASKS:
            raise ListenError(f"{path}: item {name}: task {raw['task']!r} is not one of {TASKS}")
        if raw["difficulty"] not in DIFFICULTIES:
            raise ListenError(f"{path}: item {name}: difficulty {raw['difficulty']!r} is not one of {DIFFICULTIES}")
        if raw["id"] in seen:
            raise ListenError(f"{path}: item id {name} appears twice")
        seen.add(raw["id"])
        item = dict(raw)
        if "category" in item:
            item["category"] = _category(item)
        items.append(item)
    return items

# ---------------------------------------------------------------------------------------------
# Answer extraction (the prompt presets are `presets.py`)

_ANSWER = re.compile(r"<answer>(.*?)</answer>")


def extract_answer(text: str) -> tuple[str, bool]:
    """R1-AQA's extraction: the first `<answer>...</answer>` on one line, stripped.

    The pattern is non-greedy and has no DOTALL, so a tag pair split by a newline does not match.
    Fallback when nothing matches: the WHOLE output, stripped, with parsed=False. The official
    scorer then sees that fallback text, which passes only if it names the answer and no word
    that belongs to wrong choices alone.
    """
    m = _ANSWER.search(text)
    if m:
        return m.group(1).strip(), True
    return text.strip(), False

# ---------------------------------------------------------------------------------------------
# Official string match (design §6.2-6.3)

def tokens(s: str) -> set[str]:
    """Lowercased maximal runs of Unicode word characters, as a set (MMAU's `\\b\\w+\\b`)."""
    return set(re.findall(r"\w+", s.lower()))


def string_match(answer: str, prediction: str, choices) -> bool:
    """True iff the prediction holds every answer word and no word found only in wrong choices."""
    p, a = tokens(prediction), tokens(answer)
    if not p:
        return False
    wrong = set()
    for choice in choices:
        c = tokens(choice)
        if c != a:  # the answer itself, duplicates and reordered twins add nothing
            wrong |= c - a
    return a <= p and p.isdisjoint(wrong)


def matched_choice(prediction: str, choices) -> int | None:
    """The index of the one choice the official matcher accepts for `prediction`, else None (no
    choice, or several: the answer picks no option). Answers that differ only in case or
    punctuation pick the same choice."""
    hits = [i for i, c in enumerate(choices) if string_match(c, prediction or "", choices)]
    return hits[0] if len(hits) == 1 else None


@dataclass
class Group:
    name: str
    correct: int = 0
    n: int = 0
    task: str | None = None  # set for sub-categories, which belong to one task

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0  # official prints 0.00% for empty groups

    def add(self, ok: bool):
        self.n += 1
        self.correct += bool(ok)

    def to_dict(self) -> dict:
        lo, hi = wilson(self.correct, self.n)
        d = {"name": self.name, "correct": self.correct, "n": self.n,
             "accuracy": self.accuracy, "ci95": [lo, hi]}
        return d | ({"task": self.task} if self.task else {})


def _pct(g: Group) -> str:
    # Same expression as the official script, so rounding at the second decimal agrees.
    return f"{(g.correct / g.n) * 100 if g.n > 0 else 0:.2f}"


@dataclass
class Report:
    overall: Group
    tables: dict  # "task" | "difficulty" | "sub-category" | "category" -> list[Group]
    always_first: dict  # "overall" and each task -> Group
    skipped: int = 0
    unparsed: int | None = None
    items: list = field(default_factory=list)  # per-item {id, task, ..., correct}
    failed: list = field(default_factory=list)  # items that could not be run: {id, audio_id, error}

    def to_dict(self) -> dict:
        lo, hi = wilson(self.overall.correct, self.overall.n)
        return {
            "n": self.overall.n, "correct": self.overall.correct, "skipped": self.skipped,
            "unparsed": self.unparsed, "scorer": "mmau-official-string-match",
            "accuracy": {"overall": self.overall.accuracy} | {g.name: g.accuracy for g in self.tables["task"]},
            "ci95": [lo, hi],
            "tables": {k: [g.to_dict() for g in v] for k, v in self.tables.items()},
            "always_first": {k: g.accuracy for k, g in self.always_first.items()}
            | {"table": [g.to_dict() for g in self.always_first.values()]},
        }

    def official_text(self) -> str:
        """The official evaluation.py stdout, line for line; `print()` it to reproduce it exactly."""
        star = "*" * 30
        out = [star, "Task-wise Accuracy:"]
        out += [f"{g.name} : {_pct(g)}% over {g.n} samples" for g in self.tables["task"]]
        out += [star, "Difficulty-wise Accuracy:"]
        out += [f"{g.name} : {_pct(g)}% over {g.n} samples" for g in self.tables["difficulty"]]
        out += [star, "Sub-category-wise Accuracy:"]
        out += [f"{g.name} : {_pct(g)}% over {g.n} samples" for g in self.tables["sub-category"]]
        out += [star, f"Total Accuracy: {_pct(self.overall)}% over {self.overall.n} samples", star,
                "No prediction count: 0"]  # always 0 upstream: the skip happens before counting
        return "\n".join(out)

    def table(self) -> str:
        """A terminal table: accuracy with n and 95% Wilson interval for every grouping."""
        width = max([len(g.name) + 8 for t in self.tables.values() for g in t] + [12])
        head = f"{'':<{width}}  {'n':>5}  {'correct':>7}  {'acc':>6}  95% CI"
        lines = []

        def row(g: Group):
            lo, hi = wilson(g.correct, g.n)
            lines.append(f"{g.name:<{width}}  {g.n:>5}  {g.correct:>7}  {100 * g.accuracy:>5.1f}%"
                         f"  [{100 * lo:.1f}, {100 * hi:.1f}]")

        order = {t: i for i, t in enumerate(TASKS)}
        subs = sorted(self.tables["sub-category"], key=lambda g: order.get(g.task, 3))  # stable
        subs = [Group(f"{g.task}: {g.name}", g.correct, g.n) for g in subs]
        lines.append(head)
        row(self.overall)
        for title in ("task", "difficulty", "category", "sub-category"):
            lines.append(f"-- {title}")
            for g in subs if title == "sub-category" else self.tables[title]:
                row(g)
        af = self.always_first
        lines.append(f"always-first baseline: {100 * af['overall'].accuracy:.1f}% ("
                     + ", ".join(f"{t} {100 * af[t].accuracy:.1f}" for t in TASKS) + ")")
        lines.append("unparsed outputs (no <answer> tag): "
                     + ("unknown" if self.unparsed is None else str(self.unparsed)))
        if self.skipped:
            lines.append(f"skipped (no prediction): {self.skipped}")
        if self.failed:
            lines.append(f"failed items (not scored): {len(self.failed)}")
            lines += [f"  {f['id']}: {f['error']}" for f in self.failed[:10]]
            if len(self.failed) > 10:
                lines.append(f"  … and {len(self.failed) - 10} more (summary.json lists them all)")
        return "\n".join(lines)


def score(items, key: str = "model_output", *, extract: bool = False, raw_key: str = "raw_output") -> Report:
    """Score items that carry a prediction under `key`, exactly as MMAU's evaluation.py does.

    - Items without `key` are skipped (counted in `skipped`), like the official script.
    - extract=True applies `extract_answer` to the prediction first (for raw model text).
    - Unparsed count: from each item's `parsed` flag, else from `extract_answer(item[raw_key])`,
      else (with extract=True) from the prediction itself; counted over the items that tell,
      None when none does.
    - A null prediction scores as wrong (the official script would crash on it).
    """
    overall = Group("overall")
    tables = {"task": {t: Group(t) for t in TASKS}, "difficulty": {d: Group(d) for d in DIFFICULTIES},
              "category": {}, "sub-category": {}}
    first = {"overall": Group("overall")} | {t: Group(t) for t in TASKS}
    skipped, unparsed, known, per_item = 0, 0, 0, []
    for item in items:
        if key not in item:
            skipped += 1
            continue
        task, diff = item["task"], item["difficulty"]
        if task not in TASKS or diff not in DIFFICULTIES:
            raise ListenError(f"item {item.get('id')}: task {task!r} / difficulty {diff!r} unknown")
        pred = item[key] if item[key] is not None else ""  # null output: wrong, not a crash
        parsed = item.get("parsed")
        if parsed is None and isinstance(item.get(raw_key), str):
            parsed = extract_answer(item[raw_key])[1]
        if extract:
            pred, ok = extract_answer(pred)
            parsed = ok if parsed is None else parsed
        if parsed is not None:
            known += 1
            unparsed += not parsed
        ok = string_match(item["answer"], pred, item["choices"])
        overall.add(ok)
        tables["task"][task].add(ok)
        tables["difficulty"][diff].add(ok)
        sub, cat = item.get("sub-category"), _category(item)
        if sub is not None:  # official: items without a sub-category are left out of that block
            tables["sub-category"].setdefault(sub, Group(sub, task=task)).add(ok)
        if cat is not None:
            tables["category"].setdefault(cat, Group(cat)).add(ok)
        first_ok = string_match(item["answer"], item["choices"][0], item["choices"])
        first["overall"].add(first_ok)
        first[task].add(first_ok)
        per_item.append({"id": item.get("id"), "task": task, "difficulty": diff, "sub-category": sub,
                         "category": cat, "prediction": pred, "correct": ok})
    if overall.n == 0:
        raise ListenError(f"no item has a {key!r} prediction to score")
    return Report(overall, {k: list(v.values()) for k, v in tables.items()}, first,
                  skipped=skipped, unparsed=unparsed if known else None, items=per_item)

# ---------------------------------------------------------------------------------------------
# Paired comparison of two runs

def compare(preds_a, preds_b, key: str = "model_output") -> dict:
    """Pair two runs by item id and compare official-match accuracy, overall and per task.

    wrong_to_right counts items A got wrong and B got right; p_mcnemar is the exact two-sided
    McNemar p-value on those discordant pairs. Items lacking `key` in either run are left out.
    """
    a_by = {it["id"]: it for it in preds_a if key in it}
    b_by = {it["id"]: it for it in preds_b if key in it}
    common = [i for i in a_by if i in b_by]
    cells = {name: [0, 0, 0, 0] for name in ("overall",) + TASKS}  # a_ok, b_ok, w->r, r->w
    for i in common:
        ia, ib = a_by[i], b_by[i]
        if ia["answer"] != ib["answer"] or list(ia["choices"]) != list(ib["choices"]):
            raise ListenError(f"item {i}: the two runs used different questions (MMAU version?)")
        ok_a = string_match(ia["answer"], ia[key] or "", ia["choices"])
        ok_b = string_match(ib["answer"], ib[key] or "", ib["choices"])
        for name in ("overall", ia["task"]):
            cell = cells[name]
            cell[0] += ok_a
            cell[1] += ok_b
            cell[2] += ok_b and not ok_a
            cell[3] += ok_a and not ok_b
    n_task = {t: sum(a_by[i]["task"] == t for i in common) for t in TASKS}
    out = {"n": len(common), "only_a": len(a_by) - len(common), "only_b": len(b_by) - len(common)}
    for name, (ca, cb, wr, rw) in cells.items():
        n = len(common) if name == "overall" else n_task[name]
        out[name] = {"n": n, "a": ca / n if n else 0.0, "b": cb / n if n else 0.0,
                     "a_correct": ca, "b_correct": cb, "wrong_to_right": wr,
                     "right_to_wrong": rw, "p_mcnemar": mcnemar_exact(wr, rw)}
    return out


def compare_lines(res: dict, name_a: str, name_b: str) -> list[str]:
    """The terminal table of `compare`: accuracy per task, flips, McNemar's exact p."""
    lines = [f"A = {name_a}", f"B = {name_b}", f"{res['n']} paired items",
             f"{'':<8} {'n':>5} {'A':>7} {'B':>7} {'wrong->right':>13} {'right->wrong':>13} {'McNemar p':>10}"]
    for k in ("overall", *TASKS):
        r = res[k]
        if r["n"]:
            lines.append(f"{k:<8} {r['n']:>5} {r['a']:>7.2%} {r['b']:>7.2%} {r['wrong_to_right']:>13} "
                         f"{r['right_to_wrong']:>13} {r['p_mcnemar']:>10.4g}")
    return lines


def rekey(rows: list[dict], key_file: Path) -> tuple[list[dict], int]:
    """Predictions scored against another answer key (e.g. the other MMAU version), matched by id;
    also how many predictions the key does not have."""
    key = {it["id"]: it for it in load_items(key_file)}
    out = []
    for r in rows:
        if r.get("id") in key:
            k = key[r["id"]]
            out.append({**r, **{f: k[f] for f in ("question", "choices", "answer", "task", "difficulty",
                                                   "category", "sub-category") if f in k}})
    return out, len(rows) - len(out)
