"""`mlx-listen heads`: find the audio-specialist heads (arXiv 2603.06854; the method note's defaults).

- Audio mass a[l][h](x): head h of decoder layer l, softmax attention summed over the audio
  positions, at the last prompt position T (the one that predicts the first answer token).
- Head score: Pearson r over a labelled calibration set between a[l][h](x) and the correctness
  c(x) of the unsteered greedy answer (official MMAU scoring); heads ranked by r, top K kept
  (`--center task`, the default: the partial r within task, with the log clip length and the log
  question length (text tokens of the prompt) partialled out, so heads that only track the task,
  the clip's length or the question's length get no credit; `--center none`: the paper's pooled
  Pearson r; `--target margin`: the correct option's log-prob margin instead of correctness).
- Listening score L(x): the mean of a[l][h](x) over the selected heads (`headset.listening`).

One pass over the calibration items records, per item, its correctness and the whole
(layers x heads) audio-mass matrix at T (captured during the greedy answer's own prefill, so no
second forward pass), one fsync'd JSONL line each (`records.Stage`): the pass resumes like
`eval`, and any head set (top-K, random control) can be scored from the same records later. An
item whose audio cannot be used is recorded with its `error` and left out of the scores.
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import presets, stats
from ..errors import ListenError, ListenWarning
from ..eval import mmau
from ..eval.conditions import Answerer, baseline
from ..eval.logprob import row_fields
from ..headset import HeadSet, control_sets
from ..hooks import AUDIO_MASS, run_with_cache
from ..identity import check_binding, model_signature
from ..interp import scoring
from ..load import ModelRef
from ..plots import heatmap, listening_plot, score_heatmap
from ..prompt import as_features, prepare
from ..records import Stage, claim, file_sha256, locked, provisional, write_json


def top_heads(scores: np.ndarray, k: int) -> list[tuple[int, int]]:
    """The k highest-r heads, best first; ties broken by (layer, head); k above the head count refused."""
    return [tuple(h) for h in stats.top_k(scores, k).heads]


# -- the calibration pass ---------------------------------------------------------------------

def calibrate(model, processor, items: Sequence[dict], audio_dir: Path, records: Path, prompt_preset: str,
              max_tokens: int = 256, progress: bool = True, margin: bool = False) -> list[dict]:
    """Per-item records (correctness, audio mass at T), resuming from `records` (JSONL); `margin`:
    also each choice's log-prob and the correct option's margin, from the answer's own prefill."""
    answer = Answerer(model, processor, [baseline()], max_tokens=max_tokens, audio_mass=True)

    def work(item):
        tic = time.perf_counter()
        prompt = prepare(model, processor, [Path(audio_dir) / item["audio_id"]],
                         presets.build_prompt(item, prompt_preset))
        options = scoring.option_ids(processor, prompt, item["choices"], prompt_preset) if margin else None
        r = answer.respond(prompt, options)["base"]  # the answer and the options' log-probs from one prefill
        extracted, parsed = mmau.extract_answer(r.answer.text) if r.answer is not None else ("", False)
        if r.error:  # a forward pass that is not finite gives no record, never a score
            raise ListenError(r.error)
        row = {"answer": extracted, "parsed": parsed,
               "correct": mmau.string_match(item["answer"], extracted, item["choices"]),
               "audio_tokens": prompt.n_audio_tokens, "text_tokens": text_tokens(prompt),
               "seconds": round(time.perf_counter() - tic, 4),
               "audio_mass": np.round(r.answer.audio_mass.astype(np.float64), 7).tolist()}
        if r.logprobs is not None:
            row.update(row_fields(item, r.logprobs))
        return row

    return Stage(records).run(items, work, desc="heads", progress=progress)


