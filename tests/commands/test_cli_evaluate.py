"""`mlx-listen make-demo-set` and `eval score` (`cli/evaluate.py`): the demo set the command writes,
and bad input: a bad count, a binary file, an answer key that covers only some items. (The harness
itself: tests/eval/.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
from support import invoke, ok
from support.cli import user_error

from mlx_listen.eval import mmau


def test_make_demo_set_writes_the_library_demo_set(tmp_path, demo_set):
    """`mlx-listen make-demo-set DIR`: the path it wrote on stderr, the same files as `make_demo_set`."""
    root = tmp_path / "demo"
    res = ok(invoke("make-demo-set", root))
    assert str(root / "demo.json") in res.stderr
    assert (root / "demo.json").read_bytes() == demo_set.read_bytes()
    assert len(mmau.load_items(root / "demo.json")) == len(mmau.load_items(demo_set))
    assert sorted(p.name for p in (root / "audios").iterdir()) == sorted(p.name for p in (demo_set.parent / "audios").iterdir())


def test_make_demo_set_rejects_a_bad_count(tmp_path):
    res = invoke("make-demo-set", tmp_path / "d", "--per-kind", 0)
    assert res.exit_code == 2 and "--per-kind" in res.stderr and "Traceback" not in res.output
    assert not (tmp_path / "d" / "demo.json").exists()


BINARY = {
    "random": bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
    "png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
    "gzip": b"\x1f\x8b\x08\x00" + bytes(range(256)),
    "brace-binary": b"{\xff\xfe\x00\x01" * 50,
    "bracket-nul": b"[\x00\x01\x02]",
    "nul": b"\x00" * 100,
    "utf16": '[{"id": "x"}]'.encode("utf-16"),
}


@pytest.mark.parametrize("kind", list(BINARY))
def test_eval_score_on_a_binary_file(tmp_path, kind):
    f = tmp_path / "preds.bin"
    f.write_bytes(BINARY[kind])
    user_error(invoke("eval", "score", f))
    assert f.read_bytes() == BINARY[kind]


def test_eval_score_data_says_how_many_ids_match(demo, tmp_path):
    items = demo[2]
    preds = tmp_path / "preds.json"
    preds.write_text(json.dumps([{**it, "model_output": it["answer"]} for it in items]))
    key = tmp_path / "key.json"
    key.write_text(json.dumps(items[:3]))
    res = ok(invoke("eval", "score", preds, "--data", key, "--json"))
    assert json.loads(res.stdout)["n"] == 3
    assert f"3 of {len(items)}" in res.stderr, res.stderr
    assert str(len(items) - 3) in res.stderr
