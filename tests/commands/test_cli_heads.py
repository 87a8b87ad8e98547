"""`mlx-listen heads` (`cli/heads.py`) on a `--k` above the model's number of heads. (The method
itself: tests/method/test_method_heads.py.)"""

from __future__ import annotations

import json

from support import invoke, ok
from support.cli import data_args, warnings_of
from support.heads import parity

from mlx_listen.eval import mmau


def test_k_over_the_number_of_heads_is_not_silent(demo, M, tmp_path, monkeypatch):
    monkeypatch.setattr(mmau, "string_match", parity)
    out = tmp_path / "HEADS.json"
    res = invoke("heads", *data_args(demo, M), "--limit", 7, "--out", out, "--k", 20)
    if res.exit_code in (1, 2):
        assert "Traceback" not in res.output and "--k" in res.stderr, res.stderr
        return
    ok(res)
    w = warnings_of(res)
    assert any("20" in x and ("8" in x or "head" in x) for x in w), \
        f"--k 20 on 8 heads kept {len(json.loads(out.read_text())['heads'])} heads without a word:\n{res.stderr}"
