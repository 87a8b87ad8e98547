"""`mlx-listen validate-heads`: does the listening score rise when the audio matters?

Each item is answered with its audio and with equal-length digital silence; the audio "changed"
the answer when the official matcher reads a different option in the two. L(x) of the changed
items against the unchanged ones (AUC and mean difference with bootstrap CIs), pooled and within
strata of correctness x task (`listening_validation`: heads that track correctness alone pass the
pooled comparison whenever correctness predicts "changed", and fail within strata), each beside
the same AUC for matched random head sets (`headset.control_sets`). Answers that pick no option are
their own category, never "changed".
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from .. import presets, stats
from ..errors import ListenError, ListenWarning
from ..eval import mmau
from ..eval.conditions import Answerer, baseline
from ..headset import HeadSet, control_sets, listening
from ..identity import check_binding
from ..load import ModelRef
from ..prompt import prepare
from ..records import Stage, claim, locked, provisional, write_json
from .heads import calibration_items, plot_listening_split, run_identity, usable


def validation_records(model, processor, items, audio_dir: Path, records: Path, prompt_preset: str,
                       max_tokens: int, progress: bool = True) -> list[dict]:
    """Per item: greedy answer with the audio (and its audio mass at T) and with equal-length silence."""
    answer = Answerer(model, processor, [baseline()], max_tokens=max_tokens, audio_mass=True)

    def work(item):
        prompt = prepare(model, processor, [Path(audio_dir) / item["audio_id"]],
                         presets.build_prompt(item, prompt_preset))
        ans = answer.respond(prompt)["base"]
        sil = answer.respond(answer.silence.prompt(prompt))["base"]
        for r in (ans, sil):  # a forward pass that is not finite: an error row, never a record
            if r.error:
                raise ListenError(r.error)
        ans, sil = ans.answer, sil.answer
        a, _ = mmau.extract_answer(ans.text)
        s, _ = mmau.extract_answer(sil.text)
        ca, cs = mmau.matched_choice(a, item["choices"]), mmau.matched_choice(s, item["choices"])
        return {"answer_audio": a, "answer_silence": s, "choice_audio": ca, "choice_silence": cs,
                "changed": None if ca is None or cs is None else ca != cs,
                "correct": mmau.string_match(item["answer"], a, item["choices"]),
                "audio_tokens": prompt.n_audio_tokens, "text_tokens": len(prompt.ids) - prompt.n_audio_tokens,
                "audio_mass": np.round(ans.audio_mass.astype(np.float64), 7).tolist()}

    return Stage(records).run(items, work, desc="validate", progress=progress)


def changed_category(row: dict) -> str:
    """Did the audio change the answer? By the option the official matcher reads in each answer;
    an answer that picks no option (or several) is its own category, never "changed"."""
    if "choice_audio" not in row:
        raise ListenError("validation records made by an older mlx-listen (no chosen options); use another --out")
    a, s = row["choice_audio"], row["choice_silence"]
    return "unparsable" if a is None or s is None else ("changed" if a != s else "unchanged")


def strata_of(rows: list[dict]) -> np.ndarray:
    """Each item's stratum for the within-strata validation: the audio answer's correctness and the
    task ("right|sound"). A score that tracks correctness alone separates nothing within a stratum."""
    return np.array([f"{'right' if r.get('correct') else 'wrong'}|{r.get('task')}" for r in rows])


def listening_validation(L: np.ndarray, category: np.ndarray, strata: np.ndarray, random_L: list[np.ndarray], *,
                         seed: int = 0, min_group: int = 10) -> dict:
    """Does L rise on items whose chosen option the audio changed? Two answers, both reported:

    - pooled: the AUC (and mean difference) of changed against unchanged items over all items;
    - within strata: the AUC over pairs in the same stratum only (`strata`: correctness x task), so
      heads that only track correctness, where correctness predicts "changed" (text dominance: a
      wrong answer is the text prior, which silence repeats), get 0.5 however high the pooled AUC.

    Each beside the same AUC for matched random head sets (`random_L`, one array per set). The head
    set *passes* when the within-strata AUC's 95% CI lies above 0.5 and its empirical p among the
    random sets is below 0.05 (so at least 20 sets are needed to pass at all: 1/21); the pooled result is
    shown for comparison and never passes the validation by itself. Unparsable items are left out."""
    use = category != "unparsable"
    pos = category == "changed"
    ch, un = use & pos, use & ~pos
    a = stats.auc_ci(L[ch], L[un], seed=seed, min_group=min_group)
    d = stats.mean_diff_ci(L[ch], L[un], seed=seed, min_group=min_group)
    w = stats.stratified_auc_ci(L[use], pos[use], strata[use], seed=seed, min_group=min_group)
    pooled_rand = [stats.auc(r[ch], r[un]) if ch.any() and un.any() else None for r in random_L]
    within_rand = [stats.stratified_auc(r[use], pos[use], strata[use]) for r in random_L]

    def judged(auc, ci, rand):
        ok = [x for x in rand if x is not None]
        vs = stats.compare_to_controls(auc, ok) if auc is not None and ok else None
        passes = bool(ci is not None and ci[0] > 0.5 and vs is not None and vs["empirical_p"] < 0.05)
        return {"random_auc": rand, "vs_random": vs, "passes": passes}

    pooled = {"auc": a["auc"], "auc_ci95": a["ci95"], "too_small": a["too_small"], "difference": d["difference"],
              "difference_ci95": d["ci95"], "mean_changed": d["mean_a"], "mean_unchanged": d["mean_b"],
              **judged(a["auc"], a["ci95"], pooled_rand)}
    within = {"auc": w["auc"], "auc_ci95": w["ci95"], "too_small": w["too_small"], "n_changed": w["n_pos"],
              "n_unchanged": w["n_neg"], "strata": w["strata"], **judged(w["auc"], w["ci95"], within_rand)}
    out = {"n_changed": int(ch.sum()), "n_unchanged": int(un.sum()), "n_unparsable": int((~use).sum()),
           "n_random_sets": len(random_L), "pooled": pooled, "within_strata": within, "passes": within["passes"],
           "strata": "the audio answer's correctness x task",
           "definition": "changed: the option the official matcher reads differs between the audio and the silence "
                         "answer; unparsable: either answer picks no option (left out)"}
    out["verdict"] = validation_sentence(out)
    return out


def _auc_text(part: dict) -> str:
    ci = part["auc_ci95"]
    auc = "n/a" if part["auc"] is None else f"{part['auc']:.3f}"
    return auc + (f" (95% CI {ci[0]:.3f} to {ci[1]:.3f})" if ci else " (too few items for an interval)")


def validation_sentence(v: dict) -> str:
    """The verdict of `listening_validation`, written from the numbers it states."""
    w, p = v["within_strata"], v["pooled"]
    if w["auc"] is None:
        return (f"Listening validation: no stratum (correctness x task) holds both changed and unchanged items "
                f"({v['n_changed']} changed, {v['n_unchanged']} unchanged, {v['n_unparsable']} unparsable): "
                "nothing to validate.")
    vs = w["vs_random"]
    among = (f"empirical p {vs['empirical_p']:.3g} among {vs['n']} matched random head sets (smallest possible "
             f"{vs['min_possible_p']:.3g})") if vs else "no random head set to compare with"
    why = []
    if not w["auc_ci95"]:
        why.append("too few items for an interval")
    elif w["auc_ci95"][0] <= 0.5:
        why.append("its interval reaches 0.5")
    if not vs or vs["empirical_p"] >= 0.05:
        why.append("it does not beat the random head sets at p < 0.05")
    head = ("passes" if w["passes"] else "does not pass") + " within strata (right and wrong answers apart, per task)"
    line = (f"Listening validation {head}: AUC {_auc_text(w)} for items whose option changed with silence "
            f"({w['n_changed']}) against unchanged ones ({w['n_unchanged']}), {among}"
            + (f" — {'; '.join(why)}." if why else "."))
    if p["auc"] is not None:
        above = p["auc_ci95"] is not None and p["auc_ci95"][0] > 0.5
        line += (f" Pooled over strata the AUC is {_auc_text(p)}"
                 + (": above 0.5 pooled but not within strata, which heads that only track correctness produce "
                    "whenever correctness predicts a change." if above and not w["passes"] else "."))
    return line + f" {v['n_unparsable']} unparsable left out."


def validate(headset: HeadSet, rows: list[dict], seed: int = 0, n_random: int = 99, min_group: int = 10) -> dict:
    """`listening_validation` of a head set on validation records (audio vs silence answers), with
    `n_random` matched random head sets (`headset.control_sets`; fewer when fewer distinct layer
    sets exist). Values that are undefined are None, so the report is strict JSON."""
    rows, _ = usable(rows)
    if not rows:
        raise ListenError("no validation items")
    if any("correct" not in r for r in rows):
        raise ListenError("validation records made by an older mlx-listen (no correctness); use another --out")
    mass = np.array([r["audio_mass"] for r in rows], np.float64)
    cat = np.array([changed_category(r) for r in rows])
    L_, H_ = mass.shape[1:]
    sets = control_sets(headset.heads, L_, H_, n_random, seed)
    L = np.array([headset.listening(m) for m in mass])
    rand = [np.array([listening(m, rs) for m in mass]) for rs in sets]
    rep = listening_validation(L, cat, strata_of(rows), rand, seed=seed, min_group=min_group)
    return {"n": len(rows), **rep, "heads": [list(h) for h in headset.heads],
            "random_sets": [[list(h) for h in rs] for rs in sets]}


def validation_lines(rep: dict) -> list[str]:
    def f(v, spec=".4f"):
        return "n/a" if v is None else format(v, spec)

    p = rep["pooled"]
    ci = p["difference_ci95"]
    lines = [f"{rep['n']} items; the audio changed the chosen option on {rep['n_changed']}, not on "
             f"{rep['n_unchanged']}; {rep['n_unparsable']} answers picked no option (left out)"]
    lines.append(f"listening score: changed {f(p['mean_changed'])}, unchanged {f(p['mean_unchanged'])}, difference "
                 f"{f(p['difference'], '+.4f')}" + (f" (95% CI {ci[0]:+.4f} to {ci[1]:+.4f})" if ci else
                                                    " (too few items for an interval)"))
    for name, part in (("within strata", rep["within_strata"]), ("pooled", p)):
        vs = part["vs_random"]
        ok = [x for x in part["random_auc"] if x is not None]
        lines.append(f"{name}: AUC {_auc_text(part)}; matched random head sets "
                     + (f"{np.mean(ok):.3f} ± {np.std(ok):.3f} over {len(ok)}" if ok else "n/a")
                     + (f", the heads' empirical p among them {vs['empirical_p']:.3g}" if vs else ""))
    lines.append(rep["verdict"])
    return lines


def validate_run(headset: HeadSet, model, data: Path, audio_dir: Path, out: Path, *, limit: int | None = None,
                 seed: int = 0, prompt: str = presets.DEFAULT_PRESET, max_tokens: int = 256, force: bool = False,
                 progress: bool = True) -> dict:
    """`mlx-listen validate-heads`: answers with the audio and with silence (resumable, in `out`),
    then `validate`; writes validation.json and validation.png. A head set found on another model or
    prompt is refused (unless `force`); validating on its own calibration items is flagged loudly.
    `model`: a folder, repo id or loaded pair; inputs are checked before it loads."""
    out, ref = Path(out), ModelRef.of(model)
    items = calibration_items(data, audio_dir, limit)
    binding = check_binding(headset.meta or {}, str(headset.path or "the head set"), prompt=prompt,
                            ids=[it["id"] for it in items], force=force, family=ref.family)
    headset.check(*ref.shape)  # from the config: before the folder is bound to anything
    records = out / "items.jsonl"
    with locked(out), provisional(out / "items.meta.json"):
        claim(out / "items.meta.json", run_identity(ref, data, prompt, max_tokens), extra={"model": str(ref)})
        mdl, processor = ref.get()
        binding += check_binding(headset.meta or {}, str(headset.path or "the head set"), model=mdl, force=force)
        for w in binding:
            warnings.warn(w, ListenWarning, stacklevel=2)
        rows = validation_records(mdl, processor, items, Path(audio_dir), records, prompt, max_tokens, progress)
        rep = validate(headset, rows, seed)
        rep["warnings"] = binding
        write_json(out / "validation.json", rep)
        good = [r for r in usable(rows)[0] if changed_category(r) != "unparsable"]
        if good:
            plot_listening_split(headset, np.array([r["audio_mass"] for r in good]),
                                 np.array([changed_category(r) == "changed" for r in good]),
                                 ("option changed with silence", "unchanged"), out / "validation.png", seed)
    return rep
