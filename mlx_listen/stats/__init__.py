"""Statistics for the head experiment: head scores with a chance reference, their stability,
matched random-head controls, and the CIs / tests the reports print. Pure numpy/scipy; it reads
no model and imports nothing from the package except `ListenError`.

Inputs are record-level arrays: `mass` (N, layers, heads) audio mass at the last prompt token,
`correct` (N,) bool, `tasks` (N,) task names, `audio_tokens` (N,) ints. Every dict returned is
strict JSON as it stands (python floats / ints / lists; `None` where a value is undefined).

API (one line each; details in the docstrings):

Head scores
- `head_scores(mass, correct, *, center="none", tasks=None, covariates=None) -> (L, H)`:
  "none" is the paper's pooled Pearson r (`heads.head_scores`: constant heads 0, all-right /
  all-wrong refused); "task" is the partial correlation given task indicators (and
  `covariates`, e.g. `length_covariates(audio_tokens, text_tokens)`): the Pearson r of the
  residuals of mass and of correctness after least squares on [task dummies, covariates].
- `length_covariates(audio_tokens, text_tokens) -> (N, 2)`: log clip length and log question
  length (text tokens of the prompt), what `--center task` partials out; `length_covariate`:
  the clip length alone.
- `weighted_head_scores(mass, correct, weights, ...) -> (B, L, H)`: the same score for B weight
  vectors at once (bootstrap counts, 0/1 halves); equals `head_scores` on the replicated rows.
- `top_k(scores, k) -> TopK(heads, r, nonpositive)`: best first, ties by (layer, head); refuses
  k > number of heads; `nonpositive` lists the chosen heads with r <= 0 so the caller can warn.
- `permutation_null(mass, correct, *, k, n_perm=200, seed=0, tasks, center, covariates) -> dict`:
  correctness shuffled within task; per-rank null quantiles of the j-th best r, the family-wise
  threshold (95th percentile of the null maximum), p per rank, max-T adjusted p per head, a set
  p for the mean top-k r, and `n_beating_null`.
- `bootstrap_stability(...) -> (L, H)`: frequency of each head in the top k over task-stratified
  bootstrap resamples; `null_stability(...) -> dict`: the same mean frequency of the top k with
  correctness shuffled within task (what the stability of heads with nothing to find looks like).
- `split_half_jaccard(...) -> dict`: Jaccard of the top k of two task-stratified random halves,
  over repeats, with the exact chance level for random k-subsets.
- `jaccard(a, b)`, `set_overlap(a, b) -> dict`: overlap of two head sets (e.g. pooled vs
  task-centred).

Random-head controls
- `matched_random_sets(heads, n_layers, n_heads, n_sets=10, seed=0, exclude=None, allow_fewer=False)`:
  sets with the same number of heads, the same number of distinct layers and the same per-layer
  head counts as `heads`; never the specialist layer set; distinct by layer set (the steering
  intervention); seeded; prefix-stable; all of them when fewer exist and `allow_fewer`.
- `count_matched_sets(...) -> int`: how many distinct layer sets such sets can read (exact).
- `compare_to_controls(specialist, controls) -> dict`: the control distribution and the
  empirical p of the specialist value within it.
- `empirical_p(observed, null) = (1 + #{null >= observed}) / (1 + n)`.

Intervals and tests
- `auc(pos, neg)`: Mann-Whitney AUC, ties count half.
- `auc_ci(pos, neg, n_boot=2000, seed=0, min_group=10) -> dict`; `mean_diff_ci(a, b, ...)`.
- `stratified_auc_ci(scores, positive, strata, ...) -> dict`: the AUC over pairs within the same
  stratum only (e.g. right answers with right answers, per task), with a bootstrap CI resampling
  within each stratum: a score that only tracks the strata (correctness) gets 0.5.
- `paired_accuracy(base_correct, treat_correct, *, tasks=None, method="score", ...) -> dict`:
  treat - base with a 95% paired CI and a p from one method (Tango's score interval and the
  McNemar score test: the CI excludes 0 exactly when p < 0.05), discordant counts, the exact
  McNemar p for reference, the minimum detectable effect, per-task rows with Holm-adjusted p.
- `paired_mean_diff(base, treat, level=0.95, min_group=10) -> dict`: mean paired difference
  (e.g. the option log-prob margin, or accuracy averaged over repeats) with its t interval and p.
- `tango_ci(b, c, n)`, `mcnemar_score_p(b, c)`, `mde(n, sd)`, `accuracy_mde(n, discordant)`.
- `wilson(correct, n)`: the Wilson interval every accuracy in every report carries.
- `mcnemar_exact(b, c)`, `newcombe_paired_ci(n11, n12, n21, n22)`, `holm(pvals)`.
- `combine_fold_p(pvals) -> dict`: per-fold p-values of one claim combined (Bonferroni for "in some
  fold", the largest for "in every fold"; both valid under any dependence between folds).
- `stratified_folds(ids, tasks, n_folds=2, seed=0) -> list[list[id]]`: disjoint folds covering
  every id once, balanced per task; independent of the input order.

Design choices
- Partial correlation by projection: residualise mass and correctness on the span of
  [task dummies, standardised covariates] (an SVD basis, so collinear covariates are harmless),
  then Pearson on the residuals. With center="none" the span is the intercept alone, which is
  plain Pearson. This is the Frisch-Waugh form of "within-task correlation, partialling out
  length"; it is one matrix product for all heads.
- The permutation null shuffles correctness within task (globally when `tasks` is None), so it
  is the null "mass carries no information about correctness beyond task composition" for either
  centering. A head that only tracks task therefore gets no credit even in pooled mode. Each
  permutation scores every head with one matrix product against the fixed mass residuals.
- Group-too-small convention (`auc_ci`, `mean_diff_ci`, `paired_accuracy`): when a group has
  fewer than `min_group` items the point estimate is still reported (it is descriptive; None
  only when a group is empty) but `ci95` is None and `too_small` is True, so a report prints
  "too small" rather than an interval.
- AUC and mean-difference CIs: percentile bootstrap, resampling the two groups separately
  (stratified), vectorised.
- Paired accuracy: Tango's score interval with the McNemar score test by default (see
  `paired.py`); `method="newcombe"` gives Newcombe's square-and-add (MOVER) interval for paired proportions (Newcombe
  1998, Stat Med 17:2635, method 10: Wilson score limits for each accuracy, combined with the
  estimated correlation phi), with phi shrunk toward 0 by n/2 when positive, as in Newcombe's
  chapter in Altman et al. "Statistics with Confidence" and Fagerland, Lydersen & Laake (2014),
  who recommend it. Closed form and deterministic; good coverage for small discordant counts,
  where a paired bootstrap degenerates (0 discordant pairs gives the bootstrap interval [0, 0]).
  `method="bootstrap"` gives the paired percentile bootstrap (items resampled as pairs) instead.
- McNemar exact: two-sided binomial test on the discordant pairs, in exact integer arithmetic;
  p = 1 when there are none (recorded beside the score test). Per-task p-values are
  Holm-adjusted (step-down, monotone).
- Matched controls: steering reads only the layers of the heads, so a control must match the
  layer profile (number of layers and heads per layer), not just the head count, and two
  controls on the same layers are one intervention. Layer sets are uniform over the distinct
  sets the profile fits into (listed when there are at most 20,000 candidates, else drawn and
  redrawn on a repeat); the profile's counts are assigned to a set's layers in random order among
  the assignments that fit; heads are then drawn uniformly within each layer, excluding
  `exclude` (default: the specialist heads). The number of distinct layer sets is counted
  exactly first (a DP over layers by capacity). With n sets the smallest reachable empirical p is
  1/(n + 1) (0.01 for 99 sets, 0.09 for 10).
"""

