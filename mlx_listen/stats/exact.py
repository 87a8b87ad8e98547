"""The two statistics every accuracy table prints, in plain Python (no numpy: scoring a run starts
fast): the Wilson interval and the exact McNemar test."""

from __future__ import annotations

import math
from math import comb

Z95 = 1.959963984540054  # the two-sided 95% normal quantile


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p: the binomial(b + c, 1/2) tail of the discordant pairs, doubled, in
    exact integer arithmetic; 1 when b + c = 0."""
    n = int(b) + int(c)
    if n == 0:
        return 1.0
    tail = sum(comb(n, k) for k in range(min(int(b), int(c)) + 1))
    return min(1.0, 2 * tail / 2**n)


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion (95% by default); (0, 1) when there is no data, and
    exactly 0 / 1 at 0/n and n/n."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (0.0 if correct == 0 else max(0.0, centre - half)), (1.0 if correct == n else min(1.0, centre + half))
