"""The experiment's verdict: plain sentences, each generated from the signed numbers it states (a
change is "raised" or "lowered" by its sign, never a fixed word before a signed number), so a
reader can check every sentence against the tables of report.md.

Claims and their rules:
- "beats the random sets": the specialist's own change against the baseline is significant in the
  claimed direction (p < 0.05, from the method its interval comes from) AND its empirical p among
  the matched random sets is < 0.05 (so at least 20 sets are needed: 1/21); otherwise the sentence says
  which of the two failed.
- a format (parse) effect is named when at least half of the wrong->right flips are answers that
  picked no option under the baseline and pick one under the condition.
- the heads beat the permutation null "in some fold" when the folds' set p-values combined by
  Bonferroni are < 0.05.
"""

from __future__ import annotations

from .names import BASELINE, MEAN, RANDOM_DIRECTION, SPECIALIST, ablate_name, is_random_set

MODE_WORDS = {"zero": "zero: the heads' outputs set to 0", "audio": "audio: the heads masked off the audio"}


def change(d: float | None, what: str = "accuracy", unit: str = "points", scale: float = 100.0, fmt: str = ".1f") -> str:
    """'raised accuracy by 3.6 points' / 'lowered ...' / 'left accuracy unchanged', from the sign."""
    if d is None:
        return f"left {what} undetermined"
    v = scale * d
    if float(format(abs(v), fmt)) == 0:
        return f"left {what} unchanged (to {format(0.0, fmt)} {unit})"
    return f"{'raised' if v > 0 else 'lowered'} {what} by {format(abs(v), fmt)} {unit}"


def _ci(cmp: dict | None, scale: float = 100.0, fmt: str = "+.1f") -> str:
    if not cmp or not cmp.get("ci95"):
        return "95% CI n/a: too few items"
    lo, hi = cmp["ci95"]
    return f"95% CI {format(scale * lo, fmt)} to {format(scale * hi, fmt)}"


def _p(cmp: dict | None) -> str:
    return "p n/a" if not cmp or cmp.get("p") is None else f"p = {cmp['p']:.3g}"


def significant(cmp: dict | None, sign: float = 1.0) -> bool:
    """Significant at 5% in the claimed direction (the interval and p come from one method)."""
    return bool(cmp and cmp.get("p") is not None and cmp["p"] < 0.05 and cmp.get("difference") is not None
                and sign * cmp["difference"] > 0)


def claim_against_random(own: dict | None, ctl: dict | None, sign: float, holds: str, fails: str) -> tuple[bool, str]:
    """(holds, sentence end): the claim holds when the condition's own change is significant in the
    direction `sign` and its empirical p among the random sets is below 0.05; otherwise `fails` and why."""
    if not ctl:
        return False, "no random set to compare with."
    ok_own, ok_p = significant(own, sign), ctl["empirical_p"] < 0.05
    if ok_own and ok_p:
        return True, holds
    why = []
    if not ok_own:
        why.append(f"its own change is not significant in that direction ({_p(own)})")
    if not ok_p:
        why.append(f"its empirical p among the random sets is {ctl['empirical_p']:.3g}, not below 0.05"
                   + (f" (the smallest {ctl['n']} sets allow is {ctl['min_possible_p']:.3g})"
                      if ctl["min_possible_p"] >= 0.05 else ""))
    return False, f"{fails}: " + "; ".join(why) + "."


def format_effect(fp: dict | None) -> bool:
    """At least half of the wrong->right flips are answers that picked no option and now pick one."""
    return bool(fp and fp["wrong_to_right"] and fp["wrong_to_right_from_unparsable"] / fp["wrong_to_right"] >= 0.5)


def steering_claim(conditions: dict, controls: dict, endpoint: str = "accuracy") -> bool:
    """Whether "the specialist heads beat the random sets" may be said on `endpoint` (accuracy or margin)."""
    own = conditions[SPECIALIST].get("vs_baseline" if endpoint == "accuracy" else "margin_vs_baseline")
    return claim_against_random(own, (controls.get("steering") or {}).get(endpoint), 1.0, "", "")[0]


def claims(r: dict) -> dict:
    """Every claim the verdict makes or withholds, as booleans (report.json `claims`)."""
    c, ctl, s = r["conditions"], r["controls"], r["settings"]
    comb = r["heads_null"]["combined"]
    out = {"steering_significant": significant(c[SPECIALIST].get("vs_baseline")),
           "steering_beats_random": steering_claim(c, ctl, "accuracy"),
           "margin_significant": significant(c[SPECIALIST].get("margin_vs_baseline")),
           "margin_beats_random": steering_claim(c, ctl, "margin"),
           "format_effect": format_effect(c[SPECIALIST].get("flips_by_parse")),
           "validation_passes": bool(r["validation"].get("passes")),
           "heads_beat_null_in_some_fold": comb["some"] is not None and comb["some"] < 0.05}
    for mode in s["ablate_modes"] if s["ablate"] else []:
        own = c[ablate_name(mode, SPECIALIST)].get("vs_baseline")
        out[f"ablation_beats_random:{mode}"] = claim_against_random(
            own, (ctl.get(f"ablation:{mode}") or {}).get("accuracy"), -1.0, "", "")[0]
    return out


