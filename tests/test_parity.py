"""The reference round trip on tiny models (`mlx_listen.parity`, `mlx_listen.bundle`): transformers
writes a bundle, `mlx-listen parity` checks it, steering included; the weight fingerprint tells
the same checkpoint (cast, quantised) from another."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile as sf
from support import SR, tone

from mlx_listen.bundle import QUANTITIES, load_bundle
from mlx_listen.errors import ListenError
from mlx_listen.parity import parity

# torch: every bundle here is recorded by the reference side; slow: the tests are quick, but the
# bundles they share take transformers ~7 s of model passes to record before the first one runs
pytestmark = [pytest.mark.torch, pytest.mark.slow]
Q = "Describe the audio."


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    d = tmp_path_factory.mktemp("items")
    for name, secs, f in [("a.wav", 2.0, 330.0), ("b.flac", 3.3, 660.0)]:
        sf.write(d / name, tone(secs, f), SR)
    spec = [{"audio": "a.wav", "question": "What is this sound?"},
            {"audio": "b.flac", "question": "Is it high or low?", "system": "Answer briefly."}]
    (d / "items.json").write_text(json.dumps(spec))
    return d / "items.json"


@pytest.fixture(scope="module")
def bundle_fp32(tiny_gqa, items, tmp_path_factory):
    from mlx_listen_convert.reference.run import make_bundle, read_items

    out = tmp_path_factory.mktemp("b") / "fp32"
    return make_bundle(str(tiny_gqa.hf_path), read_items(items, None), out, dtype="float32", device="cpu",
                       max_new_tokens=24, drift=True, progress=False)


def test_bundle_format(bundle_fp32):
    b = load_bundle(bundle_fp32)
    m = b.manifest
    assert m["format"] == "mlx-listen-reference" and m["version"] == 1 and m["dtype"] == "float32"
    assert m["drift_dtype"] == "bfloat16" and m["device"]["type"] == "cpu"
    assert {"torch", "transformers"} <= set(m["software"])
    for i, item in enumerate(b.items):
        assert set(item["quantities"]) - {q for q in item["quantities"] if q.startswith("drift.")} == \
            set(QUANTITIES) - {"listening", "steer_direction", "steered_logits_last", "steered_greedy_tokens"}
        # (listening needs --heads; the steered quantities --steer)
        assert b.get(i, "input_ids").size == item["n_prompt_tokens"]
        assert (bundle_fp32 / item["audio"]).exists()
    size = sum(f.stat().st_size for f in bundle_fp32.rglob("*") if f.is_file())
    assert size < 2_000_000


def test_fp32_parity_passes(tiny_gqa, bundle_fp32):
    report = parity(bundle_fp32, tiny_gqa.mlx_path, progress=False)
    assert report.ok, report.table()
    assert report.mode.startswith("MLX float32 vs reference float32")
    logits = [r for r in report.rows if r.quantity == "logits_last"]
    assert len(logits) == 2 and all(r.max_abs < 1e-4 for r in logits)
    greedy = [r for r in report.rows if r.quantity == "greedy_tokens"]
    assert all(r.note == "identical" for r in greedy)


def test_audio_mass_and_listening_in_bundle(tiny_gqa, items, tmp_path):
    """With --heads the bundle records the listening score; parity checks it and the audio mass."""
    from mlx_listen_convert.reference.run import make_bundle, read_items

    heads = [(0, 1), (1, 3), (1, 0)]
    path = make_bundle(str(tiny_gqa.hf_path), read_items(items, None), tmp_path / "h", max_new_tokens=0,
                       progress=False, heads=heads)
    b = load_bundle(path)
    assert b.manifest["heads"] == [list(h) for h in heads]
    mass = b.get(0, "audio_mass")
    assert mass.shape == (2, 4) and np.isclose(b.get(0, "listening")[0], np.mean([mass[l, h] for l, h in heads]))
    report = parity(path, tiny_gqa.mlx_path, progress=False)
    assert report.ok, report.table()
    rows = {r.quantity: r for r in report.rows}
    assert rows["audio_mass"].max_abs < 1e-5 and rows["listening"].max_abs < 1e-5


def test_bf16_model_judged_against_hf_drift(tiny_gqa, bundle_fp32, tmp_path):
    from mlx_listen_convert.convert import convert

    bf16 = convert(str(tiny_gqa.hf_path), str(tmp_path / "bf16"), dtype="bfloat16", progress=False)
    report = parity(bundle_fp32, bf16, progress=False)
    assert report.ok, report.table()
    assert "HF drift" in next(r.limit for r in report.rows if r.quantity == "logits_last")


def test_perturbed_weight_fails(tiny_gqa, bundle_fp32, tmp_path):
    """One weight changed a little (within what the identity fingerprint tolerates, like quantisation
    noise): not another checkpoint, but parity must fail, naming the stages."""
    import mlx.core as mx

    folder = tmp_path / "perturbed"
    shutil.copytree(tiny_gqa.mlx_path, folder)
    f = next(folder.glob("model*.safetensors"))
    w = mx.load(str(f))
    k = "language_model.model.layers.1.mlp.down_proj.weight"
    w[k] = w[k] + 0.05 * (mx.arange(w[k].size).reshape(w[k].shape) % 7 == 0)
    mx.save_safetensors(str(f), w, metadata={"format": "mlx"})
    report = parity(bundle_fp32, folder, progress=False)
    assert not report.ok
    failed = {r.quantity for r in report.rows if not r.ok}
    assert "logits_last" in failed and "hidden_last" in failed
    assert "projector_sketch" not in failed  # the audio path is untouched
    assert "Verdict: FAIL" in report.table()


def test_bundle_from_another_model_is_refused(bundle_fp32, tmp_path):
    from mlx_listen_convert.reference.tiny import build_tiny

    other = tmp_path / "other"
    build_tiny(other, init_range=0.1, kv_heads=2, seed=123)
    with pytest.raises(ListenError, match="different weights"):
        parity(bundle_fp32, other, progress=False)
    wider = tmp_path / "wider"
    build_tiny(wider, init_range=0.1, kv_heads=2, hidden=128)
    with pytest.raises(ListenError, match="architecture"):
        parity(bundle_fp32, wider, progress=False)


def test_truncated_bundle_is_refused(tiny_gqa, bundle_fp32, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(bundle_fp32, broken)
    t = broken / "tensors.safetensors"
    t.write_bytes(t.read_bytes()[: t.stat().st_size // 2])
    with pytest.raises(ListenError, match="truncated or corrupt"):
        parity(broken, tiny_gqa.mlx_path, progress=False)


def test_other_prompt_format_is_refused(tiny_gqa, bundle_fp32, tmp_path):
    folder = tmp_path / "tmpl"
    shutil.copytree(tiny_gqa.mlx_path, folder)
    t = folder / "chat_template.jinja"
    t.write_text(t.read_text().replace("You are a helpful assistant.", "You are a pirate."))
    with pytest.raises(ListenError, match="prompt format"):
        parity(bundle_fp32, folder, progress=False)


def test_unknown_future_quantities_are_ignored(tiny_gqa, bundle_fp32, tmp_path):
    from safetensors.numpy import load_file, save_file

    newer = tmp_path / "newer"
    shutil.copytree(bundle_fp32, newer)
    m = json.loads((newer / "manifest.json").read_text())
    m["items"][0]["quantities"].append("some_future_quantity")
    (newer / "manifest.json").write_text(json.dumps(m))
    t = load_file(str(newer / "tensors.safetensors"))
    t["item0.some_future_quantity"] = np.zeros(3, np.float32)
    save_file(t, str(newer / "tensors.safetensors"))
    report = parity(newer, tiny_gqa.mlx_path, progress=False)
    assert report.ok and report.unchecked == ["some_future_quantity"]


def test_steering_in_reference_bundle(tiny_gqa, tmp_path):
    """The reference run records the PyTorch steering; `parity` recomputes and checks it."""
    from mlx_listen.parity import parity
    from mlx_listen_convert.reference.run import make_bundle, read_items

    sf.write(tmp_path / "a.wav", tone(2.2), SR)
    (tmp_path / "items.json").write_text(json.dumps([{"audio": "a.wav", "question": Q}]))
    path = make_bundle(str(tiny_gqa.hf_path), read_items(tmp_path / "items.json", None), tmp_path / "b",
                       max_new_tokens=12, progress=False, heads=[(0, 1), (1, 2)],
                       steering={"layers": [0, 1], "alpha": 2.0, "at": "all"})
    report = parity(path, tiny_gqa.mlx_path, progress=False)
    assert report.ok, report.table()
    got = {r.quantity: r for r in report.rows}
    assert got["steered_logits_last"].max_abs < 1e-4 and got["steer_direction"].max_abs < 1e-4
    assert got["steered_greedy_tokens"].note == "identical"


# -- identity: the weight fingerprint ------------------------------------------------------------


def test_new_bundles_fingerprint_projections(tiny_gqa, bundle_fp32):
    """Projection blocks of the first and last layers (decoder and encoder), the projector, the
    embeddings and the head; no norm weight or bias (constant in a fresh checkpoint)."""
    from mlx_listen.bundle import LEGACY_FINGERPRINT_SLICES, fingerprint_slices
    from mlx_listen.parity import fingerprint_errors

    b = load_bundle(bundle_fp32)
    fp, slices = b.manifest["model"]["fingerprint"], b.manifest["model"]["fingerprint_slices"]
    assert set(fp) == set(slices) == set(fingerprint_slices(json.loads((tiny_gqa.hf_path / "config.json").read_text())))
    assert "language_model.model.layers.1.self_attn.k_proj.weight" in fp and "audio_tower.layers.1.fc2.weight" in fp
    assert "multi_modal_projector.linear.weight" in fp
    assert not [n for n in fp if "norm" in n or n.endswith(".bias")]
    assert slices["language_model.model.embed_tokens.weight"] == [[0, 8], [0, 16]]  # what older readers expect
    assert LEGACY_FINGERPRINT_SLICES["language_model.model.embed_tokens.weight"] == (slice(0, 8), slice(0, 16))
    assert all(len(v) == 64 for n, v in fp.items() if "layers" in n)
    errors, skipped = fingerprint_errors(b, tiny_gqa.mlx[0])
    assert set(errors) == set(fp) and not skipped and max(errors.values()) < 1e-6


@pytest.fixture(scope="module")
def realistic(items, tmp_path_factory):
    """Two unrelated checkpoints of the same config at a realistic init (0.02), a bundle from the first,
    and the first converted, cast and quantised."""
    from mlx_listen_convert.convert import convert
    from mlx_listen_convert.reference.run import make_bundle, read_items
    from mlx_listen_convert.reference.tiny import build_tiny

    d = tmp_path_factory.mktemp("init002")
    build_tiny(d / "a", init_range=0.02, kv_heads=2, seed=0)
    build_tiny(d / "b", init_range=0.02, kv_heads=2, seed=1)
    bundle = make_bundle(str(d / "a"), read_items(items, None)[:1], d / "bundle", device="cpu", max_new_tokens=0,
                         progress=False)
    same = {"fp32": convert(str(d / "a"), str(d / "a-fp32"), progress=False)}
    for name, kw in [("bf16", dict(dtype="bfloat16")), ("fp16", dict(dtype="float16")),
                     ("q8", dict(quantize=True, q_bits=8)), ("q4", dict(quantize=True, q_bits=4))]:
        same[name] = convert(str(d / "a"), str(d / f"a-{name}"), progress=False, **kw)
    other = {"hf": d / "b", "q4": convert(str(d / "b"), str(d / "b-q4"), quantize=True, q_bits=4, progress=False)}
    return bundle, same, other


def test_fingerprint_separates_checkpoints_at_init_002(realistic):
    """Same weights converted, cast or quantised: every block within 0.15 relative error (measured
    <= 0.12 at 4 bits); unrelated weights: every block above 1.1 (measured >= 1.2). Limit 0.5."""
    from mlx_listen.bundle import fingerprint_slices
    from mlx_listen.load import load_model
    from mlx_listen.parity import FINGERPRINT_MAX_REL, check_identity, fingerprint_errors

    bundle, same, other = realistic
    b = load_bundle(bundle)
    # every block the fingerprint takes for this config (29 here; the count is the bundle's), none skipped
    fingerprinted = set(fingerprint_slices(json.loads((bundle.parent / "a" / "config.json").read_text())))
    assert set(b.manifest["model"]["fingerprint"]) == fingerprinted
    n = len(fingerprinted)
    for name, path in same.items():
        model, config = load_model(path)
        errors, skipped = fingerprint_errors(b, model)
        assert set(errors) == fingerprinted and not skipped
        assert max(errors.values()) < {"fp32": 1e-6, "bf16": 0.005, "fp16": 0.001, "q8": 0.01, "q4": 0.15}[name], name
        check_identity(b, model, config)
    for name, path in other.items():
        model, config = load_model(path)
        errors, _ = fingerprint_errors(b, model)
        assert min(errors.values()) > 1.1 > FINGERPRINT_MAX_REL, name
        with pytest.raises(ListenError, match=f"different weights: {n} of {n} fingerprinted tensors differ"):
            check_identity(b, model, config)


def test_parity_refuses_unrelated_checkpoint_in_one_line(realistic):
    """`mlx-listen parity` with another checkpoint at init 0.02: one `Error:` line, not a table of FAILs."""
    from support import invoke

    bundle, same, other = realistic
    for model in other.values():
        r = invoke("parity", bundle, "--model", model)
        assert r.exit_code == 1, r.output
        lines = [line for line in r.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error: the bundle was recorded from different weights"), r.output
    r = invoke("parity", bundle, "--model", same["fp32"])
    assert r.exit_code == 0 and "Verdict: PASS" in r.output, r.output


def test_bundle_without_usable_fingerprint_is_refused(tiny_gqa, bundle_fp32, tmp_path):
    """An old-style manifest whose only entries are constant (norm weights, zero biases), or none at all."""
    old = tmp_path / "old"
    shutil.copytree(bundle_fp32, old)
    m = json.loads((old / "manifest.json").read_text())
    m["model"]["fingerprint"] = {"language_model.model.norm.weight": [1.0] * 64,
                                 "audio_tower.conv1.bias": [0.0] * 32}
    del m["model"]["fingerprint_slices"]
    (old / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ListenError, match=r"no usable weight fingerprint \(2 entries, none usable: "
                                          r"language_model.model.norm.weight: \(nearly\) constant"):
        parity(old, tiny_gqa.mlx_path, progress=False)
    del m["model"]["fingerprint"]
    (old / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ListenError, match=r"no usable weight fingerprint \(none recorded\)"):
        parity(old, tiny_gqa.mlx_path, progress=False)


def test_old_bundle_checked_on_what_it_has(tiny_gqa, bundle_fp32, tmp_path):
    """A bundle with only the first fingerprint's five legacy slices: embeddings and head decide."""
    from mlx_listen.bundle import LEGACY_FINGERPRINT_SLICES
    from mlx_listen.parity import fingerprint_errors

    old = tmp_path / "old"
    shutil.copytree(bundle_fp32, old)
    m = json.loads((old / "manifest.json").read_text())
    sd = tiny_gqa.hf_model.state_dict()
    mem = {"language_model.model.embed_tokens.weight": "model.language_model.embed_tokens.weight",
           "language_model.lm_head.weight": "lm_head.weight",
           "language_model.model.norm.weight": "model.language_model.norm.weight",
           "audio_tower.conv1.bias": "model.audio_tower.conv1.bias",
           "multi_modal_projector.linear.bias": "model.multi_modal_projector.linear.bias"}
    m["model"]["fingerprint"] = {n: sd[mem[n]][i].float().numpy().reshape(-1).tolist()
                                 for n, i in LEGACY_FINGERPRINT_SLICES.items()}
    del m["model"]["fingerprint_slices"]
    (old / "manifest.json").write_text(json.dumps(m))
    errors, skipped = fingerprint_errors(load_bundle(old), tiny_gqa.mlx[0])
    assert set(errors) == {"language_model.model.embed_tokens.weight", "language_model.lm_head.weight"}
    assert len(skipped) == 3 and max(errors.values()) < 1e-6
    assert parity(old, tiny_gqa.mlx_path, progress=False).ok


