"""Activation-patching maps, audio -> silence: one item's patch record, and a run over one clip or a
data set (resumable), averaged into layer x group and layer x head maps with PNGs and a summary.

The mechanism is `interp.patching`; this module chooses what is measured. The metric:

A free-form answer's first token says little (R1-AQA's answers all start with `<answer>`),
so a run is scored on two whole answer continuations, teacher-forced after the prompt:

    m = log p(a) - log p(b)       (summed over each continuation's tokens, float32)

`a` is what the audio run answers, `b` what the silence run answers. With answer options (MMAU
items): the option with the highest log-probability under the audio run and under the silence
run (when both prefer the same one, `b` is the audio run's best other option); each option is
scored as its continuation text (`presets.continuation`: `<answer>{choice}</answer>` for the
R1-AQA presets, the choice itself for `mmau`; tokenised by `interp.scoring.option_ids`). Without options: the first `tokens` greedy tokens of each
run (with the end-of-answer token when an answer ends sooner). With `first_diff`, a and b are cut
after their first differing token: m is then that token's log-odds (the shared prefix
teacher-forced), every patch reaches it, and the heads cost about a third. A patch's restored fraction is `(m_patched - m_silence) / (m_audio - m_silence)`: 0 is the
silence run, 1 the audio run. When `|m_audio - m_silence|` is below `min_gap` the item is flagged
(raw m kept, no fraction averaged): the audio barely moves the answer there.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import presets
from ..errors import ListenError, ListenWarning
from ..eval import mmau
from ..headset import HeadSet
from ..identity import check_binding
from ..interp.patching import GROUPS, HEAD_AT, METRIC, Patch, Patcher, position_groups, shared_prefix, standard_patches
from ..interp.scoring import option_ids
from ..interp.steering import Silence
from ..load import ModelRef
from ..plots import heatmap
from ..prompt import Prompt, as_features, prepare
from ..records import Stage, claim, file_sha256, locked, write_json

# -- one item -------------------------------------------------------------------------------------

@dataclass
class PatchConfig:
    """Every option of the patching pass (recorded with its results)."""

    groups: tuple[str, ...] = GROUPS
    head_at: str = "last"
    tokens: int = 8  # without answer options: greedy tokens compared
    min_gap: float = 0.5  # |m_audio - m_silence| below this (nats): flagged, not averaged
    first_diff: bool = False  # score a and b only up to their first differing token (cheaper; see the docstring)
    preset: str = presets.DEFAULT_PRESET  # how an option is written as a continuation
    max_rows: int = 32

    def validate(self):
        bad = [g for g in self.groups if g not in GROUPS]
        if bad or not self.groups:
            raise ListenError(f"position groups must be among {', '.join(GROUPS)}, not {', '.join(bad) or '(none)'}")
        if self.head_at not in HEAD_AT:
            raise ListenError(f"heads are patched at one of {', '.join(HEAD_AT)}, not {self.head_at!r}")
        if self.tokens < 1 or self.max_rows < 1 or not np.isfinite(self.min_gap) or self.min_gap < 0:
            raise ListenError("tokens and max_rows must be positive, min_gap a finite number >= 0")
        presets.canonical(self.preset)

    def to_json(self) -> dict:
        return {**self.__dict__, "groups": list(self.groups), "metric": METRIC}


def choose(lp_audio: np.ndarray, lp_silence: np.ndarray, seqs: Sequence[Sequence[int]]) -> tuple[int, int]:
    """(a, b): the audio run's best option and the silence run's best, or, when they agree, the
    audio run's best option with other tokens."""
    a = int(np.argmax(lp_audio))
    order = [int(i) for i in np.argsort(-lp_silence, kind="stable")]
    b = order[0]
    if list(seqs[b]) == list(seqs[a]):
        others = [int(i) for i in np.argsort(-lp_audio, kind="stable") if list(seqs[i]) != list(seqs[a])]
        if not others:
            raise ListenError("every answer option is written with the same tokens: nothing to tell apart")
        b = others[0]
    return a, b