def verdict(r: dict) -> list[str]:
    """Plain sentences a reader can check against the tables."""
    if not r["n_tested"]:
        return ["No item could be tested."]
    s, c, ctl = r["settings"], r["conditions"], r["controls"]
    spec = c[SPECIALIST]
    vb, mv = spec.get("vs_baseline"), spec.get("margin_vs_baseline")
    split = (f"averaged over {s['repeats']} fold splits (seeds {s['seed']}..{s['seed'] + s['repeats'] - 1})"
             if s["repeats"] > 1 else
             f"conditional on one split of the items into folds (seed {s['seed']}; --repeats averages over splits)")
    lines = [f"Specialist steering {change(vb['difference'])} ({100 * vb['difference']:+.1f} points, {_ci(vb)}, "
             f"{_p(vb)}) on {spec['n']} held-out items; the interval is {split}."]
    if mv and mv.get("difference") is not None:
        lines.append(f"Primary graded endpoint, the correct option's log-prob margin (it does not depend on the answer's "
                     f"format): specialist steering {change(mv['difference'], 'it', 'nats', 1.0, '.3f')} "
                     f"({mv['difference']:+.3f}, {_ci(mv, 1.0, '+.3f')}, {_p(mv)}).")
    lines += _random_set_lines(r)
    rd = ctl.get("random_direction")
    if RANDOM_DIRECTION in c and c[RANDOM_DIRECTION].get("vs_baseline"):
        d = c[RANDOM_DIRECTION]["vs_baseline"]
        lines.append(f"A random direction at the norm of each item's own direction {change(d['difference'])} "
                     f"({_ci(d)}, {_p(d)})" + (f"; specialist minus it {100 * rd['difference']:+.1f} points "
                                               f"({_ci(rd)}, {_p(rd)})." if rd and rd.get("difference") is not None
                                               else "."))
    if c[MEAN].get("vs_baseline"):
        d = c[MEAN]["vs_baseline"]
        lines.append(f"The dataset-mean vector {change(d['difference'])} ({_ci(d)}, {_p(d)}).")
    lines += _parse_lines(r)
    lines += _null_lines(r)
    lines += _ablation_lines(r)
    lines.append(r["validation"]["verdict"])
    lines.append(_power_line(r))
    return lines


def _random_set_lines(r: dict) -> list[str]:
    s, c = r["settings"], r["conditions"]
    st = r["controls"].get("steering") or {}
    if not st.get("accuracy"):
        return []
    vb, mv = c[SPECIALIST].get("vs_baseline"), c[SPECIALIST].get("margin_vs_baseline")
    a, vm = st["accuracy"], st.get("accuracy_vs_mean_random")
    n_sets = (f"{a['n']} matched random head sets on distinct layer sets"
              + (f" (all that exist for a fold's layer profile; {s['random_sets']} were asked for)"
                 if a["n"] < s["random_sets"] else ""))
    _, end = claim_against_random(vb, a, 1.0, "on accuracy, the specialist heads beat the random sets.",
                                  "on accuracy, the specialist heads are not shown to beat the random sets")
    line = (f"Against {n_sets}, which {change(a['mean'])} on average (range {100 * a['min']:+.1f} to "
            f"{100 * a['max']:+.1f} points), the specialist gain's empirical p is {a['empirical_p']:.3g}")
    if vm and vm.get("difference") is not None:
        line += f"; specialist minus the random sets' mean {100 * vm['difference']:+.1f} points ({_ci(vm)}, {_p(vm)})"
    lines = [line + ": " + end]
    if st.get("margin"):
        _, end_m = claim_against_random(mv, st["margin"], 1.0, "on the margin, the specialist heads beat the random "
                                        "sets.", "on the margin, the specialist heads are not shown to beat the random "
                                        "sets")
        mm = st.get("margin_vs_mean_random")
        lines.append(f"On the margin the specialist's empirical p among the random sets is "
                     f"{st['margin']['empirical_p']:.3g}"
                     + (f"; specialist minus their mean {mm['difference']:+.3f} nats ({_ci(mm, 1.0, '+.3f')}, "
                        f"{_p(mm)})" if mm and mm.get("difference") is not None else "") + ": " + end_m)
    return lines


