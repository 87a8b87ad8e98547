"""Answering several conditions at once (`eval/conditions.py`: one prefill and one silence pass
shared by the baseline and every steered row, ablations with their own prefill, one batched
decode): row for row, the tokens of each condition answered alone; and the audio mass recorded
while answering."""

from __future__ import annotations

import numpy as np
import pytest
from support import tone
from support.heads import MAX_TOKENS

from mlx_listen.answers import generate
from mlx_listen.eval.conditions import Answerer, Condition, baseline, steered
from mlx_listen.hooks import AUDIO_MASS, PATTERN, run_with_cache
from mlx_listen.interp.ablation import Ablation
from mlx_listen.interp.steering import SteerConfig, Steerer
from mlx_listen.presets import build_prompt
from mlx_listen.prompt import prepare

Q = "Describe the audio."
HEADS = [(0, 1), (1, 0), (1, 3)]


@pytest.mark.slow
def test_shared_prefill_gives_the_tokens_of_each_steered_answer(tiny):
    """Baseline, several alphas, prompt-only steering, a random-layer set, a vector and listening
    strength answered together (one prefill, one silence pass, one batched decode) give, row for
    row, the tokens and text of each answered alone through hooks."""
    model, processor = tiny.mlx
    prompt = prepare(model, processor, [tone(2.5)], Q)
    v = np.random.default_rng(1).standard_normal(model.config.text_config.hidden_size).astype(np.float32)
    mass = run_with_cache(model, prompt, "decoder.blocks.*.attn.hook_audio_mass")[1].audio_mass(prompt.last)
    heads = [(0, 1), (1, 2)]
    configs = {f"a{a}": SteerConfig(layers=[0, 1], alpha=a) for a in (0.5, 1.0, 2.0, 4.0)}
    configs["prompt"] = SteerConfig(layers=[0, 1], alpha=3.0, at="prompt")
    configs["layer0"] = SteerConfig(layers=[0], alpha=2.0)
    configs["vector"] = SteerConfig(vector=v, alpha=0.3)
    configs["listening"] = SteerConfig(layers=[1], alpha=1.0, strength="listening", heads=heads,
                                       listening_mean=float(mass[0, 1] + mass[1, 2]))  # 2x L(x): alpha doubled
    conds = [baseline()] + [steered(c, name) for name, c in configs.items()]
    answerer = Answerer(model, processor, conds, max_tokens=20)
    calls = []
    real = answerer.silence.residuals
    answerer.silence.residuals = lambda *a: calls.append(a[1]) or real(*a)
    together = answerer(prompt)
    assert calls == [[0, 1]], "one silence pass over the union of the read layers"
    assert together["base"].tokens == generate(model, processor, prompt, max_tokens=20).tokens
    changed = 0
    for name, cfg in configs.items():
        alone = Steerer(model, cfg).generate(processor, prompt, max_tokens=20)
        assert together[name].tokens == alone.tokens, name
        assert together[name].text == alone.text and together[name].finish_reason == alone.finish_reason
        changed += together[name].tokens != together["base"].tokens
    assert changed >= 1, "steering changed no answer: a weak test"
    assert together["a1.0"].timing["batch"] == len(conds)


def test_rows_leave_the_batch_at_eos(tiny_gqa, monkeypatch):
    """Rows that end early (eos) leave the batch; the others go on with the same tokens."""
    model, processor = tiny_gqa.mlx
    prompt = prepare(model, processor, [tone(2.5)], Q)
    conds = [baseline()] + [steered(SteerConfig(layers=[0, 1], alpha=a), f"a{a}") for a in (1.0, 4.0)]
    free = Answerer(model, processor, conds, max_tokens=16)(prompt)
    stop = free["a4.0"].tokens[3]  # make a token of one row an eos: that row ends there
    eos = set(processor.tokenizer.eos_token_ids) | {stop}
    monkeypatch.setattr(type(processor.tokenizer), "eos_token_ids", property(lambda self: eos), raising=False)
    ended = Answerer(model, processor, conds, max_tokens=16)(prompt)
    for name, ans in free.items():
        cut = next((i for i, t in enumerate(ans.tokens) if t in eos), None)
        want = ans.tokens if cut is None else ans.tokens[:cut]
        assert ended[name].tokens == want, name
        assert ended[name].finish_reason == ("length" if cut is None else "stop")
        alone = (generate(model, processor, prompt, max_tokens=16) if name == "base"
                 else Steerer(model, conds[[c.name for c in conds].index(name)].steer).generate(
                     processor, prompt, max_tokens=16))
        assert alone.tokens == want, name
    assert ended["a4.0"].finish_reason == "stop"


def test_ablated_condition_in_an_answerer(tiny_gqa):
    """An ablation is a condition with its own prefill, answered beside the shared baseline."""
    model, processor = tiny_gqa.mlx
    prompt = prepare(model, processor, [tone(2.0)], Q)
    spec = Ablation(HEADS, mode="zero")
    got = Answerer(model, processor, [baseline(), Condition("ablate", intervene=spec.hooks,
                                                            settings={"ablation": spec.to_json()})],
                   max_tokens=12)(prompt)
    with spec.hooks(model, prompt):
        alone = generate(model, processor, prompt, max_tokens=12).tokens
    assert got["ablate"].tokens == alone
    assert got["base"].tokens == generate(model, processor, prompt, max_tokens=12).tokens


@pytest.mark.slow
def test_mass_captured_during_generation_equals_prefill_capture(demo, tiny_gqa):
    from mlx_listen.answers import generate
    from mlx_listen.audio import load_audio
    from mlx_listen.hooks import run_with_cache
    from mlx_listen.prompt import prepare

    model, processor = tiny_gqa.mlx
    root, _, items = demo
    for item in items[:3]:
        prompt = prepare(model, processor, [load_audio(root / item["audio_id"])], build_prompt(item))
        T = len(prompt.ids) - 1
        from mlx_listen.eval.conditions import Answerer, baseline

        ans = Answerer(model, processor, [baseline()], max_tokens=MAX_TOKENS, audio_mass=True)(prompt)["base"]
        mass = ans.audio_mass
        assert ans.text == generate(model, processor, prompt, max_tokens=MAX_TOKENS, temp=0.0).text
        _, cap = run_with_cache(model, prompt, [AUDIO_MASS.format("*"), PATTERN.format("*")], at=slice(0, None))
        prefill = cap.audio_mass(T)
        assert mass.shape == prefill.shape == (len(model.layers), model.config.text_config.num_attention_heads)
        assert np.abs(mass - prefill).max() < 1e-6
        # the definition, from the full pattern: row T summed over the <|AUDIO|> positions
        pattern = np.stack([np.array(cap.get(PATTERN.format(l))[0]) for l in range(len(model.layers))])  # (L, n, H, S)
        assert np.abs(pattern[:, T][..., prompt.audio_positions].sum(-1) - mass).max() < 1e-6
        assert 0.02 < mass.min() and mass.max() < 0.98  # heads split attention: a real test
