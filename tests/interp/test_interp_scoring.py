"""Option log-prob scoring (`interp/scoring.py`) against transformers (fp32, both tiny variants),
and its sharing: one prefill and one batched forward for every option and every last-block edit."""

from __future__ import annotations

import json
import warnings

import mlx.core as mx
import numpy as np
import pytest
from support import DATA, tone

from mlx_listen import presets
from mlx_listen.answers import decode, generate, prefill
from mlx_listen.chat import AUDIO, messages_for
from mlx_listen.errors import ListenWarning
from mlx_listen.interp import scoring
from mlx_listen.interp.edit import Row
from mlx_listen.interp.steering import Silence, SteerConfig, Steerer
from mlx_listen.prompt import prepare

# different token lengths (the tiny tokenizer is byte-level: 1 byte = 1 token)
ITEM = {"question": "Who is speaking?", "choices": ["Man", "A woman", "Child", "A robot, very loud"], "answer": "Man"}


def _prompt(model, processor, preset, clip=None):
    clip = tone(2.0) if clip is None else clip
    q = presets.build_prompt(ITEM, preset)
    return clip, q, prepare(model, processor, [clip], q)


@pytest.mark.torch
@pytest.mark.slow
@pytest.mark.parametrize("preset", ["r1-aqa", "mmau"])
def test_option_logprobs_match_transformers(tiny, preset):
    from mlx_listen_convert.reference.hf import option_logprobs_hf

    model, processor = tiny.mlx
    clip, q, prompt = _prompt(model, processor, preset)
    options = scoring.option_ids(processor, prompt, ITEM["choices"], preset)
    assert len({len(o) for o in options}) == 4, "options of different lengths"
    lp, per_token = scoring.option_logprobs(model, processor, prompt, ITEM["choices"], preset, per_token=True)
    texts = [presets.continuation(preset, c) for c in ITEM["choices"]]
    ref = option_logprobs_hf(tiny.hf_model, tiny.hf_processor, [clip], q, texts)
    assert ref["ids"] == options, "the continuation tokenises as transformers' tokenizer does"
    assert lp.shape == (1, 4) and np.abs(lp[0] - ref["sums"]).max() <= 1e-4
    for i, o in enumerate(options):
        assert np.abs(per_token[0, i, : len(o)] - ref["per_token"][i]).max() <= 1e-4
        assert np.isnan(per_token[0, i, len(o):]).all()
    assert np.ptp(lp) > 1.0, "options score alike: a weak test"


@pytest.mark.torch
@pytest.mark.slow
def test_steered_option_logprobs_match_transformers(tiny):
    """A steering delta added to the last block's output at T and after (or at T only): the shared
    forward's scores equal transformers' with the delta added through a forward hook."""
    from mlx_listen_convert.reference.hf import option_logprobs_hf

    model, processor = tiny.mlx
    clip, q, prompt = _prompt(model, processor, "r1-aqa")
    options = scoring.option_ids(processor, prompt, ITEM["choices"], "r1-aqa")
    delta = 2.0 * Steerer(model, SteerConfig(layers=[0, 1])).direction(prompt)
    pre = prefill(model, prompt)
    lp = scoring.score_options(model, pre, options, [Row(), Row(delta, True), Row(delta, False)])
    for row, at in ((1, "all"), (2, "prompt")):
        ref = option_logprobs_hf(tiny.hf_model, tiny.hf_processor, [clip], q, options, steer=np.array(delta), at=at)
        assert np.abs(lp[row] - ref["sums"]).max() <= 1e-4, at
        assert np.abs(lp[row] - lp[0]).max() > 0.05, "steering had no visible effect: a weak test"
    assert np.abs(lp[1] - lp[2]).max() > 0.05, "steering after T had no effect: a weak test"


