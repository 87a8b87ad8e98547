"""Audio-specialist heads and the listening score (arXiv 2603.06854; shared/design/method.md).

- Audio mass a[l][h](x): head h of decoder layer l, softmax attention summed over the `<|AUDIO|>`
  positions, at the last prompt position T (the one that predicts the first answer token).
- Head score: Pearson r over a labelled calibration set between a[l][h](x) and the correctness
  c(x) of the unsteered greedy answer (official MMAU scoring); heads ranked by r, top K kept.
- Listening score L(x): the mean of a[l][h](x) over the selected heads.

One pass over the calibration items records, per item, its correctness and the whole
(layers x heads) audio-mass matrix at T (captured during the greedy answer's own prefill, so no
second forward pass), one fsync'd JSONL line each: the pass resumes like `eval`, and any head set
(top-K, random control) can be scored from the same records later. An item whose audio cannot be
used is recorded with its `error` and left out of the scores, so a pass always finishes.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from . import mmau
from .capture import AUDIO_MASS, run_with_cache
from .conditions import Answerer, baseline
from .errors import ListenError
from .load import load, resolve, weights_fingerprint
from .plots import heatmap, listening_plot, score_heatmap
from .prompt import prepare
from .records import append_jsonl, claim, locked, read_jsonl, write_json


@dataclass
class HeadSet:
    heads: list[tuple[int, int]]
    scores: np.ndarray | None = None  # (layers, heads) Pearson r, when known
    meta: dict | None = None
    path: Path | None = None  # the file it was read from

    @property
    def layers(self) -> list[int]:
        """L*: the distinct layers of the selected heads (steering reads the residual there)."""
        return sorted({l for l, _ in self.heads})

    def listening(self, mass: np.ndarray) -> float:
        """L(x) for one (layers, heads) audio-mass matrix."""
        return float(np.mean([mass[l, h] for l, h in self.heads]))

    def save(self, path: Path):
        data = {"heads": [list(map(int, h)) for h in self.heads], "k": len(self.heads), **(self.meta or {})}
        if self.scores is not None:
            data["scores"] = {f"{l},{h}": round(float(self.scores[l, h]), 6)
                              for l in range(self.scores.shape[0]) for h in range(self.scores.shape[1])}
        write_json(Path(path), data)

    @classmethod
    def load(cls, path) -> "HeadSet":
        try:
            data = json.loads(Path(path).read_text())
            heads = [(int(l), int(h)) for l, h in data["heads"]]
        except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise ListenError(f"{path} is not a HEADS.json file ({type(e).__name__}: {e})") from None
        if not heads:
            raise ListenError(f"{path} selects no heads")
        if any(l < 0 or h < 0 for l, h in heads):
            raise ListenError(f"{path} lists negative layer or head indices")
        if len(set(heads)) != len(heads):
            dup = sorted({h for h in heads if heads.count(h) > 1})
            raise ListenError(f"{path} lists heads {dup} more than once")
        scores = _read_scores(path, data.get("scores")) if "scores" in data else None
        return cls(heads, scores, {k: v for k, v in data.items() if k not in ("heads", "scores", "k")}, Path(path))

    def check(self, n_layers: int, n_heads: int):
        bad = [(l, h) for l, h in self.heads if not (0 <= l < n_layers and 0 <= h < n_heads)]
        if bad:
            raise ListenError(f"heads {bad} do not exist in this model ({n_layers} layers x {n_heads} heads)")


def _read_scores(path, raw) -> np.ndarray:
    """The `"layer,head": r` map of HEADS.json as a (layers, heads) array; refuses a damaged one."""
    try:
        if not isinstance(raw, dict) or not raw:
            raise ValueError("expected a non-empty object of 'layer,head': r")
        cells = {tuple(int(x) for x in k.split(",")): float(v) for k, v in raw.items()}
        if any(len(k) != 2 or min(k) < 0 for k in cells) or not all(math.isfinite(v) for v in cells.values()):
            raise ValueError("keys must be 'layer,head' and values finite numbers")
    except (ValueError, TypeError, AttributeError) as e:
        raise ListenError(f"{path}: its 'scores' are damaged ({e})") from None
    L, H = 1 + max(l for l, _ in cells), 1 + max(h for _, h in cells)
    scores = np.zeros((L, H))
    for (l, h), v in cells.items():
        scores[l, h] = v
    return scores


def head_scores(mass: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """Pearson r per head between audio mass (N, layers, heads) and correctness (N,); constant heads get 0."""
    c = np.asarray(correct, np.float64)
    if not c.size:
        raise ListenError("no calibration items: head scores need labelled items with both outcomes")
    if c.min() == c.max():
        raise ListenError(f"every calibration item is {'right' if c[0] else 'wrong'}: the correlation with "
                          "correctness is undefined; use a calibration set with both outcomes")
    a = np.asarray(mass, np.float64)
    ac, cc = a - a.mean(0), c - c.mean()
    den = np.sqrt((ac**2).sum(0) * (cc**2).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.tensordot(cc, ac, axes=(0, 0)) / den
    constant = a.max(0) == a.min(0)  # exactly: float noise in the mean must not leave a tiny r
    return np.where((den > 1e-12) & ~constant, r, 0.0)


def top_heads(scores: np.ndarray, k: int) -> list[tuple[int, int]]:
    """The k highest-r heads, best first; ties broken by (layer, head) so the order is deterministic."""
    L, H = scores.shape
    order = sorted(((-scores[l, h], l, h) for l in range(L) for h in range(H)))
    return [(l, h) for _, l, h in order[:k]]


def random_heads(n_layers: int, n_heads: int, k: int, seed: int) -> list[tuple[int, int]]:
    """The random-head control: k heads uniformly over all of them, without replacement."""
    idx = np.random.default_rng(seed).choice(n_layers * n_heads, size=k, replace=False)
    return [(int(i // n_heads), int(i % n_heads)) for i in idx]


# -- the calibration pass ---------------------------------------------------------------------

def failed_row(item: dict, error: Exception) -> dict:
    """The record of an item that could not be run (its audio, usually): kept, never retried."""
    return {"id": item["id"], "task": item["task"], "error": str(error)}


def answer_with_mass(answerer: Answerer, prompt) -> tuple:
    """The greedy baseline answer and every head's audio mass at T, from the answer's own prefill."""
    ans = answerer(prompt)["base"]
    return ans, ans.audio_mass


def calibrate(model, processor, items: Sequence[dict], audio_dir: Path, records: Path, prompt_preset: str,
              max_tokens: int = 256, progress: bool = True) -> list[dict]:
    """Per-item records (correctness, audio mass at T), resuming from `records` (JSONL)."""
    answer = Answerer(model, processor, [baseline()], max_tokens=max_tokens, audio_mass=True)
    done = {r["id"]: r for r in read_jsonl(records, repair=True)}
    todo = [it for it in items if it["id"] not in done]
    for item in tqdm(todo, desc="heads", unit="item", file=sys.stderr, disable=not progress):
        tic = time.perf_counter()
        try:
            prompt = prepare(model, processor, [Path(audio_dir) / item["audio_id"]], mmau.build_prompt(item, prompt_preset))
        except ListenError as e:
            row = failed_row(item, e)
        else:
            ans, mass = answer_with_mass(answer, prompt)
            extracted, parsed = mmau.extract_answer(ans.text)
            row = {"id": item["id"], "task": item["task"], "answer": extracted, "parsed": parsed,
                   "correct": mmau.string_match(item["answer"], extracted, item["choices"]),
                   "audio_tokens": prompt.n_audio_tokens, "seconds": round(time.perf_counter() - tic, 4),
                   "audio_mass": np.round(mass.astype(np.float64), 7).tolist()}
        append_jsonl(records, row)
        done[item["id"]] = row
    return [done[it["id"]] for it in items if it["id"] in done]


def usable(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(rows with a result, rows of items that failed)."""
    return [r for r in rows if "error" not in r], [r for r in rows if "error" in r]