def patch_prompt(model, processor, prompt: Prompt, *, choices: Sequence[str] | None = None,
                 config: PatchConfig | None = None, silence=None) -> dict:
    """Patch one prompt (audio) into its silence twin: every group x layer and every head. Returns
    a JSON-able record: the continuations, m_audio / m_silence, per patch the raw m and the
    restored fraction (None when the item is flagged)."""

    cfg = config or PatchConfig()
    cfg.validate()
    silence = silence or Silence(model)
    tic = time.perf_counter()
    patcher = Patcher(model, prompt, silence.prompt(prompt), max_rows=cfg.max_rows)
    rec: dict = {"audio_tokens": prompt.n_audio_tokens, "prompt_tokens": len(prompt.ids)}
    if choices is not None:
        if len(choices) < 2:
            raise ListenError("patching needs at least two answer options to compare")
        texts = [presets.continuation(cfg.preset, c) for c in choices]
        seqs = option_ids(processor, prompt, choices, cfg.preset)
        lp_a, lp_s = patcher.score(seqs)
        ia, ib = choose(lp_a, lp_s, seqs)
        a, b = seqs[ia], seqs[ib]
        rec.update(choice_audio=ia, choice_silence=int(np.argmax(lp_s)), choice_b=ib,
                   option_logp_audio=_round(lp_a), option_logp_silence=_round(lp_s))
        text_a, text_b = texts[ia], texts[ib]
    else:
        a, b = patcher.greedy(processor, cfg.tokens)
        if a == b:
            raise ListenError(f"the audio and silence runs give the same first {cfg.tokens} answer tokens "
                              f"({processor.decode(a)!r}): nothing for patching to restore")
        text_a, text_b = processor.decode(a), processor.decode(b)
    j = shared_prefix([a, b])
    if cfg.first_diff:  # the shared prefix and the first token where they differ
        a, b = a[:j + 1], b[:j + 1]
    groups = position_groups(prompt, j)
    L, H = model.n_layers, model.n_heads
    patches = standard_patches(L, H, groups, cfg.groups, cfg.head_at)
    res = patcher.measure([a, b], patches)
    m = res.m
    gap = res.m_source - res.m_target
    flagged = abs(gap) < cfg.min_gap
    restored = None if flagged else (m - res.m_target) / gap
    by_group, by_head = _arrange(patches, m, L, H, cfg.groups)
    rec.update({
        "a": text_a, "b": text_b, "a_tokens": list(a), "b_tokens": list(b), "shared_prefix_tokens": res.prefix,
        "suffix_logp_audio": _round(res.logp_source), "suffix_logp_silence": _round(res.logp_target),
        "m_audio": round(res.m_source, 6), "m_silence": round(res.m_target, 6), "gap": round(gap, 6),
        "flagged": f"|m_audio - m_silence| = {abs(gap):.3g} < min_gap {cfg.min_gap:g}" if flagged else None,
        "groups": {g: len(groups[g]) for g in cfg.groups},
        "m_groups": {g: _round(v) for g, v in by_group.items()}, "m_heads": _round(by_head),
    })
    if restored is not None:
        rg, rh = _arrange(patches, restored, L, H, cfg.groups)
        rec.update(restored_groups={g: _round(v) for g, v in rg.items()}, restored_heads=_round(rh))
    rec["seconds"] = {**{k: round(v, 4) for k, v in {**patcher.seconds, **res.seconds}.items()},
                      "total": round(time.perf_counter() - tic, 4)}
    return rec


def _arrange(patches: list[Patch], values: np.ndarray, L: int, H: int, groups: Sequence[str]):
    """(per group: value per layer, NaN where the group is empty), (layers x heads)."""
    by_group = {g: np.full(L, np.nan) for g in groups}
    by_head = np.full((L, H), np.nan)
    for p, v in zip(patches, values):
        if p.head is None:
            by_group[p.label][p.layer] = v
        else:
            by_head[p.layer, p.head] = v
    return by_group, by_head


def _round(x, nd: int = 6):
    a = np.asarray(x, np.float64)
    if a.ndim == 0:
        return None if not np.isfinite(a) else round(float(a), nd)
    return [_round(v, nd) for v in a]


# -- a run: one clip, or a data set ----------------------------------------------------------------

RECORDS, META, SUMMARY = "items.jsonl", "items.meta.json", "patch.json"
GROUPS_PNG, HEADS_PNG = "patch.groups.png", "patch.heads.png"


