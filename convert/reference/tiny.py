"""Tiny random Qwen2-Audio checkpoints, built with transformers, for tests and benchmarks.

The checkpoint is written by ``save_pretrained`` in the hub's key layout with a synthetic
byte-level tokenizer (1 byte = 1 token, the six Qwen2-Audio specials after the 256 bytes), so
everything the real model's loading path touches is exercised offline, in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"]


def build_tokenizer():
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    for t in SPECIALS:
        vocab[t] = len(vocab)
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={
            "audio_token": "<|AUDIO|>",
            "audio_bos_token": "<|audio_bos|>",
            "audio_eos_token": "<|audio_eos|>",
        },
    )
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS], special_tokens=True)
    return tok


def build_tiny(
    out: str | Path,
    *,
    kv_heads: int = 2,
    heads: int = 4,
    hidden: int = 64,
    intermediate: int = 128,
    layers: int = 2,
    encoder_layers: int = 2,
    encoder_heads: int = 2,
    d_model: int = 32,
    encoder_ffn: int = 64,
    init_range: float = 0.02,
    seed: int = 0,
    legacy_config: bool = False,
    attn_implementation: str = "sdpa",
):
    """Build and save a random Qwen2-Audio checkpoint; return ``(model, processor)`` (torch).

    ``legacy_config=True`` rewrites config.json the way the hub's file is written (4.x era:
    sparse text_config, ``rope_theta`` and ``torch_dtype``) so both reader paths are tested.
    """
    import torch
    from transformers import (
        Qwen2AudioConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        WhisperFeatureExtractor,
    )

    out = Path(out)
    tok = build_tokenizer()
    fe = WhisperFeatureExtractor(feature_size=128)
    proc = Qwen2AudioProcessor(feature_extractor=fe, tokenizer=tok)
    # Ship the processor's built-in template explicitly, as a file, like a converted repo would.
    proc.chat_template = proc.default_chat_template
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}

    cfg = Qwen2AudioConfig(
        audio_config=dict(
            model_type="qwen2_audio_encoder", num_mel_bins=128, encoder_layers=encoder_layers,
            encoder_attention_heads=encoder_heads, encoder_ffn_dim=encoder_ffn, d_model=d_model,
            max_source_positions=1500, initializer_range=init_range,
        ),
        text_config=dict(
            model_type="qwen2", vocab_size=len(tok), hidden_size=hidden,
            intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=kv_heads, rms_norm_eps=1e-5, rope_theta=10000.0,
            max_position_embeddings=8192, tie_word_embeddings=False, initializer_range=init_range,
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        audio_token_index=ids["<|AUDIO|>"],
        initializer_range=init_range,
    )
    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(cfg).eval()
    # HF's init leaves the encoder's position table at zeros/sinusoids depending on version;
    # make it random so a port that recomputes sinusoids cannot pass.
    with torch.no_grad():
        pos = model.model.audio_tower.embed_positions.weight
        pos.copy_(torch.randn_like(pos) * init_range)
    model.generation_config.eos_token_id = [ids["<|endoftext|>"], ids["<|im_end|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.bos_token_id = ids["<|endoftext|>"]
    model.generation_config.do_sample = False
    model.save_pretrained(out)
    proc.save_pretrained(out)
    if legacy_config:
        _write_legacy_config(out)
    model.config._attn_implementation = attn_implementation
    for sub in (model.config.text_config, model.config.audio_config):
        sub._attn_implementation = attn_implementation
    return model, proc


def _write_legacy_config(out: Path):
    """Rewrite config.json in the hub's sparse 4.x style, keeping only what the hub file has."""
    cfg = json.loads((out / "config.json").read_text())
    t = cfg["text_config"]
    theta = (t.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    keep = ["bos_token_id", "eos_token_id", "intermediate_size", "max_position_embeddings",
            "rms_norm_eps", "vocab_size", "hidden_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads"]
    # The hub file omits hidden size, layers and heads (Qwen2Config defaults apply); a tiny model
    # cannot use those defaults, so they stay, while everything else defaultable goes.
    text = {k: t[k] for k in keep if k in t}
    text.update(model_type="qwen2", rope_theta=theta, sliding_window=32768,
                torch_dtype="float32", use_mrope=False)
    a = cfg["audio_config"]
    audio = {k: a[k] for k in ["model_type", "num_mel_bins", "encoder_layers",
                               "encoder_attention_heads", "encoder_ffn_dim", "d_model",
                               "max_source_positions"]}
    audio.update(activation_function="gelu", scale_embedding=False)
    legacy = {
        "architectures": ["Qwen2AudioForConditionalGeneration"],
        "model_type": "qwen2_audio",
        "audio_token_index": cfg["audio_token_index"],
        "audio_config": audio,
        "text_config": text,
        "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(legacy, indent=2))
