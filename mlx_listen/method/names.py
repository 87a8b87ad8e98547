"""The experiment's condition names: one definition, read by the protocol, the report and the verdict."""

from __future__ import annotations

BASELINE, SPECIALIST, MEAN, RANDOM_DIRECTION = "baseline", "specialist", "mean-vector", "random-direction"


def random_name(i: int) -> str:
    return f"random-{i + 1}"


def is_random_set(name: str) -> bool:
    """A matched random head set's steering condition (`random-3`; not `random-direction`)."""
    return name.startswith("random-") and name[7:].isdigit()


def tuned(name: str, alpha: float) -> str:
    return f"{name}@{alpha:g}"


def ablate_name(mode: str, name: str) -> str:
    return f"ablate-{mode.replace(':', '')}-{name}"