def _parse_lines(r: dict) -> list[str]:
    c = r["conditions"]
    rates = [(n, c[n]["parse"]["option"]) for n in (BASELINE, SPECIALIST, MEAN, RANDOM_DIRECTION) if n in c]
    rand = [v["parse"]["option"] for n, v in c.items() if is_random_set(n) and v["parse"]["option"] is not None]
    text = ", ".join(f"{n} {100 * v:.1f}%" for n, v in rates if v is not None)
    if rand:
        text += f", random sets {100 * sum(rand) / len(rand):.1f}% on average"
    lines = [f"Answers that pick an option (parse rate): {text}."]
    fp = c[SPECIALIST].get("flips_by_parse")
    if fp and fp["wrong_to_right"]:
        share = fp["wrong_to_right_from_unparsable"] / fp["wrong_to_right"]
        among = fp["among_parsable"]
        line = (f"Of the specialist's {fp['wrong_to_right']} wrong→right flips, {fp['wrong_to_right_from_unparsable']} "
                f"were baseline answers that picked no option; of its {fp['right_to_wrong']} right→wrong flips, "
                f"{fp['right_to_wrong_to_unparsable']} became answers that pick none")
        if among:
            line += (f"; among the {among['n']} items whose answers pick an option under both, it "
                     f"{change(among['difference'])} ({_ci(among)}, {_p(among)})")
        if format_effect(fp):
            line += (f": {100 * share:.0f}% of the wrong→right flips are answers that now parse — a format (parse) "
                     "effect, not evidence that the model listens more.")
        else:
            line += "."
        lines.append(line)
    return lines


def _null_lines(r: dict) -> list[str]:
    hn, s = r["heads_null"], r["settings"]
    comb = hn["combined"]
    per = ", ".join(str(b) for b in hn["n_beating_null"])
    ps = ", ".join(f"{p:.3g}" for p in hn["p_set"])
    if comb["some"] is None:
        claim = "no fold has a permutation p."
    elif comb["some"] < 0.05:
        claim = (f"combined over the {comb['m']} folds the head set beats the null in at least one fold (Bonferroni "
                 f"p = {comb['some']:.3g}); in every fold p = {comb['every']:.3g}.")
    else:
        claim = (f"combined over the {comb['m']} folds no fold's head set is shown to beat the null (Bonferroni "
                 f"p = {comb['some']:.3g}).")
    none = " — no head beats the null." if not any(hn["n_beating_null"]) else ""
    lines = [f"Permutation null (correctness shuffled within task; center {s['center']}): heads above its family-wise "
             f"5% threshold per fold {per}{none}; the head set's p per fold {ps}; " + claim]
    lines.append("Bootstrap stability of the heads (mean frequency in the top k) per fold "
                 + ", ".join(f"{x:.2f}" for x in hn["stability"]) + "; with correctness shuffled (nothing to find) "
                 + ", ".join(f"{x:.2f}" for x in hn["stability_null"]) + ".")
    return lines


def _ablation_lines(r: dict) -> list[str]:
    s, c, ctl = r["settings"], r["conditions"], r["controls"]
    if not s["ablate"]:
        return []
    lines = []
    for mode in s["ablate_modes"]:
        name = ablate_name(mode, SPECIALIST)
        d = c[name].get("vs_baseline")
        a = (ctl.get(f"ablation:{mode}") or {}).get("accuracy")
        words = MODE_WORDS.get(mode, f"{mode}: the heads' outputs scaled by {mode.split(':')[-1]}")
        line = f"Ablating the specialist heads ({words}) {change(d and d['difference'])} ({_ci(d)}, {_p(d)})"
        if a:
            _, end = claim_against_random(d, a, -1.0, "ablating the specialist heads hurts more than ablating random "
                                          "heads.", "it is not shown to hurt more than the random ablations")
            line += (f"; {a['n']} matched random ablations {change(-a['mean'])} on average, the specialist's drop has "
                     f"empirical p {a['empirical_p']:.3g} among theirs: " + end)
        else:
            line += "."
        lines.append(line)
    return lines


def _power_line(r: dict) -> str:
    p = r["power"]
    if not p.get("accuracy_mde"):
        return "Power: too few items or no discordant answers to estimate the smallest detectable effect."
    disc = f" and {100 * p['discordant_share']:.1f}% discordant answers" if p.get("discordant_share") is not None else ""
    line = (f"Power: with n = {p['n']} held-out items{disc}, a true accuracy change of ±{100 * p['accuracy_mde']:.1f} "
            f"points would be detected 80% of the time (two-sided 5%)")
    per = p.get("accuracy_mde_per_task") or {}
    if per:
        line += "; per task " + ", ".join(f"{t} (n = {p['n_per_task'][t]}) ±{100 * v:.1f}" for t, v in per.items())
    if p.get("margin_mde"):
        line += f"; on the margin ±{p['margin_mde']:.3f} nats"
    return line + ". Smaller true effects can go undetected; a non-significant result is not evidence of no effect."
