"""The MLX port against reference bundles recorded by transformers on CUDA (committed under
tests/data/reference, made by `mlx-listen-reference` on an NVIDIA H200 from the same tiny
checkpoints these fixtures build). Where no committed bundle exists, the same check runs
against a bundle recorded here on CPU, and says so.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import soundfile as sf
from support import DATA, SR, VARIANTS, tiny_model, tone

from mlx_listen.bundle import load_bundle
from mlx_listen.parity import parity

HERE = DATA / "reference"


def committed(variant: str) -> list[Path]:
    return sorted(p for p in HERE.glob(f"{variant}-*") if (p / "manifest.json").exists())


@pytest.fixture(scope="module", params=list(VARIANTS))
def bundles(request, tiny_root, tmp_path_factory):
    tiny = tiny_model(tiny_root, request.param)
    found = committed(request.param)
    if not found:
        from mlx_listen_convert.reference.run import make_bundle, read_items

        d = tmp_path_factory.mktemp(f"cpu-{request.param}")
        sf.write(d / "a.flac", tone(2.5), SR)
        (d / "items.json").write_text(json.dumps([{"audio": "a.flac", "question": "What is this sound?"}]))
        found = [make_bundle(str(tiny.hf_path), read_items(d / "items.json", None), d / f"{request.param}-cpu-fp32",
                             drift=True, device="cpu", progress=False)]
        warnings.warn(f"no committed CUDA bundle for {request.param}: checked against a CPU-made one")
    return tiny, found


@pytest.mark.slow
def test_mlx_matches_recorded_reference(bundles, tmp_path):
    from mlx_listen_convert.convert import convert

    tiny, paths = bundles
    bf16 = None
    for path in paths:
        manifest = load_bundle(path).manifest
        device = manifest["device"]
        print(f"{path.name}: recorded on {device['type']} ({device.get('name')}), torch "
              f"{manifest['software']['torch']}, transformers {manifest['software']['transformers']}")
        if manifest["dtype"] == "float32":
            report = parity(path, tiny.mlx_path, progress=False)
            assert report.mode.startswith("MLX float32 vs reference float32")
        else:  # a bf16 reference: judge the bf16 MLX model
            bf16 = bf16 or convert(str(tiny.hf_path), str(tmp_path / "bf16"), dtype="bfloat16", progress=False)
            report = parity(path, bf16, progress=False)
        print(report.table())
        assert report.ok, report.table()
        logits = [r for r in report.rows if r.quantity == "logits_last"]
        checked = {r.quantity for r in report.rows}
        if path.parent == HERE:  # the committed CUDA bundles carry every quantity, steering included
            assert {"audio_mass", "listening", "steer_direction", "steered_logits_last",
                    "steered_greedy_tokens"} <= checked, checked
        if manifest["dtype"] == "float32":
            assert all(r.max_abs < 1e-4 for r in logits)
            assert all(r.note == "identical" for r in report.rows if r.quantity == "greedy_tokens")
            if manifest.get("drift_dtype") == "bfloat16":  # the bf16 MLX model within 2x HF's own drift
                bf16 = bf16 or convert(str(tiny.hf_path), str(tmp_path / "bf16"), dtype="bfloat16", progress=False)
                drift = parity(path, bf16, progress=False)
                print(drift.table())
                assert drift.ok and "HF drift" in next(r.limit for r in drift.rows if r.quantity == "logits_last")


@pytest.mark.torch
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_committed_bundles_identity(variant, request, tiny_root, tmp_path):
    """The committed bundles carry the first fingerprint (embeddings, head, norm weight, two zero biases):
    the new check uses their embedding and head blocks (centred), skips the constant ones, accepts the
    MLX model (fp32, bf16, 4-bit) and refuses an unrelated checkpoint of the same config."""
    from support import INIT

    from mlx_listen.errors import ListenError
    from mlx_listen.load import load_model
    from mlx_listen.parity import check_identity, fingerprint_errors
    from mlx_listen_convert.convert import convert
    from mlx_listen_convert.reference.tiny import build_tiny

    paths = committed(variant)
    if not paths:
        pytest.skip(f"no committed CUDA bundle for {variant}")
    tiny = tiny_model(tiny_root, variant)
    models = {"fp32": tiny.mlx_path,
              "bf16": convert(str(tiny.hf_path), str(tmp_path / "bf16"), dtype="bfloat16", progress=False),
              "q4": convert(str(tiny.hf_path), str(tmp_path / "q4"), quantize=True, q_bits=4, progress=False)}
    other = tmp_path / "other"
    build_tiny(other, init_range=INIT, **{**VARIANTS[variant], "seed": 99})
    for path in paths:
        bundle = load_bundle(path)
        for name, folder in models.items():
            model, config = load_model(folder)
            errors, skipped = fingerprint_errors(bundle, model)
            assert set(errors) == {"language_model.model.embed_tokens.weight", "language_model.lm_head.weight"}
            assert len(skipped) == 3 and all("constant" in s for s in skipped), skipped
            assert max(errors.values()) < (0.15 if name == "q4" else 0.01), (path.name, name, errors)
            check_identity(bundle, model, config)
        model, config = load_model(other)
        with pytest.raises(ListenError, match="different weights: 2 of 2"):
            check_identity(bundle, model, config)
