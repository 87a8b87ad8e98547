"""Loading a damaged model folder (`mlx_listen.load`): a config.json that is not an object, missing
tokenizer files, a missing shard; every command says which file, in one `Error:` line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from support import invoke, ok
from support.checkpoints import model_copy
from support.cli import MAXT, Q, eval_args, user_error


@pytest.mark.parametrize("command", ["ask", "eval", "convert", pytest.param("reference", marks=pytest.mark.torch)])
def test_a_config_json_that_is_an_array_is_named(demo, tiny_gqa, files, tmp_path, command):
    src = tiny_gqa.hf_path if command in ("convert", "reference") else tiny_gqa.mlx_path
    m = model_copy(src, tmp_path / "m")
    (m / "config.json").write_text("[1, 2, 3]\n")
    if command == "ask":
        res = invoke("ask", files["a"], Q, "--model", m, "-m", MAXT)
    elif command == "eval":
        res = invoke(*eval_args(demo, m, tmp_path / "run", "--limit", 1))
    elif command == "convert":
        res = invoke("convert", "--hf-path", m, "--mlx-path", tmp_path / "out")
        assert not (tmp_path / "out").exists()
    else:
        from mlx_listen_convert.reference.run import main

        items = tmp_path / "items.json"
        items.write_text(json.dumps([{"audio": str(files["a"]), "question": Q}]))
        res = CliRunner().invoke(main, ["--model", str(m), "--items", str(items), "--out", str(tmp_path / "b"),
                                        "--device", "cpu", "--max-new-tokens", "0"])
    user_error(res, "config.json")


@pytest.mark.parametrize("removed", [["tokenizer.json"], ["tokenizer.json", "tokenizer_config.json"]],
                         ids=["tokenizer.json", "all-tokenizer-files"])
@pytest.mark.parametrize("command", ["ask", "eval"])
def test_missing_tokenizer_files_are_named(demo, M, files, tmp_path, removed, command):
    m = model_copy(M, tmp_path / "m")
    for f in removed:
        (m / f).unlink()
    res = invoke("ask", files["a"], Q, "--model", m, "-m", MAXT) if command == "ask" \
        else invoke(*eval_args(demo, m, tmp_path / "run", "--limit", 1))
    err = user_error(res, "tokenizer")
    assert "positions" not in err, err


def _two_shards(src: Path, dst: Path, index: bool = True) -> Path:
    import mlx.core as mx

    shutil.copytree(src, dst)
    shard = next(dst.glob("model-*.safetensors"))
    w = mx.load(str(shard))
    shard.unlink()
    keys = sorted(w)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map = {}
    for name, ks in zip(names, halves):
        mx.save_safetensors(str(dst / name), {k: w[k] for k in ks}, metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(ks, name))
    idx = dst / "model.safetensors.index.json"
    if index:
        idx.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    elif idx.exists():
        idx.unlink()
    return dst


@pytest.mark.parametrize("index", [True, False], ids=["with-index", "no-index"])
def test_a_missing_second_shard_is_named(demo, M, files, tmp_path, index):
    m = _two_shards(M, tmp_path / "m", index)
    ok(invoke("ask", files["a"], Q, "--model", m, "-m", MAXT))  # the split folder itself is fine
    (m / "model-00002-of-00002.safetensors").unlink()
    user_error(invoke("ask", files["a"], Q, "--model", m, "-m", MAXT), "model-00002-of-00002.safetensors")
    user_error(invoke(*eval_args(demo, m, tmp_path / "run", "--limit", 1)), "model-00002-of-00002.safetensors")