_API = {
    "CENTERS": "_common", "length_covariate": "_common", "Z95": "exact", "wilson": "exact",
    "mcnemar_exact": "exact", "check_heads": "controls", "compare_to_controls": "controls",
    "count_matched_sets": "controls", "empirical_p": "controls", "matched_random_sets": "controls",
    "stratified_folds": "folds", "TopK": "heads", "bootstrap_stability": "heads", "chance_jaccard": "heads",
    "head_scores": "heads", "jaccard": "heads", "permutation_null": "heads", "set_overlap": "heads",
    "split_half_jaccard": "heads", "top_k": "heads", "weighted_head_scores": "heads", "auc": "intervals",
    "auc_ci": "intervals", "mean_diff_ci": "intervals", "stratified_auc_ci": "intervals", "stratified_auc": "intervals",
    "holm": "paired", "newcombe_paired_ci": "paired", "paired_accuracy": "paired", "paired_mean_diff": "paired",
    "tango_ci": "paired", "tango_statistic": "paired", "mcnemar_score_p": "paired", "mde": "paired",
    "accuracy_mde": "paired", "combine_fold_p": "controls", "length_covariates": "_common",
    "null_stability": "heads",
}


def __getattr__(name):  # the API above, loaded on first use: `eval score` needs Wilson, not numpy
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_API)
