"""PyTorch references for the experiment's controls that are interventions of their own (issue 19):
the norm-matched random direction, the reference for `SteerConfig(vector=v, layers=L*,
match_norm=True)` in `mlx_listen.interp.steering`.

For an input x: d(x) = mean over `layers` of (block output with the audio - with equal-length
digital silence) at the last prompt position, in float32, exactly as `hf.run_steered`; the control
adds alpha * |d(x)| * v / |v| (a fixed direction at this input's own norm) to the last decoder
block's output at the last position of every forward call (`at="all"`) or of the first only
(`at="prompt"`), through forward hooks.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .hf import hf_inputs


def run_norm_matched(model, processor, clips: Sequence[np.ndarray], question: str, system: str | None = None, *,
                     layers: Sequence[int], vector, alpha: float, at: str = "all",
                     max_new_tokens: int = 0) -> dict[str, np.ndarray]:
    """{"direction": the added direction before alpha (float32), "steered_logits_last", and with
    `max_new_tokens` "steered_greedy_tokens"}."""
    import torch

    lm = model.model.language_model

    def block_outputs(inputs) -> dict[int, "torch.Tensor"]:
        got, hooks = {}, []
        for l in layers:
            hooks.append(lm.layers[l].register_forward_hook(
                lambda m, a, o, l=l: got.__setitem__(l, (o[0] if isinstance(o, tuple) else o)[0, -1].float())))
        try:
            with torch.no_grad():
                model(**inputs)
        finally:
            for h in hooks:
                h.remove()
        return got

    def prepared(audio):
        inputs = hf_inputs(processor, audio, question, system).to(model.device)
        inputs["input_features"] = inputs["input_features"].to(model.dtype)
        return inputs

    inputs = prepared(list(clips))
    silent = prepared([np.zeros_like(c) for c in clips])
    a, s = block_outputs(inputs), block_outputs(silent)
    own = torch.stack([a[l] - s[l] for l in layers]).mean(0)
    v = torch.as_tensor(np.asarray(vector, np.float32), device=own.device)
    d = v / torch.linalg.norm(v) * torch.linalg.norm(own)
    calls = {"n": 0}

    def steer(module, args, output):
        calls["n"] += 1
        if at == "prompt" and calls["n"] > 1:
            return output
        h = output[0] if isinstance(output, tuple) else output
        h = h.clone()
        h[:, -1] += (alpha * d).to(h.dtype)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    hook = lm.layers[-1].register_forward_hook(steer)
    try:
        with torch.no_grad():
            res = {"direction": d.cpu().numpy(), "steered_logits_last": model(**inputs).logits[0, -1].float().cpu().numpy()}
            if max_new_tokens:
                calls["n"] = 0
                gen = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
                res["steered_greedy_tokens"] = gen[0, inputs["input_ids"].shape[1]:].cpu().numpy()
    finally:
        hook.remove()
    return res
