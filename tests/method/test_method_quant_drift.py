"""`mlx-listen quant-drift` on tiny models: the reference against itself drifts by nothing, 8-bit
less than 4-bit, every number is the library's own, and the run resumes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from support import invoke, ok

from mlx_listen.eval.demo_set import make_demo_set
from mlx_listen.headset import HeadSet
from mlx_listen.method.quant_drift import TOP, drift, kl_top
from mlx_listen_convert.convert import convert

HEADS = HeadSet([(0, 1), (1, 2)])


@pytest.fixture(scope="module")
def copies(tiny_gqa, tmp_path_factory):
    root = tmp_path_factory.mktemp("drift")
    q8 = convert(str(tiny_gqa.hf_path), str(root / "q8"), quantize=True, q_bits=8, q_group_size=32, progress=False)
    q4 = convert(str(tiny_gqa.hf_path), str(root / "q4"), quantize=True, q_bits=4, q_group_size=32, progress=False)
    data = make_demo_set(root / "demo", n_per_kind=1)
    return root, q8, q4, data


def test_kl_over_kept_tokens_is_a_lower_bound():
    rng = np.random.default_rng(0)
    for _ in range(20):
        p = rng.dirichlet(np.ones(50) * 0.3)
        q = rng.dirichlet(np.ones(50) * 0.3)
        full = float(np.sum(p * (np.log(p) - np.log(q))))
        keep = np.argsort(-p)[:10]
        got = kl_top(keep, np.log(p[keep]), np.log(q[keep]))
        assert -1e-12 <= got <= full + 1e-12
        assert kl_top(np.arange(50), np.log(p), np.log(q)) == pytest.approx(full, abs=1e-9)
    assert kl_top([0, 1], np.log([0.5, 0.3]), np.log([0.5, 0.3])) == 0.0


@pytest.mark.slow
def test_drift_of_quantised_copies(tiny_gqa, copies, tmp_path):
    root, q8, q4, data = copies
    out = tmp_path / "out"
    rep = drift(tiny_gqa.mlx_path, [tiny_gqa.mlx_path, q8, q4], data, data.parent, out, heads=HEADS, k=3,
                max_tokens=6, progress=False)
    same, m8, m4 = (rep["models"][str(p)] for p in (tiny_gqa.mlx_path, q8, q4))
    n = rep["n_compared"]
    assert n == len(json.loads(data.read_text())) and not rep["failed"]
    # the reference against itself: nothing moves
    assert same["kl_top"]["mean"] == pytest.approx(0.0, abs=1e-9) and same["same_answer"] == 1.0
    assert same["mass_pearson"]["min"] == pytest.approx(1.0, abs=1e-9)
    assert same["direction_cosine"]["min"] == pytest.approx(1.0, abs=1e-6)
    assert same["heads"]["jaccard"] == 1.0 and same["accuracy"]["vs_reference"]["difference"] == 0.0
    # 8 bits drift less than 4 bits, and neither is the reference
    assert 0 < m8["kl_top"]["mean"] < m4["kl_top"]["mean"]
    assert m4["mass_pearson"]["median"] < m8["mass_pearson"]["median"] < 1.0
    assert m4["direction_cosine"]["median"] < m8["direction_cosine"]["median"] < 1.0
    for m in (same, m8, m4):
        assert 0.0 <= m["heads"]["jaccard"] <= 1.0 and m["heads"]["k"] == 3
        assert m["steered_gain"]["vs_baseline"]["n"] == n
    # the records are the library's numbers: the reference's top log-probs and audio mass
    rows = [json.loads(line) for line in (out / "reference.jsonl").read_text().splitlines()]
    assert all(len(r["top_ids"]) == TOP and r["top_logp"] == sorted(r["top_logp"], reverse=True) for r in rows)
    from mlx_listen.hooks import AUDIO_MASS, run_with_cache
    from mlx_listen.presets import build_prompt
    from mlx_listen.prompt import prepare

    model, processor = tiny_gqa.mlx
    item = json.loads(data.read_text())[0]
    prompt = prepare(model, processor, [data.parent / item["audio_id"]], build_prompt(item))
    logits, cap = run_with_cache(model, prompt, AUDIO_MASS.format("*"))
    logp = np.array(logits[0]) - np.log(np.exp(np.array(logits[0], np.float64)).sum())
    assert np.abs(np.array(rows[0]["top_logp"][:5]) - np.sort(logp)[::-1][:5]).max() < 1e-4
    assert np.abs(np.array(rows[0]["audio_mass"]) - cap.audio_mass(prompt.last)).max() < 1e-6
    # resumable: a rerun recomputes nothing and gives the same report
    before = {p.name: p.read_bytes() for p in out.glob("*.jsonl")}
    again = drift(tiny_gqa.mlx_path, [tiny_gqa.mlx_path, q8, q4], data, data.parent, out, heads=HEADS, k=3,
                  max_tokens=6, progress=False)
    assert {p.name: p.read_bytes() for p in out.glob("*.jsonl")} == before and again == rep
    assert (out / "drift.png").stat().st_size > 1000 and "| model |" in (out / "drift.md").read_text()


def test_quant_drift_command(M, copies, tmp_path):
    root, q8, _, data = copies
    heads = tmp_path / "H.json"
    HEADS.save(heads)
    r = ok(invoke("quant-drift", "--reference", M, "-M", q8, "--heads", heads, "--data", data, "--audio-dir",
                  data.parent, "--out", tmp_path / "out", "--limit", 3, "--k", 2, "-m", 4))
    assert "| model |" in r.stdout and str(q8) in r.stdout
    other = invoke("quant-drift", "--reference", M, "-M", q8, "--heads", heads, "--data", data, "--audio-dir",
                   data.parent, "--out", tmp_path / "out", "--limit", 3, "--k", 2, "-m", 5)
    assert other.exit_code == 1 and "other settings" in other.output  # the folder is bound to its settings
    bad = HeadSet([(9, 0)])
    bad.save(tmp_path / "bad.json")
    r = invoke("quant-drift", "--reference", M, "-M", q8, "--heads", tmp_path / "bad.json", "--data", data,
               "--audio-dir", data.parent, "--out", tmp_path / "o2")
    assert r.exit_code == 1 and "do not exist" in r.output and not (tmp_path / "o2").exists()
