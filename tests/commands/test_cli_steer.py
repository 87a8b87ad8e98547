"""`mlx-listen steer build` (`cli/steer.py`): the `--out` folder checked before any work, the path
it wrote reported, and the vector's stored `--alpha` used by `ask --vector`."""

from __future__ import annotations

import pytest
from support import invoke, ok
from support.cli import Q, data_args, last_json, user_error


def test_build_checks_the_out_folder_first(demo, M, files, tmp_path, no_load):
    out = tmp_path / "no" / "such" / "v"
    res = invoke("steer", "build", "--heads", files["H"], *data_args(demo, M, max_tokens=False), "--out", out)
    user_error(res, str(out.parent))
    assert not (tmp_path / "no").exists()


@pytest.mark.slow
def test_build_reports_the_file_and_the_vector_keeps_its_alpha(demo, M, files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = ok(invoke("steer", "build", "--heads", files["H"], *data_args(demo, M, max_tokens=False), "--limit", 3,
                    "--out", "x", "--alpha", "0"))
    assert (tmp_path / "x.safetensors").is_file() and not (tmp_path / "x").exists()
    assert "x.safetensors" in res.stderr, res.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], list(tmp_path.iterdir())

    plain = last_json(ok(invoke("ask", files["a"], Q, "--model", M, "-m", 4, "--json")).stdout)
    vec = ok(invoke("ask", files["a"], Q, "--model", M, "-m", 4, "--vector", "x.safetensors", "--json"))
    out = last_json(vec.stdout)
    assert out["steering"]["alpha"] == 0.0, out["steering"]
    assert "Steering: alpha 0 " in vec.stderr, vec.stderr
    assert out["tokens"] == plain["tokens"]  # alpha 0 adds exact zeros
    over = last_json(ok(invoke("ask", files["a"], Q, "--model", M, "-m", 4, "--vector", "x.safetensors",
                               "--alpha", "3", "--json")).stdout)
    assert over["steering"]["alpha"] == 3.0
