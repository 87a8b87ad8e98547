"""Activation patching audio -> silence (`interp/patching.py`): against PyTorch forward hooks on the
tiny models (fp32), the fast path against the plain definition, zero-strength edits bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from support import tone
from support.checks import check_patching_matches_hf

from mlx_listen.errors import ListenError
from mlx_listen.hooks import run_with_cache
from mlx_listen.interp.patching import (
    Patch,
    Patcher,
    continuation_tokens,
    logp_of,
    patched_logits,
    position_groups,
    shared_prefix,
    standard_patches,
)
from mlx_listen.interp.steering import Silence
from mlx_listen.presets import continuation
from mlx_listen.prompt import prepare

Q = "Describe the audio."
A, B = "<answer>dog</answer>", "<answer>cat</answer>"  # byte tokens: 8 shared, then they differ


def pair(model, processor, clip=None):
    prompt = prepare(model, processor, [tone(2.5) if clip is None else clip], Q)
    return prompt, Silence(model).prompt(prompt)


def test_continuations_and_shared_prefix(tiny_gqa):
    assert continuation("r1-aqa", " dog ") == "<answer>dog</answer>"
    assert continuation("r1aqa_think", "dog") == "<answer>dog</answer>"
    assert continuation("mmau", "dog") == "dog"
    with pytest.raises(ListenError, match="preset"):
        continuation("other", "dog")
    _, processor = tiny_gqa.mlx
    seqs = [continuation_tokens(processor, t) for t in (A, B)]
    assert shared_prefix(seqs) == len("<answer>") and processor.decode(seqs[0]) == A


@pytest.mark.torch
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["audio", "head"])
def test_patched_logits_match_pytorch(tiny, kind):
    """One patch through PyTorch forward hooks on transformers' model and through our hooks (block
    0's output over the audio positions; head 1 of block 1 at T and T + 3, a forward pre-hook on
    `o_proj`): the logits at every continuation position and the continuation's log-probability."""
    check_patching_matches_hf(tiny, kind, Q, A)


@pytest.mark.slow
def test_fast_path_equals_the_plain_definition(tiny_gqa):
    """Every standard patch (group x layer, head at T and the prefix) through the shared-prefix
    batches equals one full forward pass per patch and continuation, in chunks of any size."""
    model, processor = tiny_gqa.mlx
    prompt, silence = pair(model, processor)
    seqs = [continuation_tokens(processor, t) for t in (A, B)]
    groups = position_groups(prompt, shared_prefix(seqs))
    patches = standard_patches(len(model.layers), 4, groups, ("audio", "text", "last", "prefix"), "last+prefix")
    res = Patcher(model, prompt, silence, max_rows=3).measure(seqs, patches)

    def m(target, source, ps=()):
        lp = [logp_of(patched_logits(model, target, source, s, ps), s) for s in seqs]
        return lp[0] - lp[1]

    assert abs(res.m_source - m(prompt, prompt)) <= 1e-4 and abs(res.m_target - m(silence, prompt)) <= 1e-4
    plain = np.array([m(silence, prompt, [p]) for p in patches])
    assert np.abs(res.m - plain).max() <= 1e-4 * max(1.0, np.abs(plain).max())
    assert np.ptp(res.m) > 0.1, "patches did not differ: a weak test"
    whole = Patcher(model, prompt, silence, max_rows=64).measure(seqs, patches)
    assert np.abs(whole.m - res.m).max() <= 1e-5


def test_every_position_at_a_layer_gives_the_audio_run(tiny):
    """With continuations that differ only in their last token, patching every position (first audio
    position to the end of the shared prefix) at any layer restores the audio run exactly."""
    model, processor = tiny.mlx
    prompt, silence = pair(model, processor)
    seqs = [continuation_tokens(processor, t)[:9] for t in (A, B)]  # "<answer>d" / "<answer>c"
    groups = position_groups(prompt, shared_prefix(seqs))
    every = tuple(sorted(int(p) for g in groups.values() for p in g))
    res = Patcher(model, prompt, silence).measure(seqs, [Patch(l, every) for l in range(len(model.layers))])
    assert np.abs(res.m - res.m_source).max() <= 1e-4
    assert abs(res.m_source - res.m_target) > 0.01


@pytest.mark.slow
def test_zero_strength_edits_are_bit_identical(tiny_gqa):
    """A patch that writes a run's own values (the silence into the silence) is no edit at all:
    the plain forward's logits bit for bit, and the fast path's batches with and without their
    hooks bit for bit. Nothing stays installed, and the plain model is unchanged afterwards."""
    model, processor = tiny_gqa.mlx
    prompt, silence = pair(model, processor)
    before = np.array(run_with_cache(model, prompt, [])[0])
    seqs = [continuation_tokens(processor, t) for t in (A, B)]
    groups = position_groups(prompt, shared_prefix(seqs))
    patches = standard_patches(len(model.layers), 4, groups, ("audio", "text", "last", "prefix"), "last+prefix")
    plain = patched_logits(model, silence, silence, seqs[0])
    for p in patches[::3]:
        assert np.array_equal(patched_logits(model, silence, silence, seqs[0], [p]), plain)
    same = Patcher(model, silence, silence)
    edited, bare = same.measure(seqs, patches), same.measure(seqs, patches, _edit=False)
    assert np.array_equal(edited.logp, bare.logp)
    assert np.abs(edited.m - edited.m_target).max() <= 1e-4  # other call shapes: equal up to rounding
    assert model.hooks.active() == []
    assert np.array_equal(np.array(run_with_cache(model, prompt, [])[0]), before)
