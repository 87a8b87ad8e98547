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
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from . import mmau, scoring, stats
from .capture import AUDIO_MASS, run_with_cache
from .conditions import Answerer, baseline
from .errors import ListenError, ListenWarning
from .identity import check_binding, model_signature
from .load import load, model_shape, resolve, weights_fingerprint
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
    if L * H != len(cells):  # HEADS.json holds the dense grid it was written with
        raise ListenError(f"{path}: its 'scores' are damaged ({len(cells)} entries for a {L} x {H} grid)")
    scores = np.zeros((L, H))
    for (l, h), v in cells.items():
        scores[l, h] = v
    return scores


head_scores = stats.head_scores  # pooled Pearson r per head (or within task: stats.head_scores(center="task"))


def top_heads(scores: np.ndarray, k: int) -> list[tuple[int, int]]:
    """The k highest-r heads, best first; ties broken by (layer, head); k above the head count refused."""
    return [tuple(h) for h in stats.top_k(scores, k).heads]


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
              max_tokens: int = 256, progress: bool = True, margin: bool = False) -> list[dict]:
    """Per-item records (correctness, audio mass at T), resuming from `records` (JSONL); `margin`:
    also each choice's log-prob and the correct option's margin, from the answer's own prefill."""
    answer = Answerer(model, processor, [baseline()], max_tokens=max_tokens, audio_mass=True)
    done = {r["id"]: r for r in read_jsonl(records, repair=True)}
    todo = [it for it in items if it["id"] not in done]
    for item in tqdm(todo, desc="heads", unit="item", file=sys.stderr, disable=not progress):
        tic = time.perf_counter()
        try:
            prompt = prepare(model, processor, [Path(audio_dir) / item["audio_id"]], mmau.build_prompt(item, prompt_preset))
            options = scoring.option_ids(processor, prompt, item["choices"], prompt_preset) if margin else None
        except ListenError as e:
            row = failed_row(item, e)
        else:
            if options is not None:  # the answer and the options' log-probs from one prefill
                r = answer.respond(prompt, options)["base"]
                ans, mass, logprobs = r.answer, r.answer.audio_mass, r.logprobs
            else:
                (ans, mass), logprobs = answer_with_mass(answer, prompt), None
            extracted, parsed = mmau.extract_answer(ans.text)
            row = {"id": item["id"], "task": item["task"], "answer": extracted, "parsed": parsed,
                   "correct": mmau.string_match(item["answer"], extracted, item["choices"]),
                   "audio_tokens": prompt.n_audio_tokens, "seconds": round(time.perf_counter() - tic, 4),
                   "audio_mass": np.round(mass.astype(np.float64), 7).tolist()}
            if logprobs is not None:
                row.update(scoring.row_fields(item, logprobs))
        append_jsonl(records, row)
        done[item["id"]] = row
    return [done[it["id"]] for it in items if it["id"] in done]