def find_heads(rows: list[dict], k: int, meta: dict) -> HeadSet:
    rows, _ = usable(rows)
    if not rows:
        raise ListenError("no calibration items: head scores need labelled items with both outcomes")
    mass = np.array([r["audio_mass"] for r in rows], np.float64)
    correct = np.array([r["correct"] for r in rows], bool)
    scores = head_scores(mass, correct)
    k = min(k, scores.size)
    heads = top_heads(scores, k)
    listening_mean = float(np.mean([HeadSet(heads).listening(m) for m in mass]))  # L̄, for strength scaling
    return HeadSet(heads, scores, {**meta, "n_items": len(rows), "accuracy": float(correct.mean()),
                                   "listening_mean": listening_mean, "criterion": "correctness (Pearson r)",
                                   "query": "last prompt token", "audio_span": "<|AUDIO|> positions", "mass": "sum"})


def write_side_files(headset: HeadSet, rows: list[dict], out: Path, seed: int):
    """CSV of all head scores and the two plots next to HEADS.json."""
    mass = np.array([r["audio_mass"] for r in rows], np.float64)
    correct = np.array([r["correct"] for r in rows], bool)
    s = headset.scores
    selected = set(headset.heads)
    lines = ["layer,head,r,selected,mean_mass,mean_mass_correct,mean_mass_wrong"]
    for l in range(s.shape[0]):
        for h in range(s.shape[1]):
            m = mass[:, l, h]
            lines.append(f"{l},{h},{s[l, h]:.6f},{int((l, h) in selected)},{m.mean():.6f},"
                         f"{m[correct].mean():.6f},{m[~correct].mean():.6f}")
    out.with_suffix(".csv").write_text("\n".join(lines) + "\n")
    score_heatmap(s, headset.heads, out.with_name(out.stem + ".scores.png"))
    plot_listening_split(headset, mass, correct, ("correct", "wrong"), out.with_name(out.stem + ".listening.png"), seed)


