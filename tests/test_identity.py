"""Head sets and vectors are bound to the model, prompt and items they were found with."""

from __future__ import annotations

import json

import pytest
from support import invoke, ok

from mlx_listen.errors import ListenError
from mlx_listen.eval.demo_set import make_demo_set
from mlx_listen.headset import HeadSet
from mlx_listen.identity import check_binding, model_signature, same_model


@pytest.fixture(scope="module")
def demo_small(tmp_path_factory):
    """A demo set of one item per kind (demo.json)."""
    root = tmp_path_factory.mktemp("demo")
    return make_demo_set(root, n_per_kind=1)


@pytest.fixture(scope="module")
def bound_heads(tiny_gqa, demo_small, tmp_path_factory):
    model, _ = tiny_gqa.mlx
    ids = [it["id"] for it in json.loads(demo_small.read_text())][:3]
    path = tmp_path_factory.mktemp("h") / "HEADS.json"
    HeadSet([(0, 1), (1, 2)], meta={"prompt": "r1-aqa", "calibration_ids": ids,
                                    "model_signature": model_signature(model)}).save(path)
    return path, ids


@pytest.mark.torch
def test_same_model_survives_casts_and_refuses_others(tiny_gqa, tmp_path):
    from mlx_listen.load import load
    from mlx_listen_convert.convert import convert
    from mlx_listen_convert.reference.tiny import build_tiny

    model, _ = tiny_gqa.mlx
    sig = model_signature(model)
    assert same_model(sig, model)[0]
    q4, _ = load(convert(str(tiny_gqa.hf_path), str(tmp_path / "q4"), quantize=True, q_bits=4, q_group_size=32,
                         progress=False))
    assert same_model(sig, q4)[0]
    build_tiny(tmp_path / "other-hf", kv_heads=2, seed=5, init_range=0.02)
    other, _ = load(tmp_path / "other-hf")
    ok_, why = same_model(sig, other)
    assert not ok_ and "relative error" in why


def test_binding_rules(tiny_gqa, bound_heads):
    model, _ = tiny_gqa.mlx
    path, ids = bound_heads
    meta = HeadSet.load(path).meta
    assert check_binding(meta, "H", model=model, prompt="r1-aqa", ids=["x"]) == []
    with pytest.raises(ListenError, match="found with the 'r1-aqa' prompt"):
        check_binding(meta, "H", prompt="mmau")
    warned = check_binding(meta, "H", prompt="mmau", force=True)
    assert len(warned) == 1 and "used anyway" in warned[0]
    overlap = check_binding(meta, "H", ids=ids[:2] + ["new"])
    assert len(overlap) == 1 and "2 of these 3 items were used to find H" in overlap[0]
    assert "no model signature" in check_binding({}, "old", model=model)[0]


@pytest.mark.slow
def test_eval_refuses_a_head_set_of_another_prompt_or_model(tiny_gqa, tiny, demo_small, bound_heads, tmp_path):
    path, ids = bound_heads
    args = ["eval", "--data", demo_small, "--audio-dir", demo_small.parent, "--steer", path, "-m", 2, "--limit", 4]
    r = invoke(*args, "--model", tiny_gqa.mlx_path, "--out", tmp_path / "a", "--prompt", "mmau")
    assert r.exit_code == 1 and "found with the 'r1-aqa' prompt" in r.stderr and "Traceback" not in r.output
    assert not (tmp_path / "a" / "predictions.jsonl").exists()
    r = ok(invoke(*args, "--model", tiny_gqa.mlx_path, "--out", tmp_path / "b", "--prompt", "mmau", "--force"))
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert any("used anyway" in w for w in summary["warnings"]) and json.loads(
        (tmp_path / "b" / "run.json").read_text())["forced"] is True
    # the demo's first items are the head set's calibration items: flagged on stderr and in the summary
    assert "were used to find" in r.stderr and any("were used to find" in w for w in summary["warnings"])
    if tiny.name == "mha":  # another checkpoint (and architecture): refused once loaded, before any item
        r = invoke(*args, "--model", tiny.mlx_path, "--out", tmp_path / "c")
        assert r.exit_code == 1 and "another model" in r.stderr