@pytest.mark.torch
def test_hooked_condition_scores_with_its_hooks(tiny_gqa):
    """A condition that changes the forward pass (a head ablated at every position) is scored by
    its own prefill with its hooks on: the prompt and the continuations both see them."""
    from mlx_listen_convert.reference.hf import option_logprobs_hf

    model, processor = tiny_gqa.mlx
    clip, q, prompt = _prompt(model, processor, "mmau")
    options = scoring.option_ids(processor, prompt, ITEM["choices"], "mmau")
    layer, head = 1, 2
    hd = model.config.text_config.head_dim

    def ablate(z, point):  # (B, L, heads, head_dim)
        keep = mx.array(np.arange(z.shape[2]) != head)[None, None, :, None]
        return mx.where(keep, z, mx.zeros_like(z))

    with model.hooks.using([(f"decoder.blocks.{layer}.attn.hook_z", ablate)]):
        lp = scoring.score_prompt(model, prompt, options)
    assert model.hooks.active() == []
    o_proj = tiny_gqa.hf_model.model.language_model.layers[layer].self_attn.o_proj

    def zero_head(module, args):
        x = args[0].clone()
        x[..., head * hd:(head + 1) * hd] = 0
        return (x,)

    h = o_proj.register_forward_pre_hook(zero_head)
    try:
        ref = option_logprobs_hf(tiny_gqa.hf_model, tiny_gqa.hf_processor, [clip], q, options)["sums"]
    finally:
        h.remove()
    assert np.abs(lp[0] - ref).max() <= 1e-4
    plain = scoring.score_prompt(model, prompt, options)
    assert np.abs(plain[0] - ref).max() > 1e-3, "the ablation changed nothing: a weak test"


def test_batched_equals_one_at_a_time(tiny_gqa):
    model, processor = tiny_gqa.mlx
    _, _, prompt = _prompt(model, processor, "r1-aqa")
    options = scoring.option_ids(processor, prompt, ITEM["choices"], "r1-aqa")
    pre = prefill(model, prompt)
    delta = mx.array(np.random.default_rng(0).standard_normal(model.config.text_config.hidden_size).astype(np.float32))
    rows = [Row(), Row(delta, True), Row(0.5 * delta, False)]
    together, tok = scoring.score_options(model, pre, options, rows, per_token=True)
    for i, o in enumerate(options):
        for r, row in enumerate(rows):
            alone = scoring.score_options(model, pre, [o], [row])
            assert abs(alone[0, 0] - together[r, i]) <= 1e-6, (i, r)
    # few rows of logits at a time: the same numbers
    vocab = model.config.text_config.vocab_size
    chunked = scoring.score_options(model, pre, options, rows, chunk_elements=3 * vocab)
    assert np.abs(chunked - together).max() <= 1e-6
    assert np.allclose(together, np.nansum(tok.astype(np.float64), -1))
    # one-token options need no forward beyond the prefill: the log-softmax at T
    lm = model.language_model
    logits = lm.unembed(pre.final[None]).astype(mx.float32)
    at_T = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))[0]
    single = scoring.score_options(model, pre, [[5], [17], [200]])
    assert np.abs(single[0] - at_T[[5, 17, 200]]).max() <= 1e-6