def plot_listening_split(headset: HeadSet, mass: np.ndarray, flag: np.ndarray, labels: tuple[str, str], path: Path,
                         seed: int):
    """L(x) of the items where `flag` holds against the rest, for the heads and a random-head control."""
    rand = HeadSet(random_heads(*mass.shape[1:], len(headset.heads), seed))
    groups = {}
    for name, hs in (("selected heads", headset), ("random heads (control)", rand)):
        L = np.array([hs.listening(m) for m in mass])
        groups[name] = (L[flag], L[~flag])
    listening_plot(groups, labels, path)


# -- validation: does L rise when the audio matters? -------------------------------------------

def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """ROC AUC of a score for pos vs neg (Mann-Whitney U / (n_pos n_neg), ties count half)."""
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    if not pos.size or not neg.size:
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def bootstrap_diff(a: np.ndarray, b: np.ndarray, seed: int = 0, n: int = 2000) -> tuple[float, float]:
    """95% percentile-bootstrap interval of mean(a) - mean(b)."""
    if not len(a) or not len(b):
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    d = [rng.choice(a, len(a)).mean() - rng.choice(b, len(b)).mean() for _ in range(n)]
    return float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))


def validation_records(model, processor, items, audio_dir: Path, records: Path, prompt_preset: str,
                       max_tokens: int, progress: bool = True) -> list[dict]:
    """Per item: greedy answer with the audio (and its audio mass at T) and with equal-length silence."""
    answer = Answerer(model, processor, [baseline()], max_tokens=max_tokens, audio_mass=True)
    done = {r["id"]: r for r in read_jsonl(records, repair=True)}
    for item in tqdm([it for it in items if it["id"] not in done], desc="validate", unit="item",
                     file=sys.stderr, disable=not progress):
        question = mmau.build_prompt(item, prompt_preset)
        try:
            prompt = prepare(model, processor, [Path(audio_dir) / item["audio_id"]], question)
        except ListenError as e:
            row = failed_row(item, e)
        else:
            ans, mass = answer_with_mass(answer, prompt)
            sil = answer(answer.silence.prompt(prompt))["base"]
            a, _ = mmau.extract_answer(ans.text)
            s, _ = mmau.extract_answer(sil.text)
            row = {"id": item["id"], "task": item["task"], "answer_audio": a, "answer_silence": s, "changed": a != s,
                   "correct": mmau.string_match(item["answer"], a, item["choices"]),
                   "audio_mass": np.round(mass.astype(np.float64), 7).tolist()}
        append_jsonl(records, row)
        done[item["id"]] = row
    return [done[it["id"]] for it in items if it["id"] in done]