def usable(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(rows with a result, rows of items that failed)."""
    return [r for r in rows if "error" not in r], [r for r in rows if "error" in r]


TARGETS = ("correct", "margin")
CENTERS = ("task", "none")
PARTIALLED_OUT = {"none": [], "task": ["task", "log clip length (audio tokens)",
                                       "log question length (text tokens of the prompt)"]}


def text_tokens(prompt) -> int:
    """The question's length as the model sees it: the prompt's tokens that are not audio placeholders
    (the chat template, the question, the choices and the instruction)."""
    return len(prompt.ids) - prompt.n_audio_tokens


def covariates(rows: list[dict], center: str):
    """What `center` partials out besides the task: (covariates (N, 2) or None, their description).
    Records made before the question length was recorded are refused for "task" (no fallback: a
    question length guessed from the item's text would not be the one the model saw)."""
    if center not in CENTERS:
        raise ListenError(f"center must be one of {', '.join(CENTERS)}, not {center!r}")
    if center == "none":
        return None, PARTIALLED_OUT["none"]
    lacking = [r.get("id", "?") for r in rows if "text_tokens" not in r or "audio_tokens" not in r]
    if lacking:
        raise ListenError(f"{len(lacking)} calibration records have no question length (text_tokens; e.g. "
                          f"{lacking[0]}): they were made by an older mlx-listen, and --center task partials the "
                          "question length out; record them again (another --out) or use --center none")
    return (stats.length_covariates([r["audio_tokens"] for r in rows], [r["text_tokens"] for r in rows]),
            PARTIALLED_OUT["task"])


def score_name(center: str, target: str = "correct") -> str:
    """What a head's score is, in words (HEADS.json, the plots)."""
    y = "the correct option's log-prob margin" if target == "margin" else "correct"
    if center == "none":
        return f"Pearson r(audio mass, {y})"
    return f"partial r(audio mass, {y} | task, log clip length, log question length)"


def find_heads(rows: list[dict], k: int, meta: dict, *, center: str = "task", n_perm: int = 200, n_boot: int = 200,
               seed: int = 0, target: str = "correct") -> HeadSet:
    """The top-k heads of the calibration records, with what a reader needs to trust them: a
    permutation null for the top-k r (correctness shuffled within task), bootstrap stability with its
    null reference (the same with correctness shuffled), and the overlap with the head set of the
    other centering (within task with clip and question length partialled out vs pooled Pearson)."""
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
    if center == "task" and tasks is None:
        raise ListenError("center 'task' needs each record's task")
    cov, partialled = covariates(rows, center)

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
    null_freq = stats.null_stability(mass, y, k=k, n_boot=n_boot, seed=seed + 7, **kw(center))
    other = "task" if center == "none" else "none"
    other_ok = tasks is not None and (other == "none" or all("text_tokens" in r for r in rows))
    if other == "task" and other_ok:
        cov, _ = covariates(rows, "task")
    other_heads = stats.top_k(stats.head_scores(mass, y, **kw(other)), k).heads if other_ok else []
    listening_mean = float(np.mean([HeadSet(heads).listening(m) for m in mass]))  # L̄, for strength scaling
    return HeadSet(heads, scores, {
        **meta, "n_items": len(rows), "accuracy": float(correct.mean()), "listening_mean": listening_mean,
        "criterion": "correct-option log-prob margin" if target == "margin" else "correctness", "center": center,
        "score": score_name(center, target), "partialled_out": partialled,
        "query": "last prompt token", "audio_span": "<|AUDIO|> positions", "mass": "sum",
        "calibration_ids": [r["id"] for r in rows if "id" in r],
        "null": {k_: v for k_, v in null.items() if k_ != "null_topk"},
        "stability": {"frequency": [float(freq[l, h]) for l, h in heads], "n_boot": n_boot,
                      "mean": float(np.mean([freq[l, h] for l, h in heads])), "null_reference": null_freq},
        "other_center": {"center": other, "heads": [list(h) for h in other_heads],
                         **stats.set_overlap(heads, other_heads),
                         **({} if other_ok else {"note": "not computed: the records lack task or question length"})}})


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
    score_heatmap(s, headset.heads, out.with_name(out.stem + ".scores.png"),
                  score=(headset.meta or {}).get("score", "Pearson r(audio mass, correct)"))
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


# -- the commands' work (the CLI only formats) ------------------------------------------------

def calibration_items(data: Path, audio_dir: Path, limit: int | None) -> list[dict]:
    """The items of a `heads` / `validate-heads` run; refuse missing audio up front."""
    items = mmau.load_items(data)[:limit]
    missing = [it["audio_id"] for it in items if not (Path(audio_dir) / it["audio_id"]).is_file()]
    if missing:
        raise ListenError(f"{len(missing)} audio files missing under {audio_dir}, e.g. {missing[0]}")
    return items


def run_identity(ref: ModelRef, data: Path, prompt: str, max_tokens: int) -> dict:
    return {"model_fingerprint": ref.fingerprint(), "data_sha256": file_sha256(data), "prompt": prompt,
            "max_tokens": max_tokens}


def discover(model, data: Path, audio_dir: Path, out: Path, *, k: int = 20, limit: int | None = None,
             seed: int = 0, prompt: str = presets.DEFAULT_PRESET, max_tokens: int = 256, center: str = "task",
             n_perm: int = 200, n_boot: int = 200, target: str = "correct",
             progress: bool = True) -> tuple[HeadSet, list[dict]]:
    """`mlx-listen heads`: the calibration pass (resumable, next to `out`), the top-k heads with
    their null and stability, and HEADS.json with its CSV and plots. HEADS.json records what it
    is bound to: the model's signature, the prompt preset, the data's sha256 and the calibration
    item ids. `model`: a folder, repo id or loaded pair; inputs are checked before it loads.
    Returns the head set and the per-item records."""
    out, ref = Path(out), ModelRef.of(model)
    if not out.parent.is_dir():
        raise ListenError(f"the folder of {out} does not exist")
    items = calibration_items(data, audio_dir, limit)
    n_layers, n_heads = ref.shape
    if k > n_layers * n_heads:
        raise ListenError(f"--k {k} is more heads than this model has ({n_layers} layers x {n_heads} heads)")
    records = out.with_name(out.stem + ".items.jsonl")
    ident = run_identity(ref, data, prompt, max_tokens)
    if target == "margin":  # its records hold the option log-probs; records made without keep their identity
        ident["records"] = "with option log-probs"
    with locked(out.parent, f".{out.name}.lock"), provisional(records.with_suffix(".meta.json")):
        claim(records.with_suffix(".meta.json"), ident, extra={"model": str(ref), "seed": seed})
        mdl, processor = ref.get()
        rows = calibrate(mdl, processor, items, Path(audio_dir), records, prompt, max_tokens, progress,
                         margin=target == "margin")
        meta = {"model": str(ref), **ident, "seed": seed, "model_signature": model_signature(mdl)}
        hs = find_heads(rows, k, meta, center=center, n_perm=n_perm, n_boot=n_boot, seed=seed, target=target)
        hs.save(out)
        write_side_files(hs, usable(rows)[0], out, seed)
    return hs, rows


def writable_file(path, option: str):
    """Refuse (one line, before any model work) an output file whose folder is a file or a path that
    is a folder; a missing folder is made when the file is written."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise ListenError(f"{option} {path} is a folder, not a file")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ListenError(f"{option} {path}: {parent} is a file, not a folder")
            break


def attention_map(model, clip, question: str, *, system: str | None = None, heads: HeadSet | None = None,
                  json_out: Path | None = None, png: Path | None = None, force: bool = False) -> dict:
    """`mlx-listen attention`: every head's audio mass at T for one question (one prefill, logits
    at T only), as a JSON-able dict; written to `json_out` and drawn to `png` when given. `model`:
    a folder, repo id or loaded pair; the clip, the outputs and the head set are checked first. A
    head set found on another model is refused unless `force` (then recorded in `warnings`)."""
    writable_file(json_out, "--json")
    writable_file(png, "--png")
    ref = ModelRef.of(model)
    feats = as_features(clip, front=ref.front_end)  # the family's, from the config alone
    if heads is not None:
        heads.check(*ref.shape)
    mdl, processor = ref.get()
    found = []
    if heads is not None:
        found = check_binding(heads.meta or {}, str(heads.path or "the head set"), model=mdl, force=force)
        for w in found:
            warnings.warn(w, ListenWarning, stacklevel=2)
    prompt = prepare(mdl, processor, [feats], question, system)
    _, cap = run_with_cache(mdl, prompt, AUDIO_MASS.format("*"))
    mass = cap.audio_mass(prompt.last)
    out = {"layers": int(mass.shape[0]), "heads": int(mass.shape[1]),
           "audio_mass": [[round(float(v), 7) for v in row] for row in mass],
           "listening": heads.listening(mass) if heads else None, "audio_tokens": prompt.n_audio_tokens,
           **({"warnings": found} if found else {})}
    if json_out is not None:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        write_json(Path(json_out), out)
    if png is not None:
        Path(png).parent.mkdir(parents=True, exist_ok=True)
        heatmap(mass, Path(png), f"Audio attention mass at the last prompt token ({prompt.n_audio_tokens} audio tokens)",
                "attention mass on audio", marked=heads.heads if heads else ())
    return out