@pytest.mark.slow
def test_shared_forward_equals_hooked_steering(tiny):
    """Rows built as `Answerer` builds them (one prefill, one silence pass) score as each steering
    configuration applied through hooks over its own prefill; alpha 0 is bit-identical to none."""
    model, processor = tiny.mlx
    _, _, prompt = _prompt(model, processor, "r1-aqa")
    options = scoring.option_ids(processor, prompt, ITEM["choices"], "r1-aqa")
    v = np.random.default_rng(1).standard_normal(model.config.text_config.hidden_size).astype(np.float32)
    configs = {"a0": SteerConfig(layers=[0, 1], alpha=0.0), "a1.5": SteerConfig(layers=[0, 1], alpha=1.5),
               "a4": SteerConfig(layers=[1], alpha=4.0), "prompt": SteerConfig(layers=[0, 1], alpha=3.0, at="prompt"),
               "vector": SteerConfig(vector=v, alpha=0.3)}
    pre = prefill(model, prompt, layers=[0, 1])
    silence = Silence(model).residuals(prompt, [0, 1])
    rows = [Row()]
    for cfg in configs.values():
        rows.append(Row(Steerer(model, cfg).delta(pre.resid, silence, pre.final), every_step=cfg.at == "all"))
    shared = scoring.score_options(model, pre, options, rows)
    plain = scoring.score_prompt(model, prompt, options)
    assert np.array_equal(shared[0], plain[0])
    assert np.array_equal(shared[1], shared[0]), "alpha 0: bit-identical to the plain model"
    for k, (name, cfg) in enumerate(configs.items(), start=1):
        with Steerer(model, cfg).applied(prompt):
            hooked = scoring.score_prompt(model, prompt, options)
        assert np.abs(hooked[0] - shared[k]).max() <= 1e-6, name
        if name == "a0":
            assert np.array_equal(hooked[0], plain[0])
        else:
            assert np.abs(shared[k] - shared[0]).max() > 0.01, f"{name} changed nothing: a weak test"
    zero = scoring.score_options(model, pre, options, [Row(mx.zeros_like(pre.final), True)])
    assert np.array_equal(zero, plain)


def test_prefill_is_left_for_decoding(tiny_gqa):
    """Scoring does not touch the prefill's cache: the same prefill then decodes the greedy answer."""
    model, processor = tiny_gqa.mlx
    _, _, prompt = _prompt(model, processor, "r1-aqa")
    pre = prefill(model, prompt)
    offsets = [c.offset for c in pre.cache]
    scoring.option_logprobs(model, processor, prompt, ITEM["choices"], "r1-aqa", pre=pre)
    assert [c.offset for c in pre.cache] == offsets
    assert decode(model, processor, pre, [Row()], 12)[0].tokens == generate(model, processor, prompt, max_tokens=12).tokens


def test_continuation_tokenisation(tiny):
    """ids(prompt) + ids(continuation) is what tokenising the prompt and the answer as one text gives."""
    model, processor = tiny.mlx
    for preset in presets.PROMPTS:
        _, q, prompt = _prompt(model, processor, preset)
        text = processor.render(messages_for(q, 1))
        text = text.replace(AUDIO, AUDIO * prompt.n_audio_tokens)
        for c, ids in zip(ITEM["choices"], scoring.option_ids(processor, prompt, ITEM["choices"], preset)):
            joint = list(processor.tokenizer.encode(text + presets.continuation(preset, c), add_special_tokens=True))
            assert joint == prompt.ids + ids, (preset, c)
    assert presets.continuation("r1-aqa-think", " Man ") == "<answer>Man</answer>"
    assert presets.continuation("mmau", "Man") == "Man"
    eos = processor.tokenizer.eos_token_id
    assert scoring.option_ids(processor, prompt, ["Man"], "mmau", end=True)[0][-1] == eos


@pytest.mark.torch
def test_every_mmau_choice_starts_a_pretoken():
    """Under Qwen2's pre-tokenizer (the tiny tokenizer's, the real model's regex) the join of
    `assistant\\n` and every MMAU continuation is a pre-token boundary: BPE merges never cross it, so
    a continuation encoded on its own is the joint text's tail with the real vocabulary too."""
    from mlx_listen_convert.reference.tiny import build_tokenizer

    pre_tok = build_tokenizer().backend_tokenizer.pre_tokenizer
    head = "assistant\n"
    seen = set()
    for f in ("mmau-test-mini.json", "mmau-test-mini-pre-v05.15.25.json"):
        for it in json.loads((DATA / "mmau" / f).read_text()):
            for c in it["choices"]:
                for preset in ("r1-aqa", "mmau"):
                    seen.add(presets.continuation(preset, c))
    assert len(seen) > 3000
    bad = [t for t in seen if not any(e == len(head) for _, (_, e) in pre_tok.pre_tokenize_str(head + t))]
    assert bad == []