def validate(headset: HeadSet, rows: list[dict], seed: int = 0, n_random: int = 5) -> dict:
    """L(x) for items whose answer the audio changed vs not, for the heads and the random control.

    Values that are undefined (a group with no items) are None, so the report is strict JSON."""
    rows, _ = usable(rows)
    if not rows:
        raise ListenError("no validation items")
    mass = np.array([r["audio_mass"] for r in rows], np.float64)
    changed = np.array([r["changed"] for r in rows], bool)

    def summary(hs: HeadSet, boot_seed: int) -> dict:
        L = np.array([hs.listening(m) for m in mass])
        a, b = L[changed], L[~changed]
        both = bool(a.size and b.size)
        return {"heads": [list(h) for h in hs.heads],
                "mean_changed": float(a.mean()) if a.size else None,
                "mean_unchanged": float(b.mean()) if b.size else None,
                "difference": float(a.mean() - b.mean()) if both else None,
                "difference_ci95": list(bootstrap_diff(a, b, boot_seed)) if both else None,
                "auc": auc(a, b) if both else None}

    L_, H_ = mass.shape[1:]
    controls = [summary(HeadSet(random_heads(L_, H_, len(headset.heads), seed + i)), seed + i) for i in range(n_random)]
    aucs = [c["auc"] for c in controls if c["auc"] is not None]
    return {"n": len(rows), "n_changed": int(changed.sum()), "n_unchanged": int((~changed).sum()),
            "heads": summary(headset, seed), "random_control": controls,
            "random_auc_mean": float(np.mean(aucs)) if aucs else None,
            "random_auc_sd": float(np.std(aucs)) if aucs else None}


# -- the commands' work (the CLI only formats) ------------------------------------------------

def calibration_items(data: Path, audio_dir: Path, limit: int | None) -> list[dict]:
    """The items of a `heads` / `validate-heads` run; refuse missing audio up front."""
    items = mmau.load_items(data)[:limit]
    missing = [it["audio_id"] for it in items if not (Path(audio_dir) / it["audio_id"]).is_file()]
    if missing:
        raise ListenError(f"{len(missing)} audio files missing under {audio_dir}, e.g. {missing[0]}")
    return items


def _identity(model_path, data: Path, prompt: str, max_tokens: int) -> dict:
    return {"model_fingerprint": weights_fingerprint(resolve(model_path)), "data": mmau.file_sha256(data),
            "prompt": prompt, "max_tokens": max_tokens}


