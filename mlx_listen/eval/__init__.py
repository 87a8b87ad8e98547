"""Evaluation: MMAU's data and official scoring (`mmau`), the conditions a run answers under
(`conditions`), the resumable `eval` run (`evaluate`), option log-prob records (`logprob`) and a
synthetic demo set (`demo_set`)."""