def summarize(rows: list[dict], config: PatchConfig, n_layers: int, n_heads: int) -> dict:
    """Averages over the usable items (not failed, not flagged): restored fraction per layer and
    group, per layer and head, overall and per task, with their standard errors and counts."""
    used = [r for r in rows if "error" not in r and not r.get("flagged")]
    skipped = [{"id": r["id"], "reason": r.get("error") or r["flagged"]} for r in rows
               if "error" in r or r.get("flagged")]

    def block(rs: list[dict]) -> dict:
        if not rs:
            return {"n": 0}
        g = np.array([[[np.nan if v is None else v for v in r["restored_groups"][name]] for name in config.groups]
                      for r in rs], np.float64)  # (n, G, L)
        h = np.array([[[np.nan if v is None else v for v in row] for row in r["restored_heads"]] for r in rs],
                     np.float64)  # (n, L, H)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an empty group is NaN throughout
            gm, hm = np.nanmean(g, 0), np.nanmean(h, 0)
            gse = np.nanstd(g, 0, ddof=1) / np.sqrt(len(rs)) if len(rs) > 1 else np.full_like(gm, np.nan)
            hse = np.nanstd(h, 0, ddof=1) / np.sqrt(len(rs)) if len(rs) > 1 else np.full_like(hm, np.nan)
        order = sorted(((-hm[l, k], l, k) for l in range(n_layers) for k in range(n_heads) if np.isfinite(hm[l, k])))
        best = {name: (int(np.nanargmax(gm[i])) if np.isfinite(gm[i]).any() else None)
                for i, name in enumerate(config.groups)}
        return {
            "n": len(rs),
            "restored_groups": {name: _round(gm[i]) for i, name in enumerate(config.groups)},
            "restored_groups_se": {name: _round(gse[i]) for i, name in enumerate(config.groups)},
            "restored_heads": _round(hm), "restored_heads_se": _round(hse),
            "best_layer": best,
            "top_heads": [{"layer": l, "head": k, "restored": _round(-v)} for v, l, k in order[:10]],
            "mean_gap": _round(np.mean([r["gap"] for r in rs])),
        }

    tasks = sorted({r.get("task") for r in used if r.get("task")})
    return {
        "metric": METRIC, "config": config.to_json(), "layers": n_layers, "heads": n_heads,
        "n_items": len(rows), "n_used": len(used), "n_skipped": len(skipped), "skipped": skipped,
        **block(used), "tasks": {t: block([r for r in used if r.get("task") == t]) for t in tasks},
    }


def plot(summary: dict, out: Path, config: PatchConfig, marked: Sequence[tuple[int, int]] = ()) -> list[Path]:
    """The layer x group and layer x head maps of a summary (nothing when no item was usable)."""

    if not summary.get("n"):
        return []
    L = summary["layers"]
    n = summary["n"]
    what = f"mean of {n} items" if n > 1 else "one item"
    names = [g for g in config.groups if any(v is not None for v in summary["restored_groups"][g])]  # e.g. no prefix
    g = np.array([[np.nan if v is None else v for v in summary["restored_groups"][name]] for name in names]).T
    h = np.array([[np.nan if v is None else v for v in row] for row in summary["restored_heads"]])
    paths = [Path(out) / GROUPS_PNG, Path(out) / HEADS_PNG]
    heatmap(g, paths[0], f"Audio restored by patching block outputs into the silence run ({what})",
            "restored fraction", center=True, xlabel="position group", xticklabels=names,
            yticklabels=[str(l) for l in range(L)] if L <= 40 else None, annotate=L * len(names) <= 400)
    at = "T" if config.head_at == "last" else "T and the answer prefix"
    heatmap(h, paths[1], f"Audio restored by patching one head's output at {at} ({what})"
            + ("; specialist heads boxed" if marked else ""), "restored fraction", marked=marked, center=True)
    return paths


