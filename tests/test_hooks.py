"""The hook registry (`mlx_listen.hooks`): one namespace for hooks and captures, derived points
computed only for the rows asked for, handles, and nothing left installed; head-level capture
against transformers' eager attention weights (`output_attentions`), and capture's cost: nothing
after T unless asked, flat memory in decoding."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from support import tone

from mlx_listen.answers import generate
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


# -- capture ---------------------------------------------------------------------------------------


def hf_attentions(hf_eager, clips, question, encoder_layer=None):
    """Decoder attention weights (and, optionally, one encoder layer's, via a forward hook)."""
    import torch

    from mlx_listen_convert.reference.hf import hf_inputs

    model, proc = hf_eager
    inputs = hf_inputs(proc, clips, question)
    enc = []
    hook = None
    if encoder_layer is not None:
        hook = model.model.audio_tower.layers[encoder_layer].self_attn.register_forward_hook(
            lambda m, a, o: enc.append(o[1][0].float().numpy()))
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    if hook:
        hook.remove()
    return inputs["input_ids"][0].numpy(), [a[0].float().numpy() for a in out.attentions], enc


@pytest.mark.torch
@pytest.mark.slow
def test_audio_mass_matches_hf_eager(tiny, hf_eager):
    clips, q = [tone(2.5), tone(1.2, 660.0, 3)], "Which clip is higher?"
    model, processor = tiny.mlx
    prompt = prepare(model, processor, clips, q)
    _, cap = run_with_cache(model, prompt, "decoder.blocks.*.attn.hook_audio_mass")
    T = prompt.last
    ours = cap.audio_mass(T)
    ids, attn, _ = hf_attentions(hf_eager, clips, q)
    audio = np.flatnonzero(ids == model.config.audio_token_index)
    assert audio.tolist() == prompt.audio_positions.tolist()
    ref = np.stack([a[:, T, audio].sum(-1) for a in attn])  # (layers, heads)
    assert ours.shape == ref.shape == (len(model.layers), model.config.text_config.num_attention_heads)
    assert np.abs(ours - ref).max() <= 1e-5, np.abs(ours - ref).max()
    assert 0.05 < ours.mean() < 0.95  # not a degenerate fixture: heads split attention
    # Rows inside the prompt (not the call's last) see only their past: same as HF's causal rows.
    rows = [audio[-1] + 1, T - 3]
    _, mid = run_with_cache(model, prompt, "decoder.blocks.*.attn.hook_audio_mass", at=rows)
    for p in rows:
        want = np.stack([a[:, p, audio[audio <= p]].sum(-1) for a in attn])
        assert np.abs(mid.audio_mass(int(p)) - want).max() <= 1e-5


@pytest.mark.torch
def test_full_pattern_matches_hf_eager(tiny, hf_eager):
    clips, q = [tone(1.0)], "What?"
    model, processor = tiny.mlx
    with Capture(model, ENC_PATTERN.format(0)) as enc_cap:  # the encoder runs in prepare()
        prompt = prepare(model, processor, clips, q)
    T = prompt.last
    _, cap = run_with_cache(model, prompt, [PATTERN.format(1)], at=slice(0, None))
    _, attn, hf_enc = hf_attentions(hf_eager, clips, q, encoder_layer=0)
    ours = np.array(cap.get(PATTERN.format(1))[0]).swapaxes(0, 1)  # (n, H, S) -> (H, n, S)
    assert ours.shape == attn[1].shape == (attn[1].shape[0], T + 1, T + 1)
    assert np.abs(ours - attn[1]).max() <= 1e-5
    enc = np.array(enc_cap.get(ENC_PATTERN.format(0))[0])
    n = enc.shape[-1]
    assert enc.shape == (model.config.audio_config.encoder_attention_heads, n, n)
    # HF runs 1500 positions and masks keys past the clip: its valid block equals our pattern.
    assert np.abs(enc - hf_enc[0][:, :n, :n]).max() <= 1e-5
    assert np.abs(hf_enc[0][:, :n, n:]).max() == 0
    assert PATTERN.format(0) not in cap.values  # only what was named


def test_capture_leaves_logits_bit_identical(tiny_gqa):
    model, processor = tiny_gqa.mlx
    prompt = prepare(model, processor, [tone(2.0)], "q")
    run = lambda: np.array(model(mx.array(prompt.ids)[None], input_embeddings=prompt.embeddings[None])[0, -1])  # noqa: E731
    before = run()
    logits, cap = run_with_cache(model, prompt, ["decoder.blocks.*", "encoder.blocks.*"], at=slice(0, None))
    assert np.array_equal(np.array(logits[0]), before)
    assert np.array_equal(run(), before)
    assert model.hooks.active() == [], "hooks left installed"


def test_hook_z_reassembles_into_the_attention_output(tiny_gqa):
    """hook_z is the per-head output before o_proj: o_proj(z) is exactly the attention sublayer."""
    model, processor = tiny_gqa.mlx
    prompt = prepare(model, processor, [tone(1.5)], "q")
    T = prompt.last
    attn = model.layers[1].self_attn
    _, cap = run_with_cache(model, prompt, [Z.format(1), "decoder.blocks.1.hook_resid_pre"], at=slice(0, None))
    z = cap.get(Z.format(1))  # (1, L, heads, head_dim)
    assert z.shape == (1, T + 1, attn.n_heads, model.config.text_config.head_dim)
    x = cap.get("decoder.blocks.1.hook_resid_pre")
    layer = model.layers[1]
    direct = attn(layer.input_layernorm(x), "causal", None, 0)
    assert np.array_equal(np.array(attn.o_proj(z.reshape(1, T + 1, -1))), np.array(direct))


def test_positions_select_calls_not_counters(tiny_gqa):
    """Captures follow absolute positions: at=T records only the call holding T, during generation."""
    model, processor = tiny_gqa.mlx
    prompt = prepare(model, processor, [tone(2.0)], "Describe the audio.")
    T = prompt.last
    with Capture(model, AUDIO_MASS.format("*"), audio_positions=prompt.audio_positions, at=T) as only_t, \
            Capture(model, AUDIO_MASS.format("*"), audio_positions=prompt.audio_positions,
                    at=slice(T, None)) as every:
        ans = generate(model, processor, prompt, max_tokens=6)
    assert only_t.recorded(AUDIO_MASS.format(0)).tolist() == [T]
    seen = every.recorded(AUDIO_MASS.format(0)).tolist()
    assert seen[: len(ans.tokens)] == list(range(T, T + len(ans.tokens)))
    _, single = run_with_cache(model, prompt, AUDIO_MASS.format("*"))
    assert np.abs(only_t.audio_mass(T) - single.audio_mass(T)).max() <= 1e-6
    assert np.array_equal(every.audio_mass(T), only_t.audio_mass(T))


@pytest.mark.slow
def test_capture_during_decode_keeps_memory_flat(tiny_gqa):
    """Capture kept on over 200 decode steps: active memory within a few MB of capture off (the
    issue measured +858 MB at a 512-wide model when lazy captures pinned each step's key cache)."""
    model, processor = tiny_gqa.mlx
    prompt = prepare(model, processor, [tone(2.0)], "Describe the audio.")
    T = prompt.last

    def active_after(capture: bool) -> float:
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        if capture:
            with Capture(model, [AUDIO_MASS.format("*"), RESID.format(1)], audio_positions=prompt.audio_positions,
                         at=slice(T, None)) as cap:
                ans = generate(model, processor, prompt, max_tokens=200)
            assert len(cap.values[AUDIO_MASS.format(0)]) >= 150
        else:
            ans = generate(model, processor, prompt, max_tokens=200)
        assert len(ans.tokens) == 200
        return (mx.get_peak_memory() - base) / 1e6

    off, on = active_after(False), active_after(True)
    print(f"peak over 200 steps: capture off +{off:.2f} MB, on +{on:.2f} MB")
    assert on - off < 3.0, (off, on)


def test_unknown_hook_name_is_refused(tiny_gqa):
    model, _ = tiny_gqa.mlx
    with pytest.raises(ValueError, match="no hook point matches"):
        Capture(model, "decoder.blocks.0.hook_nonsense")
    assert AUDIO_MASS.format(3) == "decoder.blocks.3.attn.hook_audio_mass"
    assert "decoder.blocks.1.attn.hook_z" in model.hook_points()