def usable(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(rows with a result, rows of items that failed)."""
    return [r for r in rows if "error" not in r], [r for r in rows if "error" in r]


TARGETS = ("correct", "margin")


def find_heads(rows: list[dict], k: int, meta: dict, *, center: str = "none", n_perm: int = 200, n_boot: int = 200,
               seed: int = 0, target: str = "correct") -> HeadSet:
    """The top-k heads of the calibration records, with what a reader needs to trust them: a
    permutation null for the top-k r (correctness shuffled within task), bootstrap stability, and
    the overlap with the head set of the other centering (pooled Pearson vs within task with the
    clip length partialled out)."""
    rows, _ = usable(rows)
    if target not in TARGETS:
        raise ListenError(f"the head-score target must be one of {TARGETS}, not {target!r}")
    if target == "margin":  # the correct option's log-prob margin (scoring.margin), a continuous target
        lacking = [r["id"] for r in rows if "margin" not in r]
        if lacking:
            raise ListenError(f"{len(lacking)} calibration records have no margin (e.g. {lacking[0]}): they were made "
                              "without --target margin; use another --out")
        rows = [r for r in rows if r["margin"] is not None and math.isfinite(r["margin"])]  # one-choice items: none
    if not rows:
        raise ListenError("no calibration items: head scores need labelled items with both outcomes")
    mass = np.array([r["audio_mass"] for r in rows], np.float64)
    correct = np.array([r["correct"] for r in rows], bool)
    y = np.array([r["margin"] for r in rows], np.float64) if target == "margin" else correct
    tasks = [r["task"] for r in rows] if all("task" in r for r in rows) else None
    cov = stats.length_covariate([r["audio_tokens"] for r in rows]) if all("audio_tokens" in r for r in rows) else None
    if center == "task" and tasks is None:
        raise ListenError("center 'task' needs each record's task")

    def kw(c):
        return dict(center=c, tasks=tasks, covariates=cov if c == "task" else None)

    scores = stats.head_scores(mass, y, **kw(center))
    top = stats.top_k(scores, k)
    heads = [tuple(h) for h in top.heads]
    if top.nonpositive:
        warnings.warn(f"{len(top.nonpositive)} of the top {k} heads have r <= 0 ({top.nonpositive[:3]}…): fewer than "
                      f"{k} heads track correctness at all", ListenWarning, stacklevel=2)
    null = stats.permutation_null(mass, y, k=k, n_perm=n_perm, seed=seed, **kw(center))
    freq = stats.bootstrap_stability(mass, y, k=k, n_boot=n_boot, seed=seed, **kw(center))
    other = "task" if center == "none" else "none"
    other_heads = stats.top_k(stats.head_scores(mass, y, **kw(other)), k).heads if tasks is not None else []
    listening_mean = float(np.mean([HeadSet(heads).listening(m) for m in mass]))  # L̄, for strength scaling
    return HeadSet(heads, scores, {
        **meta, "n_items": len(rows), "accuracy": float(correct.mean()), "listening_mean": listening_mean,
        "criterion": "correct-option log-prob margin" if target == "margin" else "correctness", "center": center,
        "score": "Pearson r" if center == "none" else "partial r within task, log clip length partialled out",
        "query": "last prompt token", "audio_span": "<|AUDIO|> positions", "mass": "sum",
        "calibration_ids": [r["id"] for r in rows if "id" in r],
        "null": {k_: v for k_, v in null.items() if k_ != "null_topk"},
        "stability": {"frequency": [float(freq[l, h]) for l, h in heads], "n_boot": n_boot},
        "other_center": {"center": other, "heads": [list(h) for h in other_heads],
                         **stats.set_overlap(heads, other_heads)}})


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
    rand = HeadSet(control_sets(headset.heads, *mass.shape[1:], 1, seed)[0])
    groups = {}
    for name, hs in (("selected heads", headset), ("random heads (control)", rand)):
        L = np.array([hs.listening(m) for m in mass])
        groups[name] = (L[flag], L[~flag])
    listening_plot(groups, labels, path)


# -- validation: does L rise when the audio matters? -------------------------------------------

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
            ca, cs = mmau.matched_choice(a, item["choices"]), mmau.matched_choice(s, item["choices"])
            row = {"id": item["id"], "task": item["task"], "answer_audio": a, "answer_silence": s,
                   "choice_audio": ca, "choice_silence": cs,
                   "changed": None if ca is None or cs is None else ca != cs,
                   "correct": mmau.string_match(item["answer"], a, item["choices"]),
                   "audio_mass": np.round(mass.astype(np.float64), 7).tolist()}
        append_jsonl(records, row)
        done[item["id"]] = row
    return [done[it["id"]] for it in items if it["id"] in done]


def changed_category(row: dict) -> str:
    """Did the audio change the answer? By the option the official matcher reads in each answer;
    an answer that picks no option (or several) is its own category, never "changed"."""
    if "choice_audio" not in row:
        raise ListenError("validation records made by an older mlx-listen (no chosen options); use another --out")
    a, s = row["choice_audio"], row["choice_silence"]
    return "unparsable" if a is None or s is None else ("changed" if a != s else "unchanged")


def validate(headset: HeadSet, rows: list[dict], seed: int = 0, n_random: int = 10, min_group: int = 10) -> dict:
    """L(x) for items whose chosen option the audio changed (audio vs equal-length silence) against
    those it did not: AUC and mean difference with bootstrap CIs (groups under `min_group` items are
    reported as too small), and the same AUC for matched random head sets.

    Values that are undefined are None, so the report is strict JSON."""
    rows, _ = usable(rows)
    if not rows:
        raise ListenError("no validation items")
    mass = np.array([r["audio_mass"] for r in rows], np.float64)
    cat = np.array([changed_category(r) for r in rows])
    ch, un = cat == "changed", cat == "unchanged"

    def summary(hs: HeadSet, boot_seed: int) -> dict:
        L = np.array([hs.listening(m) for m in mass])
        a = stats.auc_ci(L[ch], L[un], seed=boot_seed, min_group=min_group)
        d = stats.mean_diff_ci(L[ch], L[un], seed=boot_seed, min_group=min_group)
        return {"heads": [list(h) for h in hs.heads], "mean_changed": d["mean_a"], "mean_unchanged": d["mean_b"],
                "difference": d["difference"], "difference_ci95": d["ci95"], "auc": a["auc"], "auc_ci95": a["ci95"],
                "too_small": a["too_small"]}

    L_, H_ = mass.shape[1:]
    controls = [summary(HeadSet(c), seed + 1 + i) for i, c in enumerate(control_sets(headset.heads, L_, H_, n_random, seed))]
    aucs = [c["auc"] for c in controls if c["auc"] is not None]
    spec = summary(headset, seed)
    return {"n": len(rows), "n_changed": int(ch.sum()), "n_unchanged": int(un.sum()),
            "n_unparsable": int((cat == "unparsable").sum()),
            "definition": "changed: the option the official matcher reads differs between the audio and the silence "
                          "answer; unparsable: either answer picks no option (left out)",
            "heads": spec, "random_control": controls,
            "random_auc_mean": float(np.mean(aucs)) if aucs else None,
            "random_auc_sd": float(np.std(aucs)) if aucs else None,
            "auc_vs_random": stats.compare_to_controls(spec["auc"], aucs) if aucs and spec["auc"] is not None else None}


def control_sets(heads, n_layers: int, n_heads: int, n: int, seed: int) -> list[list[tuple[int, int]]]:
    """Matched random head sets (same heads per layer, other layers); uniform random sets of the same
    size when no matched set exists (e.g. the heads span every layer)."""
    try:
        return stats.matched_random_sets(heads, n_layers, n_heads, n_sets=n, seed=seed)
    except ListenError:
        return [random_heads(n_layers, n_heads, len(heads), seed + i) for i in range(n)]


# -- the commands' work (the CLI only formats) ------------------------------------------------

def calibration_items(data: Path, audio_dir: Path, limit: int | None) -> list[dict]:
    """The items of a `heads` / `validate-heads` run; refuse missing audio up front."""
    items = mmau.load_items(data)[:limit]
    missing = [it["audio_id"] for it in items if not (Path(audio_dir) / it["audio_id"]).is_file()]
    if missing:
        raise ListenError(f"{len(missing)} audio files missing under {audio_dir}, e.g. {missing[0]}")
    return items


def _identity(model_path, data: Path, prompt: str, max_tokens: int) -> dict:
    return {"model_fingerprint": weights_fingerprint(resolve(model_path)), "data_sha256": mmau.file_sha256(data),
            "prompt": prompt, "max_tokens": max_tokens}


def discover(model_path, data: Path, audio_dir: Path, out: Path, *, k: int = 20, limit: int | None = None,
             seed: int = 0, prompt: str = mmau.DEFAULT_PRESET, max_tokens: int = 256, center: str = "none",
             n_perm: int = 200, n_boot: int = 200, target: str = "correct",
             progress: bool = True) -> tuple[HeadSet, list[dict]]:
    """`mlx-listen heads`: the calibration pass (resumable, next to `out`), the top-k heads with
    their null and stability, and HEADS.json with its CSV and plots. HEADS.json records what it
    is bound to: the model's signature, the prompt preset, the data's sha256 and the calibration
    item ids. Returns the head set and the per-item records."""
    out = Path(out)
    items = calibration_items(data, audio_dir, limit)
    n_layers, n_heads = model_shape(model_path)
    if k > n_layers * n_heads:
        raise ListenError(f"--k {k} is more heads than this model has ({n_layers} layers x {n_heads} heads)")
    records = out.with_name(out.stem + ".items.jsonl")
    ident = _identity(model_path, data, prompt, max_tokens)
    if target == "margin":  # its records hold the option log-probs; records made without keep their identity
        ident["records"] = "with option log-probs"
    with locked(out.parent, f".{out.name}.lock"):
        claim(records.with_suffix(".meta.json"), ident, extra={"model": str(model_path), "seed": seed})
        model, processor = load(model_path)
        rows = calibrate(model, processor, items, Path(audio_dir), records, prompt, max_tokens, progress,
                         margin=target == "margin")
        meta = {"model": str(model_path), **ident, "seed": seed, "model_signature": model_signature(model)}
        hs = find_heads(rows, k, meta, center=center, n_perm=n_perm, n_boot=n_boot, seed=seed, target=target)
        hs.save(out)
        write_side_files(hs, usable(rows)[0], out, seed)
    return hs, rows


def validate_run(headset: HeadSet, model_path, data: Path, audio_dir: Path, out: Path, *, limit: int | None = None,
                 seed: int = 0, prompt: str = mmau.DEFAULT_PRESET, max_tokens: int = 256, force: bool = False,
                 progress: bool = True) -> dict:
    """`mlx-listen validate-heads`: answers with the audio and with silence (resumable, in `out`),
    then `validate`; writes validation.json and validation.png. A head set found on another model or
    prompt is refused (unless `force`); validating on its own calibration items is flagged loudly."""
    out = Path(out)
    items = calibration_items(data, audio_dir, limit)
    binding = check_binding(headset.meta or {}, str(headset.path or "the head set"), prompt=prompt,
                            ids=[it["id"] for it in items], force=force)
    records = out / "items.jsonl"
    with locked(out):
        claim(out / "items.meta.json", _identity(model_path, data, prompt, max_tokens), extra={"model": str(model_path)})
        model, processor = load(model_path)
        headset.check(len(model.layers), model.config.text_config.num_attention_heads)
        binding += check_binding(headset.meta or {}, str(headset.path or "the head set"), model=model, force=force)
        for w in binding:
            warnings.warn(w, ListenWarning, stacklevel=2)
        rows = validation_records(model, processor, items, Path(audio_dir), records, prompt, max_tokens, progress)
        rep = validate(headset, rows, seed)
        rep["warnings"] = binding
        write_json(out / "validation.json", rep)
        good = [r for r in usable(rows)[0] if changed_category(r) != "unparsable"]
        if good:
            plot_listening_split(headset, np.array([r["audio_mass"] for r in good]),
                                 np.array([changed_category(r) == "changed" for r in good]),
                                 ("option changed with silence", "unchanged"), out / "validation.png", seed)
    return rep


def validation_lines(rep: dict) -> list[str]:
    def f(v, spec=".4f"):
        return "n/a" if v is None else format(v, spec)

    h = rep["heads"]
    ci, aci = h["difference_ci95"], h["auc_ci95"]
    lines = [f"{rep['n']} items; the audio changed the chosen option on {rep['n_changed']}, not on "
             f"{rep['n_unchanged']}; {rep['n_unparsable']} answers picked no option (left out)"]
    if h["too_small"]:
        lines.append("listening score: too few items in a group for an interval (fewer than 10); AUC "
                     f"{f(h['auc'], '.3f')}, difference {f(h['difference'], '+.4f')}")
    else:
        lines.append(f"listening score: changed {f(h['mean_changed'])}, unchanged {f(h['mean_unchanged'])}, difference "
                     f"{f(h['difference'], '+.4f')} (95% CI {f(ci and ci[0], '+.4f')} to {f(ci and ci[1], '+.4f')}), "
                     f"AUC {f(h['auc'], '.3f')} (95% CI {f(aci and aci[0], '.3f')} to {f(aci and aci[1], '.3f')})")
    lines.append(f"matched random head sets: AUC {f(rep['random_auc_mean'], '.3f')} ± {f(rep['random_auc_sd'], '.3f')}"
                 + (f"; the heads' empirical p among them {rep['auc_vs_random']['empirical_p']:.3g}"
                    if rep.get("auc_vs_random") else ""))
    return lines


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
