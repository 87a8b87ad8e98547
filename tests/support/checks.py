"""Numeric comparisons shared by the parity tests (MLX against the PyTorch reference)."""

from __future__ import annotations

import numpy as np

TOL = 1e-4


def assert_close(a, b, atol, what):
    """Max absolute error of `a` against `b` within `atol` (returns the error)."""
    err = float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())
    assert err <= atol, f"{what}: max abs error {err:.3g} > {atol:g}"
    return err


def close(got, want, tol=TOL):
    """Same shape, max error within `tol` relative to the larger of 1 and max |want|."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    err = np.abs(got - want).max() if got.size else 0.0
    assert err <= tol * max(1.0, np.abs(want).max()), f"max error {err:.3g}"
    return err


def close_lists(got, want, tol=TOL):
    """Two (nested) lists of numbers or None: None in the same places, numbers close."""
    g, w = np.array(got, dtype=object), np.array(want, dtype=object)
    assert g.shape == w.shape
    for a, b in zip(g.ravel(), w.ravel()):
        assert (a is None) == (b is None), (got, want)
        if a is not None:
            assert abs(a - b) <= tol * max(1.0, abs(b)), (got, want)


def check_greedy_matches_hf(t, question="Describe the audio.", max_new_tokens=32):
    """`generate`'s greedy tokens are transformers' `generate` up to its first eos (any family's fixture)."""
    from mlx_listen.answers import generate
    from mlx_listen.prompt import prepare
    from support import tone

    clips = [tone(2.5)]
    ref = t.reference("greedy", clips, question, max_new_tokens=max_new_tokens)
    model, processor = t.mlx
    ans = generate(model, processor, prepare(model, processor, clips, question), max_tokens=max_new_tokens)
    hf = ref["greedy_tokens"].tolist()
    eos = set(processor.tokenizer.eos_token_ids)
    hf_answer = hf[: next((i for i, tok in enumerate(hf) if tok in eos), len(hf))]
    assert ans.tokens == hf_answer
    assert len(hf_answer) >= 24, f"fixture stops after {len(hf_answer)} tokens: too short to test decoding"


def check_patching_matches_hf(t, kind: str, question: str, answer: str):
    """Patching audio into silence (`kind` "audio": layer 0 at the audio tokens; "head": head 1 of layer 1 at
    T..T+2) gives transformers' patched logits, log-prob and silence logits (any family's fixture)."""
    from mlx_listen.interp.patching import Patch, continuation_tokens, logp_of, patched_logits, position_groups
    from mlx_listen.interp.steering import Silence
    from mlx_listen.prompt import prepare
    from mlx_listen_convert.reference.patching import run_patched
    from support import tone

    model, processor = t.mlx
    clip = tone(2.5)
    prompt = prepare(model, processor, [clip], question)
    silence = Silence(model).prompt(prompt)
    T = prompt.last
    cont = continuation_tokens(processor, answer)
    patch = {"audio": Patch(0, tuple(int(p) for p in position_groups(prompt)["audio"])),
             "head": Patch(1, (T, T + 3), head=1)}[kind]
    ref = run_patched(t.hf_model, t.hf_processor, [clip], question, continuation=cont, layer=patch.layer,
                      positions=list(patch.positions), head=patch.head)
    ours = patched_logits(model, silence, prompt, cont, [patch])
    assert np.abs(ours - ref["patched_logits"]).max() <= 1e-4
    assert abs(logp_of(ours, cont) - ref["patched_logp"]) <= 1e-4
    assert np.abs(patched_logits(model, silence, prompt, cont) - ref["silence_logits"]).max() <= 1e-4
    assert np.abs(ref["patched_logits"] - ref["silence_logits"]).max() > 0.1, "the patch changed nothing: a weak test"
