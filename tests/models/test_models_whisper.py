"""The Whisper audio tower (`models/whisper.py`): the valid-frames shortcut is exact."""

from __future__ import annotations

import pytest
from support import tone
from support.checks import assert_close

from mlx_listen.audio import audio_features


@pytest.mark.slow
def test_valid_frame_encoder_equals_padded_run(tiny_gqa):
    """The valid-frames shortcut is exact: same features as HF's masked 1500-position run."""
    model, _ = tiny_gqa.mlx
    for s in (0.3, 3.0, 17.7, 30.0):
        f = audio_features(tone(s))
        a = model.audio_tower(f.mel, f.n_frames)
        b = model.audio_tower(f.mel, f.n_frames, padded=True)
        assert a.shape == b.shape == (f.n_tokens, model.config.audio_config.d_model)
        assert_close(a, b, 1e-6, f"valid vs padded encoder at {s} s")
