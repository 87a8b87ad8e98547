"""Numeric comparisons shared by the parity tests (MLX against the PyTorch reference)."""

from __future__ import annotations

import numpy as np

TOL = 1e-4


def assert_close(a, b, atol, what):
    """Max absolute error of `a` against `b` within `atol` (returns the error)."""
    err = float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())
    assert err <= atol, f"{what}: max abs error {err:.3g} > {atol:g}"
    return err


def close(got, want, tol=TOL):
    """Same shape, max error within `tol` relative to the larger of 1 and max |want|."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    err = np.abs(got - want).max() if got.size else 0.0
    assert err <= tol * max(1.0, np.abs(want).max()), f"max error {err:.3g}"
    return err


def close_lists(got, want, tol=TOL):
    """Two (nested) lists of numbers or None: None in the same places, numbers close."""
    g, w = np.array(got, dtype=object), np.array(want, dtype=object)
    assert g.shape == w.shape
    for a, b in zip(g.ravel(), w.ravel()):
        assert (a is None) == (b is None), (got, want)
        if a is not None:
            assert abs(a - b) <= tol * max(1.0, abs(b)), (got, want)
