"""Helpers of the head tests (`heads`, `validate-heads`, `attention`, `ask --listen`).

The tiny model answers gibberish, so correctness is made non-trivial by patching
`mmau.string_match` (the heads module calls it through `mmau`): with `parity`, an item is right
iff its answer sits at an even choice position, which the demo set balances (accuracy exactly 50%).
"""

from __future__ import annotations

import json
from pathlib import Path

from mlx_listen.eval.conditions import Answerer

MAX_TOKENS = 4
N_DEMO = 28  # make_demo_set's default: 7 kinds x 4
K = 3
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUESTION = "What does the audio contain?"


def parity(answer, prediction, choices) -> bool:
    """Correctness by the answer's position: both outcomes on the demo set (heads needs both)."""
    return list(choices).index(answer) % 2 == 0


class Counter:
    """Wraps `Answerer.respond`, recording each answer's audio mass (the model's work)."""

    def __init__(self, mp):
        self.masses = []
        real = Answerer.respond

        def wrapped(answerer, *a, **kw):
            out = real(answerer, *a, **kw)
            self.masses.append(out["base"].answer.audio_mass)
            return out

        mp.setattr(Answerer, "respond", wrapped)

    @property
    def n(self):
        return len(self.masses)


def heads_args(demo, model, out, *extra):
    """`mlx-listen heads` on the demo set: MAX_TOKENS tokens per answer, the K best heads."""
    root, data, _ = demo
    return ["heads", "--model", model, "--data", data, "--audio-dir", root, "--out", out,
            "--max-tokens", MAX_TOKENS, "--k", K, *extra]


def one_line_error(result) -> str:
    assert result.exit_code == 1, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    err = result.stderr.strip().splitlines()[-1]  # a progress bar may come first
    assert err.startswith("Error: ") and "Traceback" not in result.output, result.output
    assert result.stdout == ""
    return err


def assert_png(path: Path):
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert data[12:16] == b"IHDR"
    w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert w > 100 and h > 100 and len(data) > 1000, (path, w, h, len(data))


def strict_json(path: Path):
    """Parse as strict JSON: NaN / Infinity are not JSON."""
    def bad(c):
        raise AssertionError(f"{path} holds {c}, which is not JSON")

    return json.loads(Path(path).read_text(), parse_constant=bad)


def rows_of(path: Path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines()]
