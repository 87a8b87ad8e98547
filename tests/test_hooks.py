"""The hook registry (`mlx_listen.hooks`) on its own: one namespace for hooks and captures, derived
points computed only for the rows asked for, handles, and nothing left installed."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from support import tone

from mlx_listen.hooks import (
    AUDIO_MASS,
    ENC_PATTERN,
    MASK,
    PATTERN,
    QK,
    RESID,
    Capture,
    Hooks,
    Z,
    run_with_cache,
    run_with_hooks,
    select_rows,
)
from mlx_listen.prompt import prepare


@pytest.fixture(scope="module")
def setup(tiny_gqa):
    model, processor = tiny_gqa.mlx
    return model, prepare(model, processor, [tone(1.5)], "What is it?")


def plain_logits(model, prompt) -> np.ndarray:
    return np.array(model.unembed(model.blocks(prompt.embeddings[None])[:, -1]))[0]


def test_one_namespace(setup):
    """Every name a capture records is a registry name, derived points included."""
    model, prompt = setup
    names = model.hook_points()
    for l in range(model.n_layers):
        for n in (RESID, Z, QK, MASK, AUDIO_MASS, PATTERN):
            assert n.format(l) in names
    assert ENC_PATTERN.format(0) in names
    assert model.hooks.match("decoder.blocks.*.attn.hook_audio_mass") == [AUDIO_MASS.format(l) for l in
                                                                         range(model.n_layers)]
    with Capture(model, "decoder.blocks.*", audio_positions=prompt.audio_positions, at=prompt.last) as cap:
        model.blocks(prompt.embeddings[None])
    recorded = set(cap.values)
    assert recorded <= set(names) and MASK.format(0) not in recorded  # an edit point has no value to record
    assert {QK.format(0), AUDIO_MASS.format(0), PATTERN.format(0), RESID.format(0)} <= recorded
    with pytest.raises(ValueError, match="edit point"):
        Capture(model, MASK.format(0), at=0)
    with pytest.raises(KeyError, match="no hook point"):
        model.hooks.add("decoder.blocks.0.hook_nonsense", lambda x, p: None)
    with pytest.raises(ValueError, match="no hook point matches"):
        model.hooks.expand(["decoder.blocks.*.hook_nonsense"])


def test_derived_point_is_computed_for_the_rows_asked(setup):
    """hook_audio_mass through the registry equals the capture's, and the full pattern's sum."""
    model, prompt = setup
    T, got = prompt.last, {}

    def keep(value, point):
        got[tuple(point.positions.tolist())] = np.array(value)

    rows = [2, T - 1, T]
    with model.hooks.add(AUDIO_MASS.format(1), keep, at=rows, audio_positions=prompt.audio_positions):
        model.blocks(prompt.embeddings[None])
    assert list(got) == [tuple(rows)] and got[tuple(rows)].shape == (1, 3, model.n_heads)
    _, cap = run_with_cache(model, prompt, [PATTERN.format(1)], at=slice(0, None))
    pattern = np.array(cap.get(PATTERN.format(1))[0])  # (n, H, S)
    want = pattern[rows][..., prompt.audio_positions].sum(-1)
    assert np.abs(got[tuple(rows)][0] - want).max() < 1e-6
    with pytest.raises(ValueError, match="audio positions"):
        model.hooks.add(AUDIO_MASS.format(1), keep)
    with pytest.raises(ValueError, match="not a derived point"):
        model.hooks.add(RESID.format(1), keep, at=T)
    assert model.hooks.active() == []


def test_handles_remove_exactly_their_hook(setup):
    model, prompt = setup
    base = plain_logits(model, prompt)
    name = RESID.format(model.n_layers - 1)
    a = model.hooks.add(name, lambda h, p: h * 0.5)
    b = model.hooks.add(name, lambda h, p: None)  # None: the value passes unchanged
    assert model.hooks.active() == [name]
    assert not np.array_equal(plain_logits(model, prompt), base)
    a.remove()
    a.remove()  # idempotent
    assert np.array_equal(plain_logits(model, prompt), base)
    b.remove()
    assert model.hooks.active() == []


def test_using_removes_on_error_and_suspended_holds_hooks_off(setup):
    model, prompt = setup
    base = plain_logits(model, prompt)
    with pytest.raises(RuntimeError):
        with model.hooks.using([(Z.format(0), lambda z, p: z * 0)]):
            raise RuntimeError("boom")
    assert model.hooks.active() == []
    with model.hooks.using([(Z.format(0), lambda z, p: z * 0)]):
        zeroed = plain_logits(model, prompt)
        with model.hooks.suspended():
            assert np.array_equal(plain_logits(model, prompt), base)
        assert np.array_equal(plain_logits(model, prompt), zeroed)
    assert not np.array_equal(zeroed, base)


def test_points_know_where_they_are(setup):
    """point.offset/length give absolute positions, also across a KV cache."""
    from mlx_lm.models.cache import make_prompt_cache

    model, prompt = setup
    calls = []
    cache = make_prompt_cache(model)
    with model.hooks.using([(RESID.format(0), lambda h, p: calls.append((p.offset, p.length)))]):
        model.blocks(prompt.embeddings[None, :10], cache)
        model.blocks(prompt.embeddings[None, 10:], cache)
    assert calls == [(0, 10), (10, len(prompt.ids) - 10)]
    assert select_rows(slice(12, None), 10, 5)[1].tolist() == [12, 13, 14]
    assert select_rows([3, 11], 10, 5)[0].tolist() == [1]


def test_run_with_hooks_is_the_plain_forward_with_an_edit(setup):
    model, prompt = setup
    base = plain_logits(model, prompt)
    same = np.array(run_with_hooks(model, prompt, [(Z.format(1), lambda z, p: None)]))[0]
    assert np.array_equal(same, base)
    edited = np.array(run_with_hooks(model, prompt, [(Z.format(1), lambda z, p: mx.zeros_like(z))]))[0]
    assert not np.allclose(edited, base)


def test_a_fresh_registry_is_empty():
    h = Hooks()
    assert h.names() == [] and h.active() == [] and h.match("*") == []
