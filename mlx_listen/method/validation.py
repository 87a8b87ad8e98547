"""`mlx-listen validate-heads`: does the listening score rise when the audio matters?

Each item is answered with its audio and with equal-length digital silence; the audio "changed"
the answer when the official matcher reads a different option in the two. L(x) of the changed
items against the unchanged ones (AUC and mean difference with bootstrap CIs), beside the same
AUC for matched random head sets (`headset.control_sets`). Answers that pick no option are their
own category, never "changed".
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from .. import presets, stats
from ..errors import ListenError, ListenWarning
from ..eval import mmau
from ..eval.conditions import Answerer, baseline
from ..headset import HeadSet, control_sets
from ..identity import check_binding
from ..load import ModelRef
from ..prompt import prepare
from ..records import Stage, claim, locked, write_json
from .heads import calibration_items, plot_listening_split, run_identity, usable


def validation_records(model, processor, items, audio_dir: Path, records: Path, prompt_preset: str,
                       max_tokens: int, progress: bool = True) -> list[dict]:
    """Per item: greedy answer with the audio (and its audio mass at T) and with equal-length silence."""
    answer = Answerer(model, processor, [baseline()], max_tokens=max_tokens, audio_mass=True)

    def work(item):
        prompt = prepare(model, processor, [Path(audio_dir) / item["audio_id"]],
                         presets.build_prompt(item, prompt_preset))
        ans = answer(prompt)["base"]
        sil = answer(answer.silence.prompt(prompt))["base"]
        a, _ = mmau.extract_answer(ans.text)
        s, _ = mmau.extract_answer(sil.text)
        ca, cs = mmau.matched_choice(a, item["choices"]), mmau.matched_choice(s, item["choices"])
        return {"answer_audio": a, "answer_silence": s, "choice_audio": ca, "choice_silence": cs,
                "changed": None if ca is None or cs is None else ca != cs,
                "correct": mmau.string_match(item["answer"], a, item["choices"]),
                "audio_mass": np.round(ans.audio_mass.astype(np.float64), 7).tolist()}

    return Stage(records).run(items, work, desc="validate", progress=progress)


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
                            ids=[it["id"] for it in items], force=force)
    records = out / "items.jsonl"
    with locked(out):
        claim(out / "items.meta.json", run_identity(ref, data, prompt, max_tokens), extra={"model": str(ref)})
        mdl, processor = ref.get()
        headset.check(mdl.n_layers, mdl.n_heads)
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
