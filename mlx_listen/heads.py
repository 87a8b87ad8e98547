"""Audio-specialist heads and the listening score (arXiv 2603.06854; shared/design/method.md).

- Audio mass a[l][h](x): head h of decoder layer l, softmax attention summed over the `<|AUDIO|>`
  positions, at the last prompt position T (the one that predicts the first answer token).
- Head score: Pearson r over a labelled calibration set between a[l][h](x) and the correctness
  c(x) of the unsteered greedy answer (official MMAU scoring); heads ranked by r, top K kept.
- Listening score L(x): the mean of a[l][h](x) over the selected heads.

One pass over the calibration items records, per item, its correctness and the whole
(layers x heads) audio-mass matrix at T (captured during the greedy answer's own prefill, so no
second forward pass), one fsync'd JSONL line each: the pass resumes like `eval`, and any head set
(top-K, random control) can be scored from the same records later.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from . import mmau
from .errors import ListenError
from .evaluate import append_jsonl, read_jsonl


@dataclass
class HeadSet:
    heads: list[tuple[int, int]]
    scores: np.ndarray | None = None  # (layers, heads) Pearson r, when known
    meta: dict | None = None

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
        Path(path).write_text(json.dumps(data, indent=2))

    @classmethod
    def load(cls, path) -> "HeadSet":
        try:
            data = json.loads(Path(path).read_text())
            heads = [(int(l), int(h)) for l, h in data["heads"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ListenError(f"{path} is not a HEADS.json file ({e})") from None
        if not heads:
            raise ListenError(f"{path} selects no heads")
        if len(set(heads)) != len(heads):
            dup = sorted({h for h in heads if heads.count(h) > 1})
            raise ListenError(f"{path} lists heads {dup} more than once")
        scores = None
        if "scores" in data:
            L = 1 + max(int(k.split(",")[0]) for k in data["scores"])
            H = 1 + max(int(k.split(",")[1]) for k in data["scores"])
            scores = np.zeros((L, H))
            for k, v in data["scores"].items():
                l, h = map(int, k.split(","))
                scores[l, h] = v
        return cls(heads, scores, {k: v for k, v in data.items() if k not in ("heads", "scores", "k")})

    def check(self, n_layers: int, n_heads: int):
        bad = [(l, h) for l, h in self.heads if not (0 <= l < n_layers and 0 <= h < n_heads)]
        if bad:
            raise ListenError(f"heads {bad} do not exist in this model ({n_layers} layers x {n_heads} heads)")


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

def answer_with_mass(model, processor, prompt, max_tokens: int):
    """Greedy answer and the (layers, heads) audio mass at T, from the same prefill."""
    from .capture import AUDIO_MASS, Capture
    from .generate import generate

    T = len(prompt.ids) - 1
    with Capture(model, AUDIO_MASS.format("*"), prompt.audio_positions) as cap:
        ans = generate(model, processor, prompt, max_tokens=max_tokens, temp=0.0)
    return ans, cap.audio_mass(T)


def calibrate(model, processor, items: Sequence[dict], audio_dir: Path, records: Path, prompt_preset: str,
              max_tokens: int = 256, progress: bool = True) -> list[dict]:
    """Per-item records (correctness, audio mass at T), resuming from `records` (JSONL)."""
    from tqdm import tqdm

    from .audio import audio_features, load_audio
    from .generate import prepare

    done = {r["id"]: r for r in read_jsonl(records, repair=True)}
    todo = [it for it in items if it["id"] not in done]
    for item in tqdm(todo, desc="heads", unit="item", file=sys.stderr, disable=not progress):
        tic = time.perf_counter()
        feats = audio_features(load_audio(audio_dir / item["audio_id"]), item["audio_id"])
        prompt = prepare(model, processor, [feats], mmau.build_prompt(item, prompt_preset))
        ans, mass = answer_with_mass(model, processor, prompt, max_tokens)
        extracted, parsed = mmau.extract_answer(ans.text)
        row = {"id": item["id"], "task": item["task"], "answer": extracted, "parsed": parsed,
               "correct": mmau.string_match(item["answer"], extracted, item["choices"]),
               "audio_tokens": prompt.n_audio_tokens, "seconds": round(time.perf_counter() - tic, 4),
               "audio_mass": np.round(mass.astype(np.float64), 7).tolist()}
        append_jsonl(records, row)
        done[item["id"]] = row
    return [done[it["id"]] for it in items if it["id"] in done]


def find_heads(rows: list[dict], k: int, meta: dict) -> HeadSet:
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
    from .plots import score_heatmap

    score_heatmap(s, headset.heads, out.with_name(out.stem + ".scores.png"))
    plot_listening_split(headset, mass, correct, ("correct", "wrong"), out.with_name(out.stem + ".listening.png"), seed)


def plot_listening_split(headset: HeadSet, mass: np.ndarray, flag: np.ndarray, labels: tuple[str, str], path: Path,
                         seed: int):
    """L(x) of the items where `flag` holds against the rest, for the heads and a random-head control."""
    from .plots import listening_plot

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
    from tqdm import tqdm

    from .audio import audio_features, load_audio
    from .generate import generate, prepare

    done = {r["id"]: r for r in read_jsonl(records, repair=True)}
    for item in tqdm([it for it in items if it["id"] not in done], desc="validate", unit="item",
                     file=sys.stderr, disable=not progress):
        audio = load_audio(audio_dir / item["audio_id"])
        question = mmau.build_prompt(item, prompt_preset)
        prompt = prepare(model, processor, [audio_features(audio, item["audio_id"])], question)
        ans, mass = answer_with_mass(model, processor, prompt, max_tokens)
        silent = prepare(model, processor, [audio_features(np.zeros_like(audio), "silence")], question)
        sil = generate(model, processor, silent, max_tokens=max_tokens, temp=0.0)
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