def patch_run(model, out, *, clip=None, question: str | None = None, system: str | None = None,
              name: str | None = None, data=None, audio_dir=None, tasks: Sequence[str] = mmau.TASKS,
              limit: int | None = None, config: PatchConfig | None = None, heads: HeadSet | None = None,
              force: bool = False, progress: bool = True) -> dict:
    """`mlx-listen patch`: one clip (a path, a 16 kHz array or `AudioFeatures`; `name` for the
    record, default the path) and question, or a data set (`data`, MMAU-format, its audio under
    `audio_dir`; `tasks`, `limit`), resumable: one fsync'd record per item in OUT/items.jsonl (an
    item that cannot be used is recorded with its `error`), a rerun of the same model and data
    skips what is done. Writes OUT/patch.json (the summary, and the item itself for one clip) and
    the two maps (patch.groups.png, patch.heads.png; `heads`, e.g. the specialist heads, boxed; a
    head set found on another model or prompt is refused unless `force`, then recorded).
    `model`: a folder, repo id or loaded pair (`load.ModelRef`); inputs are checked before it loads.
    Returns the summary."""
    cfg = config or PatchConfig()
    cfg.validate()
    out, ref = Path(out), ModelRef.of(model)
    if (data is None) == (clip is None):
        raise ListenError("patch one CLIP and QUESTION, or a data set (--data with --audio-dir), not both")
    if clip is not None:
        if not question:
            raise ListenError("give the QUESTION to ask about the clip")
        name = name or (str(clip) if isinstance(clip, (str, Path)) else "clip")
        clip = as_features(clip, front=ref.front_end)  # bad audio fails before the model loads
    else:
        if audio_dir is None:
            raise ListenError("a data set needs --audio-dir (the folder its audio_id paths are relative to)")
        items = [it for it in mmau.load_items(data) if it["task"] in tasks][:limit]
        if not items:
            raise ListenError(f"no items in {data} for tasks {', '.join(tasks)}")
        identity = {"model_fingerprint": ref.fingerprint(), "data_sha256": file_sha256(data)}
    marked = list(heads.heads) if heads is not None else []
    if heads is not None:  # the head set against the model's config, and its prompt, before any work
        heads.check(*ref.shape)
        found = check_binding(heads.meta or {}, str(heads.path or "the head set"), force=force,
                              prompt=cfg.preset if clip is None else None, family=ref.family)
    with locked(out):
        mdl, processor = ref.get()
        if heads is not None:
            found += check_binding(heads.meta or {}, str(heads.path or "the head set"), model=mdl, force=force)
            for w in found:
                warnings.warn(w, ListenWarning, stacklevel=2)
        L, H = mdl.n_layers, mdl.n_heads
        if clip is not None:
            prompt = prepare(mdl, processor, [clip], question, system)
            rec = {"id": name, "question": question, **patch_prompt(mdl, processor, prompt, config=cfg)}
            if rec["flagged"]:
                warnings.warn(f"the audio barely changes the answer ({rec['flagged']}): no restored fraction",
                              ListenWarning, stacklevel=2)
            rows = [rec]
        else:
            settings = {k: v for k, v in cfg.to_json().items() if k != "max_rows"}  # memory only: any value resumes
            claim(out / META, {**identity, "config": settings})
            silence = Silence(mdl)

            def work(item):
                prompt = prepare(mdl, processor, [Path(audio_dir) / item["audio_id"]],
                                 presets.build_prompt(item, cfg.preset))
                row = patch_prompt(mdl, processor, prompt, choices=item["choices"], config=cfg, silence=silence)
                row["answer_is_a"] = item.get("answer", "").strip() == item["choices"][row["choice_audio"]].strip()
                return row

            rows = Stage(out / RECORDS).run(items, work, desc="patch", progress=progress)
        summary = summarize(rows, cfg, L, H)
        if clip is not None:
            summary["item"] = rows[0]
        summary["files"] = [p.name for p in plot(summary, out, cfg, marked)]
        if heads is not None and found:
            summary["warnings"] = found
        write_json(out / SUMMARY, summary)
    return summary


def patch_lines(summary: dict, marked: Sequence[tuple[int, int]] = ()) -> list[str]:
    """What `mlx-listen patch` prints: the items, where each group restores most, the top heads and,
    given `marked` heads (the specialist heads), how much they restore."""
    def f(v, spec="+.3f"):
        return "n/a" if v is None else format(v, spec)

    out = []
    item = summary.get("item")
    if item is not None:
        out.append(f"a (audio): {item['a']!r}  b (silence): {item['b']!r}")
        out.append(f"m_audio {item['m_audio']:+.3f}, m_silence {item['m_silence']:+.3f} (log p(a) - log p(b), nats)")
    else:
        n = summary["n_items"]
        out.append(f"{n} item{'s' if n != 1 else ''}: {summary['n_used']} used, {summary['n_skipped']} skipped"
                   + (f" (e.g. {summary['skipped'][0]['id']}: {summary['skipped'][0]['reason']})"
                      if summary["skipped"] else ""))
    if not summary.get("n"):
        out.append("no restored fractions: no usable item (see skipped / flagged)")
        return out
    for g, layer in summary["best_layer"].items():
        if layer is not None:
            out.append(f"{g:>7}: most restored at layer {layer:>2} ({f(summary['restored_groups'][g][layer])})")
    tops = ", ".join(f"{t['layer']}.{t['head']} {f(t['restored'])}" for t in summary["top_heads"][:5])
    out.append(f"top heads (layer.head restored): {tops}")
    if marked:
        hm = np.array([[np.nan if v is None else v for v in row] for row in summary["restored_heads"]])
        vals = np.array([hm[l, h] for l, h in marked])
        rank = np.argsort(np.argsort(-np.nan_to_num(hm.ravel(), nan=-np.inf)))
        ranks = sorted(int(rank[l * hm.shape[1] + h]) + 1 for l, h in marked)
        out.append(f"specialist heads ({len(marked)}): mean restored {f(float(np.nanmean(vals)))}, "
                   f"best rank {ranks[0]} of {hm.size}, layers {sorted({l for l, _ in marked})}")
    return out
