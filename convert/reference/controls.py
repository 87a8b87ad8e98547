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

from .hf import add_at_last_block, audio_silence_direction


def run_norm_matched(model, processor, clips: Sequence[np.ndarray], question: str, system: str | None = None, *,
                     layers: Sequence[int], vector, alpha: float, at: str = "all",
                     max_new_tokens: int = 0) -> dict[str, np.ndarray]:
    """{"direction": the added direction before alpha (float32), "steered_logits_last", and with
    `max_new_tokens` "steered_greedy_tokens"}."""
    import torch

    own, inputs = audio_silence_direction(model, processor, clips, question, system, layers)
    v = torch.as_tensor(np.asarray(vector, np.float32), device=own.device)
    d = v / torch.linalg.norm(v) * torch.linalg.norm(own)
    return {"direction": d.cpu().numpy(), **add_at_last_block(model, inputs, alpha * d, at, max_new_tokens)}
