"""A token's exact bytes, for the `bytes` field of OpenAI logprobs: a byte-level BPE token (Qwen's,
GPT-2's) may hold part of a UTF-8 character, which its decoded text cannot show."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's reversible map of bytes to printable characters, inverted."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars)}


def token_bytes(tokenizer, token: int) -> bytes:
    """The bytes of one token: its byte-level piece mapped back to bytes; a special or added token,
    or a tokenizer without byte-level pieces, as the UTF-8 of its text."""
    dec = _byte_decoder()
    try:
        piece = tokenizer.convert_ids_to_tokens(int(token))
    except Exception:  # an id the tokenizer does not know
        piece = None
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    if isinstance(piece, str) and piece and int(token) not in special and all(ch in dec for ch in piece):
        return bytes(dec[ch] for ch in piece)
    return tokenizer.decode([int(token)]).encode("utf-8")