def discover(model_path, data: Path, audio_dir: Path, out: Path, *, k: int = 20, limit: int | None = None,
             seed: int = 0, prompt: str = mmau.DEFAULT_PRESET, max_tokens: int = 256,
             progress: bool = True) -> tuple[HeadSet, list[dict]]:
    """`mlx-listen heads`: the calibration pass (resumable, next to `out`), the top-k heads, and
    HEADS.json with its CSV and plots. Returns the head set and the per-item records."""
    out = Path(out)
    items = calibration_items(data, audio_dir, limit)
    records = out.with_name(out.stem + ".items.jsonl")
    ident = _identity(model_path, data, prompt, max_tokens)
    with locked(out.parent, f".{out.name}.lock"):
        claim(records.with_suffix(".meta.json"), ident, extra={"model": str(model_path), "seed": seed})
        model, processor = load(model_path)
        rows = calibrate(model, processor, items, Path(audio_dir), records, prompt, max_tokens, progress)
        meta = {"model": str(model_path), **ident, "seed": seed}
        hs = find_heads(rows, k, meta)
        hs.save(out)
        write_side_files(hs, usable(rows)[0], out, seed)
    return hs, rows


def validate_run(headset: HeadSet, model_path, data: Path, audio_dir: Path, out: Path, *, limit: int | None = None,
                 seed: int = 0, prompt: str = mmau.DEFAULT_PRESET, max_tokens: int = 256,
                 progress: bool = True) -> dict:
    """`mlx-listen validate-heads`: answers with the audio and with silence (resumable, in `out`),
    then `validate`; writes validation.json and validation.png."""
    out = Path(out)
    items = calibration_items(data, audio_dir, limit)
    records = out / "items.jsonl"
    with locked(out):
        claim(out / "items.meta.json", _identity(model_path, data, prompt, max_tokens), extra={"model": str(model_path)})
        model, processor = load(model_path)
        headset.check(len(model.layers), model.config.text_config.num_attention_heads)
        rows = validation_records(model, processor, items, Path(audio_dir), records, prompt, max_tokens, progress)
        rep = validate(headset, rows, seed)
        write_json(out / "validation.json", rep)
        good = usable(rows)[0]
        plot_listening_split(headset, np.array([r["audio_mass"] for r in good]),
                             np.array([r["changed"] for r in good], bool), ("audio changed answer", "unchanged"),
                             out / "validation.png", seed)
    return rep


def validation_lines(rep: dict) -> list[str]:
    def f(v, spec=".4f"):
        return "n/a" if v is None else format(v, spec)

    h = rep["heads"]
    ci = h["difference_ci95"]
    return [f"{rep['n']} items; the audio changed the answer on {rep['n_changed']}",
            f"listening score: changed {f(h['mean_changed'])}, unchanged {f(h['mean_unchanged'])}, difference "
            f"{f(h['difference'], '+.4f')} (95% CI {f(ci and ci[0], '+.4f')} to {f(ci and ci[1], '+.4f')}), "
            f"AUC {f(h['auc'], '.3f')}",
            f"random-head control AUC: {f(rep['random_auc_mean'], '.3f')} ± {f(rep['random_auc_sd'], '.3f')}"]


def attention_map(model, processor, clip, question: str, *, system: str | None = None, heads: HeadSet | None = None,
                  json_out: Path | None = None, png: Path | None = None) -> dict:
    """`mlx-listen attention`: every head's audio mass at T for one question (one prefill, logits
    at T only), as a JSON-able dict; written to `json_out` and drawn to `png` when given."""
    prompt = prepare(model, processor, [clip], question, system)
    _, cap = run_with_cache(model, prompt, AUDIO_MASS.format("*"))
    mass = cap.audio_mass(prompt.last)
    out = {"layers": int(mass.shape[0]), "heads": int(mass.shape[1]),
           "audio_mass": [[round(float(v), 7) for v in row] for row in mass],
           "listening": heads.listening(mass) if heads else None, "audio_tokens": prompt.n_audio_tokens}
    if json_out is not None:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        write_json(Path(json_out), out)
    if png is not None:
        heatmap(mass, Path(png), f"Audio attention mass at the last prompt token ({prompt.n_audio_tokens} audio tokens)",
                "attention mass on audio", marked=heads.heads if heads else ())
    return out
