"""`mlx-listen convert` (`cli/model.py`): a conversion that answers like the original, refusing to
overwrite without `--force`, quantising with `-q`, and its usage errors. (The converter itself:
tests/converter/.)"""

from __future__ import annotations

import json

import pytest
from support import invoke, ok
from support.cli import assert_user_error, last_json

QUESTION = "What is this sound?"


def test_convert_command(tiny_gqa, clips, tmp_path):
    out = tmp_path / "converted"
    r = ok(invoke("convert", "--hf-path", tiny_gqa.hf_path, "--mlx-path", out))
    assert f"Saved the MLX model to {out}" in r.stderr
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2_audio"
    a = ok(invoke("ask", clips["a"], QUESTION, "--model", out, "-m", 4, "--json"))
    b = ok(invoke("ask", clips["a"], QUESTION, "--model", tiny_gqa.mlx_path, "-m", 4, "--json"))
    assert last_json(a.stdout)["tokens"] == last_json(b.stdout)["tokens"]

    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = invoke("convert", "--hf-path", tiny_gqa.hf_path, "--mlx-path", out)
    assert_user_error(again, "--force")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    ok(invoke("convert", "--hf-path", tiny_gqa.hf_path, "--mlx-path", out, "--force", "-q", "--q-bits", 8))
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 8
    assert [p.name for p in tmp_path.iterdir()] == ["converted"]  # no temp folders left


@pytest.mark.parametrize("args, words", [
    (["convert"], ["--hf-path"]),
    (["convert", "--hf-path", "{hf}", "--mlx-path", "{out}", "-q", "--q-group-size", "256"],
     ["--q-group-size", "256"]),  # MLX supports 16 (nvfp4), 32, 64, 128 only
    (["convert", "--hf-path", "{hf}", "--mlx-path", "{out}", "-q", "--q-bits", "7"], ["--q-bits"]),
    (["convert", "--hf-path", "{hf}", "--mlx-path", "{out}", "-q", "--q-mode", "int4"], ["--q-mode"]),
])
def test_usage_errors(tiny_gqa, clips, tmp_path, args, words):
    fill = dict(a=clips["a"], hf=tiny_gqa.hf_path, out=tmp_path / "out")
    r = invoke(*[a.format(**fill) for a in args])
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), r.output
    assert r.stdout == "" and "Traceback" not in r.output and "Usage:" in r.stderr
    for w in words:
        assert w in r.stderr.splitlines()[-1], r.stderr
    assert list(tmp_path.iterdir()) == []
