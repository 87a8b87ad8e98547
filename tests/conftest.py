"""Shared fixtures (the helpers they use live in `support`, importable from every test folder):

- `tiny` (both variants) / `tiny_gqa`: the tiny random checkpoints of `support`, built once per
  session; `hf_eager`: transformers' model of `tiny` with eager attention; `M`: the GQA
  checkpoint's MLX folder; `shape`: its (layers, heads);
- `planted`: the planted-head model of `support.planted`, built once;
- `demo_set` / `demo`: the synthetic demo set, written once, its items loaded per module;
- `files`: clips and HEADS files for the command tests;
- `heads_run`: one `mlx-listen heads` run over the demo set.

Tests that call into torch, transformers or the reference side themselves (beyond these shared
fixtures) carry the `torch` marker; tests of more than ~1.5 s the `slow` one (pyproject).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from support import SR, VARIANTS, Tiny, invoke, ok, tiny_model, tone  # support sets HF_HUB_OFFLINE first
from support.heads import N_DEMO, Counter, heads_args, parity


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session", params=list(VARIANTS))
def tiny(request, tiny_root) -> Tiny:
    return tiny_model(tiny_root, request.param)


@pytest.fixture(scope="session")
def tiny_gqa(request, tiny_root) -> Tiny:
    return tiny_model(tiny_root, "gqa")


@pytest.fixture(scope="session", params=["af3-gqa", "af3-mha", "omni-gqa", "omni-mha"])
def fam(request, tiny_root):
    """Each tiny Audio Flamingo 3 and Qwen2.5-Omni variant (`support.families`), built once."""
    from support.families import family_model

    return family_model(tiny_root, request.param)


@pytest.fixture(scope="session")
def af3(tiny_root):
    from support.families import family_model

    return family_model(tiny_root, "af3-gqa")


@pytest.fixture(scope="session")
def omni(tiny_root):
    from support.families import family_model

    return family_model(tiny_root, "omni-gqa")


@pytest.fixture(scope="session", params=["qwen2_audio", "audioflamingo3", "qwen2_5_omni"])
def every_family(request, tiny_root):
    """One tiny checkpoint of each family (Qwen2-Audio's GQA one, `af3-gqa`, `omni-gqa`)."""
    from support.families import family_model

    if request.param == "qwen2_audio":
        return tiny_model(tiny_root, "gqa")
    return family_model(tiny_root, {"audioflamingo3": "af3-gqa", "qwen2_5_omni": "omni-gqa"}[request.param])


@pytest.fixture(scope="session")
def hf_eager(tiny):
    """`(model, processor)`: transformers' model of `tiny` with eager attention (it returns its
    attention weights), on the CPU."""
    from mlx_listen_convert.reference import hf as R

    return R.load_hf(tiny.hf_path, attn="eager", device="cpu")


@pytest.fixture(scope="session")
def M(tiny_gqa) -> Path:
    """The tiny GQA checkpoint's MLX folder (2 decoder layers x 4 heads, a 262-token byte vocabulary)."""
    return tiny_gqa.mlx_path


@pytest.fixture
def shape(tiny_gqa):
    model, _ = tiny_gqa.mlx
    return len(model.layers), model.config.text_config.num_attention_heads


@pytest.fixture(scope="session")
def planted(tmp_path_factory):
    """`(model, processor, layer, head, info)` of the planted-head model (`support.planted`)."""
    from support.planted import planted_model

    return planted_model(tmp_path_factory.mktemp("planted"))


@pytest.fixture(scope="session")
def demo_set(tmp_path_factory) -> Path:
    """demo.json of the synthetic demo set (make_demo_set's defaults), written once: tests read it
    and write nothing under its folder."""
    from mlx_listen.eval.demo_set import make_demo_set

    return make_demo_set(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def demo(demo_set):
    """`(audio root, demo.json, items)`, the items loaded afresh for each module."""
    from mlx_listen.eval import mmau

    items = mmau.load_items(demo_set)
    assert len(items) == N_DEMO
    return demo_set.parent, demo_set, items


@pytest.fixture(scope="session")
def files(tmp_path_factory) -> dict[str, Path]:
    """Clips (`a`, `b`, `silence`, `long`: 45 s, `short`: 100 samples) and HEADS files (`H`: valid for
    2 layers x 4 heads, `far_layer`, `far_head`: heads the tiny model does not have)."""
    d = tmp_path_factory.mktemp("files")
    out = {}
    a = tone(1.0)
    for name, x in {"a": a, "b": tone(1.5, 880.0, 2), "silence": np.zeros_like(a), "long": tone(45.0, seed=3),
                    "short": tone(100 / SR)}.items():
        out[name] = d / f"{name}.wav"
        sf.write(out[name], x, SR)
    heads = {"H": {"heads": [[0, 1], [1, 3]]},            # valid for 2 layers x 4 heads
             "far_layer": {"heads": [[5, 0]]},             # layer 5 of a 2-layer model
             "far_head": {"heads": [[0, 7], [1, 1]]}}      # head 7 of a 4-head layer
    for name, data in heads.items():
        out[name] = d / f"{name}.json"
        out[name].write_text(json.dumps(data))
    return out


@pytest.fixture(scope="session")
def heads_run(demo_set, tiny_gqa, tmp_path_factory):
    """`mlx-listen heads` over the whole demo set, correctness by answer-position parity
    (`support.heads`): `(HEADS.json, the CLI result, the Counter of the model's answers)`."""
    from mlx_listen.eval import mmau

    out = tmp_path_factory.mktemp("heads") / "HEADS.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mmau, "string_match", parity)
        count = Counter(mp)
        res = ok(invoke(*heads_args((demo_set.parent, demo_set, None), tiny_gqa.mlx_path, out)))
    return out, res, count
