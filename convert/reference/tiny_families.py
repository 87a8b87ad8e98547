"""Tiny random Audio Flamingo 3 and Qwen2.5-Omni checkpoints, built with transformers in the hub's key
layout, for tests and benchmarks (the Qwen2-Audio ones are `tiny.build_tiny`).

- AF3: `AudioFlamingo3ForConditionalGeneration.save_pretrained` (the hub's names: `audio_tower.*`,
  `multi_modal_projector.linear_{1,2}.*`, `language_model.*`), the processor with the hub conversion
  script's chat templates (one `<sound>` before the turn's text), learned encoder positions made random.
- Omni: the whole `Qwen2_5OmniForConditionalGeneration` (thinker, talker, token2wav, all tiny), saved in
  the hub layout (`thinker.audio_tower.*`, `thinker.model.*`, `thinker.lm_head.*`, `thinker.visual.*`,
  `talker.*`, `token2wav.*`), its config.json rewritten in the hub's older style (`Qwen2_5OmniModel`,
  `rope_scaling.mrope_section`, `rope_theta`, `torch_dtype`), a 4.x `preprocessor_config.json`
  (`chunk_length` 300) and the hub's chat template in `chat_template.json`.

Both use a byte-level tokenizer (1 byte = 1 token) with the family's special tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

QWEN = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
AF3_SPECIALS = QWEN + ["<sound>"]
OMNI_SPECIALS = QWEN + ["<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<|vision_bos|>", "<|vision_eos|>",
                        "<|IMAGE|>", "<|VIDEO|>"]
OMNI_TOKEN_ATTRS = {"audio_token": "<|AUDIO|>", "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>",
                    "image_token": "<|IMAGE|>", "video_token": "<|VIDEO|>", "vision_bos_token": "<|vision_bos|>",
                    "vision_eos_token": "<|vision_eos|>"}

# The hub conversion script's templates (transformers' convert_audioflamingo3_to_hf.py).
AF3_TOKENIZER_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}{% for message in messages if message['content'] is not none %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
AF3_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages if m['content'] is not none %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% set audio = namespace(found=False) %}{% set text_buf = namespace(v='') %}"
    "{% for c in m['content'] %}{% if c.get('type') == 'audio' or 'audio' in c %}{% set audio.found = True %}"
    "{% elif c.get('type') == 'text' or 'text' in c %}{% set text_buf.v = text_buf.v + c['text'] %}{% endif %}"
    "{% endfor %}{% if audio.found %}{{ '<sound>' }}{% endif %}{{ text_buf.v }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# The hub's Qwen2.5-Omni template (chat_template.json of Qwen/Qwen2.5-Omni-7B).
OMNI_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}{% if add_audio_id %}Audio {{ audio_count.value }}: "
    "{% endif %}<|audio_bos|><|AUDIO|><|audio_eos|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_bos|><|VIDEO|><|vision_eos|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_tokenizer(specials: list[str], extra: dict | None = None, template: str | None = None):
    """A Qwen2 byte-level tokenizer (no merges) with `specials` after the 256 bytes."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    for t in specials:
        vocab[t] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                         extra_special_tokens=extra or {})
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials], special_tokens=True)
    if template is not None:
        tok.chat_template = template
    return tok


def _text(tok, *, hidden, intermediate, layers, heads, kv_heads, init_range, **extra):
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN}
    return dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, rms_norm_eps=1e-6,
                max_position_embeddings=32768, initializer_range=init_range, bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], **extra), ids


def _generation(model, ids):
    g = model.generation_config
    g.eos_token_id = [ids["<|endoftext|>"], ids["<|im_end|>"]]
    g.pad_token_id = g.bos_token_id = ids["<|endoftext|>"]
    g.do_sample = False


