"""What the viewer shows for one question about one clip, computed with the library's own pieces:
the answer with its listening score per token, where each answer token looked in the clip, every
head's audio mass, and the same question answered with silence, steered and ablated (with each
choice's log-probability when the question has options). Everything is JSON: `view.render`
embeds it in the page.

Cost: one prefill for the plain, steered and ablated answers' shared work (`Answerer`), one for the
silence, and one teacher-forced pass over the answer to read the specialist heads' attention rows
onto the audio (only those rows: the `hook_pattern` derived point at the answer's positions)."""

from __future__ import annotations

import base64
import platform
import time
import warnings
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import numpy as np

from .. import __version__
from ..answers import detokenize
from ..audio import SAMPLE_RATE
from ..errors import ListenWarning
from ..eval.conditions import Answerer, ablated, baseline, steered
from ..headset import HeadSet
from ..hooks import PATTERN, Capture
from ..identity import check_binding, model_signature
from ..interp.ablation import Ablation
from ..interp.scoring import option_ids
from ..load import ModelRef
from ..method.directions import from_heads
from ..prompt import prepare

WAVE_BINS = 900  # the waveform's envelope: one min/max pair per pixel column


def waveform(samples: np.ndarray, bins: int = WAVE_BINS) -> dict:
    """Min and max of each of `bins` equal stretches of the clip (an envelope the page draws)."""
    x = np.asarray(samples, np.float32)
    edges = np.linspace(0, x.size, min(bins, max(1, x.size)) + 1).astype(int)
    lo = [float(x[a:b].min()) if b > a else 0.0 for a, b in zip(edges[:-1], edges[1:])]
    hi = [float(x[a:b].max()) if b > a else 0.0 for a, b in zip(edges[:-1], edges[1:])]
    peak = max(1e-9, max(abs(v) for v in lo + hi))
    return {"min": [round(v / peak, 4) for v in lo], "max": [round(v / peak, 4) for v in hi], "peak": peak}


def mel_image(mel: mx.array, n_frames: int) -> dict:
    """The valid frames of a log-mel (n_mels, frames) as 8-bit rows, frames first, base64."""
    m = np.array(mel[:, :n_frames].astype(mx.float32)).T  # (frames, n_mels)
    lo, hi = float(m.min()), float(m.max())
    q = np.round((m - lo) / max(hi - lo, 1e-9) * 255).astype(np.uint8)
    return {"n_mels": int(m.shape[1]), "frames": int(m.shape[0]), "min": lo, "max": hi,
            "data": base64.b64encode(q.tobytes()).decode("ascii")}


def attention_rows(model, prompt, tokens: Sequence[int], heads: Sequence[tuple[int, int]]) -> np.ndarray:
    """(answer tokens, audio tokens): the mean attention of `heads` from the position that chose
    each answer token onto each audio position (teacher-forced over the answer; one forward)."""
    T = prompt.last
    if not tokens:
        return np.zeros((0, prompt.n_audio_tokens))
    feed = prompt.embeddings[None]
    if len(tokens) > 1:
        feed = mx.concatenate([feed, model.embed_tokens(list(tokens[:-1]))[None]], axis=1)
    layers = sorted({l for l, _ in heads})
    with model.hooks.suspended(), Capture(model, [PATTERN.format(l) for l in layers],
                                          at=slice(T, T + len(tokens))) as cap:
        mx.eval(model.blocks(feed))
    audio = np.asarray(prompt.audio_positions)
    rows = [np.array(cap.get(PATTERN.format(l))[0][:, h])[:, audio] for l, h in heads]  # each (n, n_audio)
    return np.mean(rows, axis=0)


def _answer(processor, ans, logprobs=None) -> dict:
    out = {"text": ans.text, "tokens": [{"id": int(t), "text": detokenize(processor, [t]),
                                         "listening": None if ans.listening_tokens is None else
                                         round(float(ans.listening_tokens[i]), 6)}
                                        for i, t in enumerate(ans.tokens)]}
    if logprobs is not None:
        out["option_logprobs"] = [round(float(x), 6) for x in np.asarray(logprobs).reshape(-1)]
    return out


