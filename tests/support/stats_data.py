"""Simulated head-experiment records with a known truth (`tests/stats/`): no signal, planted heads,
heads that only track clip length; and paired right/wrong tables."""

from __future__ import annotations

import numpy as np

TASKS = np.array(["music", "sound", "speech"])


def null_data(seed: int, n: int = 300, layers: int = 8, heads: int = 16, p_right: float = 0.5, tasks: bool = True):
    """Mass independent of correctness: no head carries a signal."""
    rng = np.random.default_rng(seed)
    mass = 0.1 + 0.02 * rng.standard_normal((n, layers, heads))
    correct = rng.random(n) < p_right
    t = rng.choice(TASKS, n) if tasks else None
    return mass, correct, t


def planted_data(seed: int, n: int = 400, layers: int = 16, heads: int = 16):
    """Four heads whose mass rises with correctness (population r about 0.35-0.55); the rest noise."""
    rng = np.random.default_rng(seed)
    mass = 0.1 + 0.02 * rng.standard_normal((n, layers, heads))
    correct = rng.random(n) < 0.5
    tasks = rng.choice(TASKS, n)
    planted = [(2, 5), (7, 1), (7, 9), (13, 14)]
    for (l, h), d in zip(planted, (0.015, 0.018, 0.022, 0.026)):
        mass[:, l, h] += d * correct
    return mass, correct, tasks, planted


def confounded_data(seed: int, n: int = 900, layers: int = 16, heads: int = 16):
    """Accuracy depends on task and (within task) on clip length; 10 heads only track clip length,
    3 heads carry a real correctness signal within task."""
    rng = np.random.default_rng(seed)
    code = np.repeat(np.arange(3), n // 3)
    tasks = TASKS[code]
    mu = np.array([5.0, 5.6, 6.2])[code]  # tasks differ in typical length
    audio_tokens = np.round(np.exp(mu + 0.35 * rng.standard_normal(n))).astype(int)
    loglen = np.log(audio_tokens)
    logit = np.array([1.2, 0.0, -1.0])[code] - 1.5 * (loglen - mu)  # longer clip: harder, in every task
    correct = rng.random(n) < 1 / (1 + np.exp(-logit))
    mass = 0.1 + 0.02 * rng.standard_normal((n, layers, heads))
    fits = lambda hs: [(l, h) for l, h in hs if l < layers and h < heads]  # noqa: E731 (small test shapes)
    confounded = fits([(l, h) for l in range(2, 12, 2) for h in (1, 5)])
    true = fits([(3, 3), (7, 0), (13, 9)])
    for l, h in confounded:  # linear in log length, plus a little noise: nothing about correctness
        mass[:, l, h] = 0.2 - 0.04 * (loglen - 5.6) + 0.005 * rng.standard_normal(n)
    for l, h in true:
        mass[:, l, h] += 0.012 * correct
    return mass, correct, tasks, audio_tokens, confounded, true


def pairs(n11, n12, n21, n22):
    """base / treat flags for a paired table: n11 both right, n12 treat right & base wrong,
    n21 treat wrong & base right, n22 both wrong."""
    treat = np.array([1] * n11 + [1] * n12 + [0] * n21 + [0] * n22, bool)
    base = np.array([1] * n11 + [0] * n12 + [1] * n21 + [0] * n22, bool)
    return base, treat