def build_tiny_af3(out, *, kv_heads=2, heads=4, hidden=64, intermediate=128, layers=2, encoder_layers=2,
                   encoder_heads=2, d_model=32, encoder_ffn=64, init_range=0.02, seed=0, shard: str | None = None,
                   attn_implementation="sdpa"):
    """A random Audio Flamingo 3 in the hub layout; `shard` ("20KB") writes several weight files.
    Returns `(model, processor)` (torch)."""
    import torch
    from transformers import (
        AudioFlamingo3Config,
        AudioFlamingo3ForConditionalGeneration,
        AudioFlamingo3Processor,
        WhisperFeatureExtractor,
    )

    out = Path(out)
    tok = byte_tokenizer(AF3_SPECIALS, template=AF3_TOKENIZER_TEMPLATE)
    proc = AudioFlamingo3Processor(feature_extractor=WhisperFeatureExtractor(feature_size=128, return_attention_mask=True),
                                   tokenizer=tok, chat_template=AF3_TEMPLATE)
    text, ids = _text(tok, hidden=hidden, intermediate=intermediate, layers=layers, heads=heads, kv_heads=kv_heads,
                      init_range=init_range, rope_theta=1000000.0, tie_word_embeddings=False)
    cfg = AudioFlamingo3Config(
        audio_config=dict(model_type="audioflamingo3_encoder", num_mel_bins=128, num_hidden_layers=encoder_layers,
                          num_attention_heads=encoder_heads, intermediate_size=encoder_ffn, hidden_size=d_model,
                          max_source_positions=1500, initializer_range=init_range),
        text_config=dict(model_type="qwen2", **text), audio_token_id=tok.convert_tokens_to_ids("<sound>"))
    torch.manual_seed(seed)
    model = AudioFlamingo3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # learned positions: random, so a port that recomputes sinusoids cannot pass
        pos = model.model.audio_tower.embed_positions.weight
        pos.copy_(torch.randn_like(pos) * init_range)
    _generation(model, ids)
    model.save_pretrained(out, **({"max_shard_size": shard} if shard else {}))
    proc.save_pretrained(out)
    _attn(model, attn_implementation)
    return model, proc


def build_tiny_omni(out, *, kv_heads=2, heads=4, hidden=64, intermediate=128, layers=2, encoder_layers=2,
                    encoder_heads=2, d_model=32, encoder_ffn=64, n_window=8, init_range=0.02, seed=0,
                    shard: str | None = None, legacy_config: bool = True, attn_implementation="sdpa"):
    """A random Qwen2.5-Omni (thinker, talker, token2wav) in the hub layout; `n_window` makes the encoder's
    chunks 2·n_window frames. Returns `(thinker, processor)` (torch): the thinker is what mlx-listen runs."""
    import torch
    from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration

    out = Path(out)
    tok = byte_tokenizer(OMNI_SPECIALS, extra=OMNI_TOKEN_ATTRS)
    head_dim = hidden // heads
    section = [head_dim // 8, head_dim // 8 * 3 // 2, head_dim // 2 - head_dim // 8 - head_dim // 8 * 3 // 2]
    rope = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": section}
    text, ids = _text(tok, hidden=hidden, intermediate=intermediate, layers=layers, heads=heads, kv_heads=kv_heads,
                      init_range=init_range, rope_parameters=rope, tie_word_embeddings=False)
    thinker = dict(
        audio_config=dict(num_mel_bins=128, encoder_layers=encoder_layers, encoder_attention_heads=encoder_heads,
                          encoder_ffn_dim=encoder_ffn, d_model=d_model, n_window=n_window, output_dim=hidden,
                          max_source_positions=1500, initializer_range=init_range),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=hidden,
                           fullatt_block_indexes=[0], initializer_range=init_range),
        text_config=text, audio_token_index=tok.convert_tokens_to_ids("<|AUDIO|>"),
        audio_start_token_id=tok.convert_tokens_to_ids("<|audio_bos|>"),
        audio_end_token_id=tok.convert_tokens_to_ids("<|audio_eos|>"),
        image_token_index=tok.convert_tokens_to_ids("<|IMAGE|>"), video_token_index=tok.convert_tokens_to_ids("<|VIDEO|>"),
        # in the hub's thinker_config too; transformers' rope index reads them
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_bos|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_eos|>"),
        user_token_id=0, initializer_range=init_range, tie_word_embeddings=False)
    special = dict(tts_text_start_token_id=1, tts_text_end_token_id=2, tts_text_pad_token_id=3,
                   tts_codec_start_token_id=4, tts_codec_end_token_id=5, tts_codec_pad_token_id=6,
                   tts_codec_mask_token_id=7, vision_start_token_id=8, vision_end_token_id=9,
                   audio_start_token_id=10, audio_end_token_id=11, audio_token_index=12, image_token_index=13,
                   video_token_index=14)
    talker = dict(vocab_size=64, embedding_size=hidden, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, head_dim=16, rope_parameters=dict(rope, mrope_section=[2, 3, 3]),
                  **special)
    t2w = dict(dit_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=16, emb_dim=16,
                               enc_emb_dim=16, enc_dim=16, enc_channels=[16, 16, 16, 16, 32], enc_attention_channels=8,
                               mel_dim=16, num_embeds=64, repeats=1),
               bigvgan_config=dict(mel_dim=16, upsample_initial_channel=32, resblock_kernel_sizes=[3],
                                   resblock_dilation_sizes=[[1, 3, 5]], upsample_rates=[2], upsample_kernel_sizes=[4]))
    cfg = Qwen2_5OmniConfig(thinker_config=thinker, talker_config=talker, token2wav_config=t2w)
    torch.manual_seed(seed)
    model = Qwen2_5OmniForConditionalGeneration(cfg).eval()
    _generation(model, ids)
    model.save_pretrained(out, **({"max_shard_size": shard} if shard else {}))
    del model
    if legacy_config:
        _write_legacy_omni_config(out)
    _write_omni_processor(out, tok)
    th, proc = load_omni(out)
    _attn(th, attn_implementation)
    return th, proc