def build(model, clip, question: str, *, heads: HeadSet | None = None, choices: Sequence[str] | None = None,
          preset: str = "r1-aqa", alpha: float = 1.0, system: str | None = None, max_tokens: int = 64,
          name: str | None = None, bindings: Sequence[tuple[str, dict]] = (), force: bool = False) -> dict:
    """The viewer's record for `question` about `clip` (a path or 16 kHz samples). `heads` adds the
    listening score, the attention rows, the steered and the ablated answers; `choices` the option
    log-probs (each choice written in `preset`'s answer format). `model`: a folder, repo id or
    loaded pair (`load.ModelRef`). `bindings`: the head set's file, refused if it was found on
    another model (unless `force`)."""
    ref = ModelRef.of(model)
    samples = ref.front_end.load(clip) if isinstance(clip, (str, Path)) else np.asarray(clip, np.float32)
    mdl, processor = ref.get()
    if heads is not None:
        heads.check(mdl.n_layers, mdl.n_heads)
    for label, meta in bindings:
        for w in check_binding(meta, label, model=mdl, force=force):
            warnings.warn(w, ListenWarning, stacklevel=2)
    prompt = prepare(mdl, processor, [samples], question, system)
    conds = [baseline("audio")]
    if heads is not None:
        conds += [steered(from_heads(heads, alpha=alpha), "steered"), ablated(Ablation(heads.heads), "ablated")]
    listen = list(heads.heads) if heads is not None else []
    answer = Answerer(mdl, processor, conds, max_tokens=max_tokens, listen_heads=listen, audio_mass=True)
    options = option_ids(processor, prompt, choices, preset) if choices else None
    responses = answer.respond(prompt, options)
    silent = Answerer(mdl, processor, [baseline("silence")], max_tokens=max_tokens, silence=answer.silence)
    sil = silent.respond(answer.silence.prompt(prompt), options)["silence"]
    audio = responses["audio"].answer
    feats = prompt.clips[0]
    record = {
        "title": f"mlx-listen · {name or (Path(clip).name if isinstance(clip, (str, Path)) else 'clip')} · {question}",
        "question": question, "choices": list(choices) if choices else None,
        "clip": {"name": name or (Path(clip).name if isinstance(clip, (str, Path)) else "clip"),
                 "duration": float(feats.duration), "seconds_used": float(feats.seconds_used),
                 "audio_tokens": prompt.n_audio_tokens,
                 "seconds_per_token": float(feats.seconds_used) / max(1, prompt.n_audio_tokens),
                 "waveform": waveform(samples[: int(round(feats.seconds_used * SAMPLE_RATE))]),
                 "mel": mel_image(feats.valid(), feats.n_frames)},
        "answers": {"audio": _answer(processor, audio, responses["audio"].logprobs),
                    "silence": _answer(processor, sil.answer, sil.logprobs)},
        "audio_mass": {"data": np.round(audio.audio_mass.astype(np.float64), 6).tolist(),
                       "specialist": [list(h) for h in heads.heads] if heads is not None else []},
        "provenance": {"model": str(ref), "model_type": mdl.config.model_type,
                       "signature": model_signature(mdl)["config_hash"],
                       "heads": str(heads.path) if heads is not None and heads.path else None,
                       "mlx_listen": __version__, "mlx": mx.__version__, "python": platform.python_version(),
                       "created": time.strftime("%Y-%m-%d %H:%M:%S")},
    }
    if heads is not None:
        record["listening"] = {"heads": [list(h) for h in heads.heads], "at_T": round(float(audio.listening), 6)}
        for name_ in ("steered", "ablated"):
            r = responses[name_]
            record["answers"][name_] = _answer(processor, r.answer, r.logprobs)
        rows = attention_rows(mdl, prompt, audio.tokens, heads.heads)
        record["attention"] = {"tokens": [t["text"] for t in record["answers"]["audio"]["tokens"]],
                               "data": np.round(rows.astype(np.float64), 6).tolist()}
    return record
