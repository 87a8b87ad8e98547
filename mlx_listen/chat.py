"""The chat template and the audio placeholder's expansion, token for token as HF's processors (MLX-free).

Every family's processor renders the folder's chat template, replaces the i-th audio placeholder
(the family's: `<|AUDIO|>` for Qwen2-Audio and Qwen2.5-Omni, `<sound>` for Audio Flamingo 3) with
one copy per audio token of the i-th clip, then tokenises. We do the same, through the tokenizer,
with the template the folder ships (`chat_template.jinja`, `chat_template.json`,
`processor_config.json` or `tokenizer_config.json`). Where the template puts each clip's
placeholder (Qwen2-Audio: `Audio 1: <|audio_bos|>…<|audio_eos|>\n` before the text; Omni:
`<|audio_bos|>…<|audio_eos|>` then the text; AF3: one `<sound>` before the turn's text) is the
template's business, never ours. Only Qwen2-Audio's hub repos ship no template: its processor's
built-in default applies (`render_default`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from .errors import ListenError

AUDIO = "<|AUDIO|>"
DEFAULT_SYSTEM = "You are a helpful assistant."


def messages_for(question: str, n_clips: int, system: str | None = None) -> list[dict]:
    """One user turn: each clip, then the question (the layout of the Qwen and MMAU examples)."""
    msgs = [{"role": "system", "content": system}] if system is not None else []
    content = [{"type": "audio", "audio": f"clip{i}"} for i in range(n_clips)]
    content.append({"type": "text", "text": question})
    msgs.append({"role": "user", "content": content})
    return msgs


def render_default(messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """The processor's built-in template (transformers' `default_chat_template`), in Python."""
    out, n_audio = [], 0
    for i, m in enumerate(messages):
        if i == 0 and m["role"] != "system":
            out.append(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n")
        out.append(f"<|im_start|>{m['role']}\n")
        if isinstance(m["content"], str):
            out.append(f"{m['content']}<|im_end|>\n")
            continue
        for part in m["content"]:
            if "audio" in part or "audio_url" in part or part.get("type") == "audio":
                n_audio += 1
                out.append(f"Audio {n_audio}: <|audio_bos|>{AUDIO}<|audio_eos|>\n")
            elif "text" in part:
                out.append(part["text"])
        out.append("<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


def find_chat_template(path: Path) -> str | None:
    """A chat template shipped with the model folder, if any (else the built-in default)."""
    if (path / "chat_template.jinja").exists():
        return (path / "chat_template.jinja").read_text()
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        f = path / name
        if f.exists():
            t = json.loads(f.read_text()).get("chat_template")
            if isinstance(t, str):
                return t
    return None


class Processor:
    """Tokenizer + chat template: messages and per-clip audio-token counts → input ids.

    `placeholder`: the family's audio token; `family`: its name for messages. Without a template only
    Qwen2-Audio renders (its processor's built-in default); any other family needs the folder's."""

    def __init__(self, tokenizer, chat_template: str | None = None, placeholder: str = AUDIO,
                 family: str = "Qwen2-Audio", builtin: bool = True):
        self.tokenizer = tokenizer  # mlx-lm TokenizerWrapper (streaming detokenizer, eos ids)
        self.chat_template = chat_template
        self.placeholder, self.family = placeholder, family
        if chat_template is None and not builtin:
            raise ListenError(f"the model folder ships no chat template ({family} has no built-in one); copy "
                              "chat_template.jinja (or chat_template.json) from the original checkpoint")
        self.audio_token_id = tokenizer.convert_tokens_to_ids(placeholder)
        if self.audio_token_id is None or self.audio_token_id == getattr(tokenizer, "unk_token_id", None):
            raise ListenError(f"the tokenizer has no {placeholder} token: not a {family} tokenizer (wrong or "
                              "incomplete tokenizer files?)")

    def render(self, messages: Sequence[dict]) -> str:
        if self.chat_template is None:
            return render_default(messages)
        try:
            return self.tokenizer.apply_chat_template(
                list(messages), chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
            )
        except Exception as e:  # jinja2's TemplateError and friends: a broken template file
            raise ListenError(f"the model's chat template cannot be rendered ({type(e).__name__}: {e})") from None

    def encode(self, messages: Sequence[dict], audio_tokens: Sequence[int]) -> list[int]:
        """Render, expand the i-th audio placeholder to `audio_tokens[i]` copies, tokenise."""
        text = self.render(messages)
        parts = text.split(self.placeholder)
        if len(parts) - 1 != len(audio_tokens):
            one = (f" ({self.family}'s chat template places one audio placeholder per turn)"
                   if len(parts) == 2 and len(audio_tokens) > 1 else "")
            raise ListenError(f"the prompt has {len(parts) - 1} audio placeholders but {len(audio_tokens)} clips "
                              f"were given{one}")
        expanded = parts[0] + "".join(self.placeholder * n + p for n, p in zip(audio_tokens, parts[1:]))
        return list(self.tokenizer.encode(expanded, add_special_tokens=True))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)
