"""The chat template (`mlx_listen.chat`): prompt ids against transformers' Qwen2AudioProcessor for the
same messages and clips, the built-in template, and a template that cannot be rendered."""

import shutil

import pytest
from support import invoke, tone
from support.checkpoints import model_copy
from support.cli import MAXT, Q, user_error

from mlx_listen.audio import audio_features
from mlx_listen.chat import messages_for, render_default
from mlx_listen.errors import ListenError
from mlx_listen.load import load_processor, read_config


def hf_ids(tiny, clips, question, system=None):
    from mlx_listen_convert.reference.hf import hf_inputs

    return hf_inputs(tiny.hf_processor, clips, question, system)["input_ids"][0].tolist()


CASES = [
    ([2.5], "What is making this sound?", None),
    ([1.0, 3.3], "Which clip is louder? Answer with 1 or 2.", None),
    ([0.7], "Transcribe.", "You are a careful listener."),
    ([4.0], "Ünïcödé, emoji 🎵 and\nnew lines\t— all bytes.", None),
]


@pytest.mark.torch
@pytest.mark.parametrize("secs,question,system", CASES)
def test_ids_equal_hf_processor(tiny_gqa, secs, question, system):
    clips = [tone(s, seed=i) for i, s in enumerate(secs)]
    _, processor = tiny_gqa.mlx
    ids = processor.encode(messages_for(question, len(clips), system), [audio_features(c).n_tokens for c in clips])
    assert ids == hf_ids(tiny_gqa, clips, question, system)


@pytest.mark.torch
def test_builtin_template_equals_processor_default(tiny_gqa, tmp_path):
    """Without a shipped template (the hub repos have none) the built-in rendering is used, and it
    equals the processor's default template, which the shipped one also is."""
    folder = tmp_path / "m"
    shutil.copytree(tiny_gqa.mlx_path, folder)
    (folder / "chat_template.jinja").unlink()
    proc = load_processor(folder, read_config(folder))
    assert proc.chat_template is None
    for secs, question, system in CASES:
        msgs = messages_for(question, len(secs), system)
        assert proc.render(msgs) == tiny_gqa.hf_processor.apply_chat_template(msgs, add_generation_prompt=True,
                                                                             tokenize=False)
        assert proc.render(msgs) == render_default(msgs)


def test_rendered_prompt_layout():
    text = render_default(messages_for("Q?", 2))
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nAudio 2: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
        "Q?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_clip_count_mismatch_raises(tiny_gqa):
    _, processor = tiny_gqa.mlx
    with pytest.raises(ListenError, match="placeholders"):
        processor.encode(messages_for("q", 2), [5])


def test_a_malformed_chat_template_is_a_user_error(M, files, tmp_path):
    m = model_copy(M, tmp_path / "m")
    (m / "chat_template.jinja").write_text("{% for message in %}{{ oops }")
    user_error(invoke("ask", files["a"], Q, "--model", m, "-m", MAXT), "chat template")