def test_listening_score_is_judged_against_the_per_head_drift():
    """The listening score is the mean of the chosen heads' audio masses: its error is at most the
    largest per-head error. Judged against transformers' own bf16 error of the mean, which can cancel
    to nearly nothing, a port exactly as precise as transformers failed (issue 19: 0.0047 against a
    limit of 0.0003); judged against the per-head drift, the same numbers pass, and a real error
    (larger than every per-head drift allows) still fails."""
    from mlx_listen.parity import _judge

    ref_mass = np.full((2, 4), 0.3)
    drift_mass = ref_mass + np.array([[0.002, -0.002, 0.001, -0.001], [0.0015, -0.0005, 0.002, -0.002]])
    ref, cancelled = np.array([0.3]), np.array([0.30001])  # HF's error of the mean: 1e-5
    ours = np.array([0.3012])  # smaller than HF's per-head errors, far above 2x its error of the mean
    assert not _judge("listening", ours, ref, cancelled, "half", None).ok  # the old rule
    row = _judge("listening", ours, ref, cancelled, "half", None, (drift_mass, ref_mass))
    assert row.ok and "per-head mass drift" in row.limit
    assert not _judge("listening", np.array([0.306]), ref, cancelled, "half", None, (drift_mass, ref_mass)).ok


def test_bf16_listening_parity_with_heads(tiny_gqa, items, tmp_path):
    """End to end: a bundle with --heads and --drift; the bf16 MLX model's listening score is judged
    against the per-head drift and passes."""
    from mlx_listen_convert.convert import convert
    from mlx_listen_convert.reference.run import make_bundle, read_items

    path = make_bundle(str(tiny_gqa.hf_path), read_items(items, None), tmp_path / "h", max_new_tokens=0,
                       progress=False, heads=[(0, 1), (1, 3), (1, 0)], drift=True)
    bf16 = convert(str(tiny_gqa.hf_path), str(tmp_path / "bf16"), dtype="bfloat16", progress=False)
    report = parity(path, bf16, progress=False)
    assert report.ok, report.table()
    rows = [r for r in report.rows if r.quantity == "listening"]
    assert rows and all("per-head mass drift" in r.limit for r in rows)