@pytest.mark.torch
def test_a_merging_join_uses_the_texts_own_tokens():
    """A text that would merge with the prompt's last token (a leading newline, with a `\\n\\n`
    merge in the vocabulary) cannot share the prompt's tokens: its own ids are scored, with a warning."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    vocab["ĊĊ"] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[("Ċ", "Ċ")], unk_token=None, eos_token="<|im_end|>")
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|im_start|>", "<|im_end|>")],
                   special_tokens=True)

    class P:
        tokenizer = TokenizerWrapper(tok)

    prompt_ids = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    assert scoring.continuation_ids(P, prompt_ids, "<answer>Man</answer>") == tok.encode("<answer>Man</answer>")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = scoring.continuation_ids(P, prompt_ids, "\nMan")
    assert ids == tok.encode("\nMan") and any(issubclass(w.category, ListenWarning) for w in caught)
    assert tok.encode("assistant\n\nMan")[-4] == vocab["ĊĊ"], "the join does merge: a weak test"


def test_margin_choice_and_probs():
    lp = np.array([[-3.0, -1.0, -2.5], [-0.5, -4.0, -1.0]])
    assert list(scoring.choice(lp)) == [1, 0] and scoring.choice(lp[0]) == 1
    assert np.allclose(scoring.margin(lp, 0), [-2.0, 0.5])
    assert scoring.margin(lp[0], 1) == 1.5 and scoring.margin(lp[0], 2) == -1.5
    assert np.isnan(scoring.margin(np.array([-1.0]), 0))
    p = scoring.option_probs(lp)
    assert np.allclose(p.sum(-1), 1) and np.allclose(np.log(p[0] / p[0, 0]), lp[0] - lp[0, 0])
    assert scoring.choice(np.array([-1.0, -1.0])) == 0  # ties: the first


@pytest.mark.slow
def test_answerer_scores_every_condition_from_its_prefill(tiny_gqa, monkeypatch):
    from contextlib import contextmanager

    from mlx_listen.eval import conditions
    from mlx_listen.eval.conditions import Answerer, Condition, baseline, steered

    model, processor = tiny_gqa.mlx
    _, _, prompt = _prompt(model, processor, "r1-aqa")
    options = scoring.option_ids(processor, prompt, ITEM["choices"], "r1-aqa")

    def ablate(z, point):
        return mx.where(mx.array(np.arange(z.shape[2]) != 1)[None, None, :, None], z, mx.zeros_like(z))

    @contextmanager
    def ablated(model, prompt):
        with model.hooks.using([("decoder.blocks.0.attn.hook_z", ablate)]):
            yield

    cfgs = {"a2": SteerConfig(layers=[0, 1], alpha=2.0), "p3": SteerConfig(layers=[0], alpha=3.0, at="prompt")}
    conds = [baseline()] + [steered(c, n) for n, c in cfgs.items()] + [Condition("ablated", intervene=ablated)]
    answerer = Answerer(model, processor, conds, max_tokens=8)
    calls = []
    real = conditions.prefill
    monkeypatch.setattr(conditions, "prefill", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = answerer.respond(prompt, options)
    assert len(calls) == 2, "one prefill for the shared conditions, one for the ablation"
    answers = Answerer(model, processor, conds, max_tokens=8)(prompt)
    assert np.array_equal(got["base"].logprobs, scoring.score_prompt(model, prompt, options)[0])
    for name, cfg in cfgs.items():
        with Steerer(model, cfg).applied(prompt):
            assert np.abs(got[name].logprobs - scoring.score_prompt(model, prompt, options)[0]).max() <= 1e-6
    with ablated(model, prompt):
        assert np.array_equal(got["ablated"].logprobs, scoring.score_prompt(model, prompt, options)[0])
    for name in got:
        assert got[name].answer.tokens == answers[name].tokens, name
    only = answerer.score(prompt, options, only=["a2"])
    assert list(only) == ["a2"] and np.array_equal(only["a2"], got["a2"].logprobs)