def load_omni(path, dtype=None, attn="sdpa"):
    """The thinker of a Qwen2.5-Omni folder (transformers' way for a hub checkpoint) and its processor."""
    from transformers import Qwen2_5OmniConfig, Qwen2_5OmniThinkerForConditionalGeneration

    cfg = Qwen2_5OmniConfig.from_pretrained(path)
    kw = {"dtype": dtype} if dtype is not None else {}
    th = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(path, config=cfg.thinker_config,
                                                                      attn_implementation=attn, **kw).eval()
    return th, omni_processor(path)


def omni_processor(path):
    """`Qwen2_5OmniProcessor` of a folder. Without torchvision (its video processor needs it) the processor is
    assembled from the folder's tokenizer, feature extractor and chat template, with inert image and video
    processors: the audio path, all mlx-listen uses, is transformers' own."""
    from transformers import AutoProcessor, AutoTokenizer, Qwen2_5OmniProcessor, WhisperFeatureExtractor

    try:
        return AutoProcessor.from_pretrained(path)
    except (ImportError, AttributeError, TypeError, ValueError):
        pass
    from transformers import Qwen2VLImageProcessor
    from transformers.video_processing_utils import BaseVideoProcessor

    from mlx_listen.chat import find_chat_template

    tok = AutoTokenizer.from_pretrained(path)
    fe = WhisperFeatureExtractor.from_pretrained(path)
    original = Qwen2_5OmniProcessor.check_argument_for_proper_class

    def check(self, name, arg):  # the only class torchvision's absence makes uncheckable
        return type(arg) if name == "video_processor" else original(self, name, arg)

    Qwen2_5OmniProcessor.check_argument_for_proper_class = check
    try:
        return Qwen2_5OmniProcessor(image_processor=Qwen2VLImageProcessor(), video_processor=BaseVideoProcessor(),
                                    feature_extractor=fe, tokenizer=tok, chat_template=find_chat_template(Path(path)))
    finally:
        Qwen2_5OmniProcessor.check_argument_for_proper_class = original


def _write_omni_processor(out: Path, tok):
    from transformers import WhisperFeatureExtractor

    tok.save_pretrained(out)
    fe = WhisperFeatureExtractor(feature_size=128, chunk_length=300, return_attention_mask=True)
    d = json.loads(fe.to_json_string())
    d["processor_class"] = "Qwen2_5OmniProcessor"
    (out / "preprocessor_config.json").write_text(json.dumps(d, indent=2))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": OMNI_TEMPLATE}, indent=2))
    for f in ("chat_template.jinja",):  # the tokenizer's copy, if any: the hub ships chat_template.json
        (out / f).unlink(missing_ok=True)


def _write_legacy_omni_config(out: Path):
    """config.json the way the hub's file is written: `Qwen2_5OmniModel`, `rope_scaling` with the
    mrope section, `rope_theta` and `torch_dtype` (4.x era)."""
    cfg = json.loads((out / "config.json").read_text())
    cfg["architectures"] = ["Qwen2_5OmniModel"]
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    for sub in ("thinker_config", "talker_config"):
        c = cfg[sub]
        text = c.get("text_config", c)
        rope = text.pop("rope_parameters", None) or {}
        text["rope_theta"] = rope.get("rope_theta", 1000000.0)
        text["rope_scaling"] = {"mrope_section": rope.get("mrope_section"), "rope_type": "default", "type": "default"}
        text.pop("layer_types", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))


def _attn(model, attn):
    model.config._attn_implementation = attn
    for sub in ("text_config", "audio_config"):
        if getattr(model.config, sub, None) is not None:
            getattr(model.config, sub)._attn_implementation = attn
