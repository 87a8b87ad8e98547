"""A planted head: a tiny Qwen2-Audio whose answer is carried by one attention head, built by hand.

`planted_model(tmp_path)` starts from `build_tiny`'s random weights (MHA, 2 layers x 4 heads,
hidden 64, init 0.1) and rewrites a few of them in PyTorch, then saves and converts the
checkpoint, so the same model exists in both frameworks. Four residual dimensions get a meaning:

| dim | name | what writes it | what reads it |
|---|---|---|---|
| 0 | flag | the projector's bias: every audio position (real audio or silence) | the planted head's key |
| 1 | content | the projector, calibrated on the clip: about +2 for its audio, -2 for equal-length silence (mean over positions) | the planted head's value |
| 2 | answer | the planted head's `o_proj` only (every other head's and MLP's row is zero) | `lm_head`: +2 for token "x", -2 for "y" |
| 3 | bias | every text token's embedding (1.0) | `lm_head` of "y" (+4): the answer when the head is silent |

The planted head (layer 1, head 2) has a constant query and a key that reads the flag, both on
RoPE's slowest pair of dimensions (position-invariant over a short prompt), so it attends almost
only to the audio positions and averages their content; its output moves the answer direction.
With the clip the answer (at T, with the `mmau` preset whose options are "x" and "y") is "x",
with silence "y", and with that head's output zeroed at T, "y" again. Every other weight stays
random (small, init 0.1): the other heads and MLPs run, but cannot write the answer direction.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

LAYER, HEAD = 1, 2
FLAG, CONTENT, ANSWER, BIAS = 0, 1, 2, 3
QUESTION = "Which letter is it?"
CHOICES = ["x", "y"]
PRESET = "mmau"
SECONDS = 2.0


def planted_model(tmp_path, seed: int = 5):
    """Build the planted model under `tmp_path` (a few seconds).

    Returns `(model, processor, layer, head, info)`: the MLX model and processor (converted from
    the edited checkpoint), the planted head's layer and index, and `info`, a dict with:
    - `clip` (16 kHz float32 array, the calibrated clip), `wav` (the same clip written to disk),
      `question`, `choices`, `preset` ("mmau"), `item` (one MMAU-format item for that clip) and
      `data` / `audio_dir` (a one-item MMAU JSON file and its audio folder, for the CLI);
    - `tokens` ({"x": id, "y": id}), `answer_audio` ("x"), `answer_silence` ("y"),
      `answer_ablated` ("y": the head's hook_z zeroed at T);
    - `logits` (float32 numpy, last prompt position): `audio`, `silence`, `ablated`;
    - `hf_path`, `mlx_path`, `hf_model`, `hf_processor` (the PyTorch side, float32, eager-free sdpa).
    The construction is checked on the MLX side before returning (RuntimeError if a seed breaks it).
    """
    import json

    import soundfile as sf
    import torch

    from mlx_listen.load import load
    from mlx_listen_convert.convert import convert
    from mlx_listen_convert.reference import hf as R
    from mlx_listen_convert.reference.tiny import build_tiny
    from support import INIT, SR, tone

    tmp_path = Path(tmp_path)
    hf_path, mlx_path = tmp_path / "planted-hf", tmp_path / "planted-mlx"
    hf, proc = build_tiny(hf_path, kv_heads=4, init_range=INIT, seed=seed)
    clip = tone(SECONDS, 440.0, seed=seed)
    tok = {c: proc.tokenizer.convert_tokens_to_ids(c) for c in CHOICES}

    # calibrate the content dimension on the clip against its silence (the encoder is random)
    enc_a = R.run(hf, proc, [clip], QUESTION)["encoder"].astype(np.float64)
    enc_s = R.run(hf, proc, [np.zeros_like(clip)], QUESTION)["encoder"].astype(np.float64)
    mu_a, mu_s = enc_a.mean(0), enc_s.mean(0)
    diff = mu_a - mu_s
    w = 4.0 * diff / (diff @ diff)  # content: mean +2 with the clip, -2 with silence
    b = -w @ (mu_a + mu_s) / 2

    cfg = hf.config.text_config
    d = cfg.hidden_size // cfg.num_attention_heads
    slow = d // 2 - 1  # RoPE's slowest pair: (slow, slow + d/2)
    rows = slice(HEAD * d, (HEAD + 1) * d)
    lm = hf.model.language_model
    with torch.no_grad():
        emb = lm.embed_tokens.weight
        emb[:, [FLAG, CONTENT, ANSWER]] = 0.0
        emb[:, BIAS] = 1.0
        proj = hf.model.multi_modal_projector.linear
        proj.weight[[FLAG, CONTENT, ANSWER, BIAS]] = 0.0
        proj.bias[[FLAG, CONTENT, ANSWER, BIAS]] = 0.0
        proj.bias[FLAG] = 4.0
        proj.weight[CONTENT] = torch.tensor(w, dtype=proj.weight.dtype)
        proj.bias[CONTENT] = float(b)
        for i, layer in enumerate(lm.layers):  # nothing else writes the answer direction
            layer.self_attn.o_proj.weight[ANSWER] = 0.0
            layer.mlp.down_proj.weight[ANSWER] = 0.0
        att = lm.layers[LAYER].self_attn
        att.q_proj.weight[rows] = 0.0
        att.q_proj.bias[rows] = 0.0
        att.q_proj.bias[HEAD * d + slow] = 8.0
        att.k_proj.weight[rows] = 0.0
        att.k_proj.bias[rows] = 0.0
        att.k_proj.weight[HEAD * d + slow, FLAG] = 1.0
        att.v_proj.weight[rows] = 0.0
        att.v_proj.bias[rows] = 0.0
        att.v_proj.weight[HEAD * d, CONTENT] = 1.0
        att.o_proj.weight[:, rows] = 0.0
        att.o_proj.weight[ANSWER, HEAD * d] = 4.0
        head = hf.lm_head.weight
        head[:, [ANSWER, BIAS]] = 0.0
        head[tok["x"]] = 0.0
        head[tok["y"]] = 0.0
        head[tok["x"], ANSWER] = 2.0
        head[tok["y"], ANSWER] = -2.0
        head[tok["y"], BIAS] = 4.0
    hf.save_pretrained(hf_path)
    convert(str(hf_path), str(mlx_path), progress=False, force=True)
    model, processor = load(mlx_path)

    wav = tmp_path / "planted.wav"
    sf.write(wav, clip, SR, subtype="FLOAT")
    item = {"id": "planted-0", "audio_id": wav.name, "question": QUESTION, "choices": list(CHOICES),
            "answer": "x", "task": "sound", "difficulty": "easy", "category": "planted"}
    data = tmp_path / "planted.json"
    data.write_text(json.dumps([item]))
    info = {"clip": clip, "wav": wav, "question": QUESTION, "choices": list(CHOICES), "preset": PRESET,
            "item": item, "data": data, "audio_dir": tmp_path, "tokens": tok,
            "hf_path": hf_path, "mlx_path": mlx_path, "hf_model": hf, "hf_processor": proc}
    info["logits"] = _check(model, processor, clip, tok)
    info.update(answer_audio="x", answer_silence="y", answer_ablated="y")
    return model, processor, LAYER, HEAD, info


def zero_head(layer: int, head: int, at: int):
    """`(hook name, fn)`: zero head `head`'s attention output (before `o_proj`) at absolute position `at`."""
    import mlx.core as mx

    def fn(z, point):
        rows = mx.arange(point.offset, point.offset + point.length) == at
        off = rows[None, :, None, None] & (mx.arange(z.shape[2]) == head)[None, None, :, None]
        return mx.where(off, mx.zeros_like(z), z)

    return f"decoder.blocks.{layer}.attn.hook_z", fn


def _check(model, processor, clip, tok) -> dict:
    """Logits at T with the clip, with silence and with the head zeroed at T; each must give its
    planted answer by a clear margin (RuntimeError otherwise)."""
    from mlx_listen.hooks import run_with_cache
    from mlx_listen.interp.steering import Silence
    from mlx_listen.presets import build_prompt
    from mlx_listen.prompt import prepare

    prompt = prepare(model, processor, [clip], build_prompt({"question": QUESTION, "choices": CHOICES}, PRESET))
    T = prompt.last
    out = {"audio": np.array(run_with_cache(model, prompt, [])[0][0]),
           "silence": np.array(run_with_cache(model, Silence(model).prompt(prompt), [])[0][0])}
    with model.hooks.using([zero_head(LAYER, HEAD, T)]):
        out["ablated"] = np.array(run_with_cache(model, prompt, [])[0][0])
    for name, want in (("audio", "x"), ("silence", "y"), ("ablated", "y")):
        lg = out[name]
        margin = lg[tok[want]] - np.delete(lg, tok[want]).max()
        if margin < 1.0:
            raise RuntimeError(f"the planted model does not answer {want!r} with {name} at T "
                               f"(margin {margin:.2f}); try another seed")
    return out
