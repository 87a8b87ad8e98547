"""Inspecting a steering direction (`method/inspect.py`: the logit lens per task, the per-layer
contrast, task cosines) against the PyTorch reference (`mlx_listen_convert.reference.lens`:
forward hooks, autograd for the Jacobian, brute-force Gram matrices for the cosines) on the tiny
models, with a random positive final-norm weight written into both (`support.lens.norm_weight`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
from support import SR, invoke, ok, tone
from support.checks import close, close_lists
from support.lens import norm_weight

from mlx_listen.errors import ListenError
from mlx_listen.eval import mmau
from mlx_listen.headset import HeadSet
from mlx_listen.interp.lens import LENSES, lens_vectors
from mlx_listen.method.directions import save_vector
from mlx_listen.method.inspect import inspect_direction, read_source
from mlx_listen.presets import build_prompt

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


CLIPS = {  # id: (task, seconds, freq, seed)
    "s1": ("sound", 1.2, 300.0, 1), "s2": ("sound", 1.7, 900.0, 2),
    "m1": ("music", 1.0, 440.0, 3), "m2": ("music", 1.5, 660.0, 4),
    "p1": ("speech", 1.3, 200.0, 5), "p2": ("speech", 0.9, 1500.0, 6),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """An MMAU-format file: two items per task (float WAVs, read back bit for bit) and one item
    whose "audio" is a text file."""
    root = tmp_path_factory.mktemp("lens-data")
    (root / "audios").mkdir()
    items, clips = [], {}
    for uid, (task, sec, freq, seed) in CLIPS.items():
        x = tone(sec, freq, seed)
        sf.write(root / "audios" / f"{uid}.wav", x, SR, subtype="FLOAT")
        clips[uid] = x
        items.append({"id": uid, "audio_id": f"audios/{uid}.wav", "question": f"What is heard in {uid}?",
                      "choices": ["a tone", "a voice", "silence", "music"], "answer": "a tone", "task": task,
                      "difficulty": "easy", "category": "synthetic"})
    (root / "audios" / "bad.wav").write_text("not audio")
    items.insert(3, {"id": "bad", "audio_id": "audios/bad.wav", "question": "?", "choices": ["x", "y"],
                     "answer": "x", "task": "music", "difficulty": "easy"})
    path = root / "data.json"
    path.write_text(json.dumps(items))
    loaded = mmau.load_items(path)
    ref_items = [(it["task"], [clips[it["id"]]], build_prompt(it, "r1-aqa")) for it in loaded if it["id"] != "bad"]
    return root, path, loaded, ref_items


@pytest.mark.torch
@pytest.mark.slow
def test_inspect_heads_matches_reference(tiny_gqa, data, tmp_path):
    """Per-input directions over L* = {0, 1}: every reported number against the brute-force
    reference; the unreadable item is skipped with its reason; the files are written."""
    from mlx_listen_convert.reference.lens import inspect_reference

    root, _, items, ref_items = data
    model, processor = tiny_gqa.mlx
    heads = HeadSet([(0, 1), (1, 2)])
    k = 8
    with norm_weight(tiny_gqa, seed=1):
        res = inspect_direction(model, processor, headset=heads, items=items, audio_dir=root, top_k=k,
                                   out=tmp_path / "out")
        ref = inspect_reference(tiny_gqa.hf_model, tiny_gqa.hf_processor, ref_items, layers=[0, 1], alpha=1.0)

    assert res["data"]["used"] == 6 and [f["id"] for f in res["data"]["failed"]] == ["bad"]
    assert "not a readable audio file" in res["data"]["failed"][0]["error"]
    assert res["data"]["by_task"] == {"sound": 2, "music": 2, "speech": 2}
    assert res["source"]["layers"] == [0, 1] and res["per_layer"]["marked"] == [0, 1]

    pl, rpl = res["per_layer"], ref["per_layer"]
    for key in ("norm_mean", "norm_sd", "relative_norm_mean", "cos_direction_mean", "consistency"):
        close_lists(pl[key], rpl["all"][key])
        for t in ("sound", "music", "speech"):
            close_lists(pl["by_task"][t][key], rpl[t][key])

    for g in ("all", "sound", "music", "speech"):
        assert set(LENSES) <= set(res["lens"][g])
        for kind in LENSES:
            rv = ref["lens"][g][kind]
            for side, order in (("promoted", -1), ("demoted", 1)):
                rows = res["lens"][g][kind][side]
                ids = [r["id"] for r in rows]
                close([r["value"] for r in rows], rv[ids])  # the values at the ids we report
                close([r["value"] for r in rows], np.sort(rv)[::order][:k])  # and they are the top k
                assert rows[0]["token"] == processor.tokenizer.decode([ids[0]])

    tk, rtk = res["tasks"], ref["tasks"]
    assert tk["tasks"] == rtk["tasks"] == ["sound", "music", "speech"]
    for key in ("mean_direction_cosine", "item_cosine", "item_cosine_all", "item_cosine_across"):
        close_lists(tk[key], rtk[key])
    close_lists([tk["cos_to_overall_mean"][t] for t in tk["tasks"]],
                [rtk["cos_to_overall_mean"][t] for t in tk["tasks"]])
    dr = res["direction"]
    close(dr["mean_direction_norm"], ref["mean_direction_norm"])
    close(dr["item_norm_mean"], ref["item_norm_mean"])
    close(dr["final_norm_mean"], ref["final_norm_mean"])
    close(dr["applied_relative_norm_mean"], ref["applied_relative_norm_mean"])

    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(res["files"])
    back = json.loads((out / "inspect.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert back["lens"]["all"]["direct"]["promoted"][0]["id"] == res["lens"]["all"]["direct"]["promoted"][0]["id"]
    for png in ("layers.png", "consistency.png", "tasks.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    text = (out / "inspect.txt").read_text()
    assert "per layer" in text and "task cosines" in text and "bad" in text


@pytest.mark.torch
@pytest.mark.slow
def test_fixed_vector_with_and_without_data(tiny_gqa, data, tmp_path):
    from mlx_listen_convert.reference.lens import inspect_reference

    root, _, items, ref_items = data
    model, processor = tiny_gqa.mlx
    hidden, n_layers = model.config.text_config.hidden_size, len(model.layers)
    v = np.random.default_rng(5).standard_normal(hidden).astype(np.float32)
    path = tmp_path / "v.safetensors"
    save_vector(path, v, apply_layer=n_layers - 1, hidden_size=hidden, meta={"layers": [1], "coeff": 2.0})

    # no data: the direct lens alone
    bare = inspect_direction(model, processor, vector=path, top_k=5)
    assert set(bare["lens"]) == {"all"} and set(bare["lens"]["all"]) == {"direct", "n"}
    assert bare["per_layer"] is None and bare["tasks"] is None and bare["data"] is None
    assert bare["source"]["alpha"] == 2.0 and bare["source"]["layers"] == [1]
    direct = lens_vectors(model, v)["direct"]
    assert [r["id"] for r in bare["lens"]["all"]["direct"]["promoted"]] == list(np.argsort(-direct)[:5])

    # with data: state-dependent lenses per task (the direct one is task-free), d(x) over the file's L*;
    # one music and one speech item, so their within-task cosines are undefined (None)
    keep = ("s1", "s2", "m1", "p1")
    good = [it for it in items if it["id"] in keep]
    refs = [r for it, r in zip([it for it in items if it["id"] != "bad"], ref_items) if it["id"] in keep]
    with norm_weight(tiny_gqa, seed=2):
        res = inspect_direction(model, processor, vector=path, items=good, audio_dir=root, top_k=6)
        ref = inspect_reference(tiny_gqa.hf_model, tiny_gqa.hf_processor, refs, layers=[1], alpha=2.0, vector=v)
    assert res["tasks"]["item_cosine"][1][1] is None and res["tasks"]["item_cosine"][0][0] is not None
    assert set(res["lens"]["sound"]) >= {"jacobian", "exact"} and "direct" not in res["lens"]["sound"]
    for g in ("all", "music"):
        for kind in ("jacobian", "exact"):
            rows = res["lens"][g][kind]["promoted"]
            close([r["value"] for r in rows], ref["lens"][g][kind][[r["id"] for r in rows]])
    close_lists(res["per_layer"]["cos_direction_mean"], ref["per_layer"]["all"]["cos_direction_mean"])
    close_lists(res["tasks"]["item_cosine"], ref["tasks"]["item_cosine"])
    mean_d = ref["directions"].mean(0)
    close(res["direction"]["vector_cos_mean_direction"], v @ mean_d / (np.linalg.norm(v) * np.linalg.norm(mean_d)))
    assert res["per_layer"]["marked"] == [1]

    # a vector without L*: per-layer contrast still, no per-input directions
    res = inspect_direction(model, processor, vector=v, items=good[:1], audio_dir=root, top_k=3)
    assert res["per_layer"] is not None and res["tasks"] is None and res["notes"]


@pytest.mark.torch
def test_planted_token_ranks_first(tiny_gqa):
    """d with w ⊙ d = the largest-norm lm_head row W_t: by Cauchy-Schwarz lm_head(w ⊙ d) peaks at t,
    and -d puts t at the bottom."""
    model, processor = tiny_gqa.mlx
    W = np.array(model.language_model.lm_head.weight, np.float64)
    t = int(np.argmax(np.linalg.norm(W, axis=1)))
    with norm_weight(tiny_gqa, seed=3) as w:
        d = (W[t] / w).astype(np.float32)
        up = inspect_direction(model, processor, vector=d, top_k=3)["lens"]["all"]["direct"]
        down = inspect_direction(model, processor, vector=-d, top_k=3)["lens"]["all"]["direct"]
    assert up["promoted"][0]["id"] == t and down["demoted"][0]["id"] == t
    assert up["promoted"][0]["value"] == pytest.approx(np.linalg.norm(W[t]) ** 2, rel=1e-4)
    assert up["promoted"][0]["value"] > up["promoted"][1]["value"]


def test_bad_inputs_are_one_line_errors(tiny_gqa, data, tmp_path):
    root, _, items, _ = data
    model, processor = tiny_gqa.mlx
    heads = HeadSet([(0, 1)])
    with pytest.raises(ListenError, match="per input"):
        inspect_direction(model, processor, headset=heads)
    with pytest.raises(ListenError, match="no item could be used"):
        inspect_direction(model, processor, headset=heads, items=[it for it in items if it["id"] == "bad"],
                             audio_dir=root)
    with pytest.raises(ListenError, match="exactly one"):
        inspect_direction(model, processor, headset=heads, vector=np.zeros(4))
    with pytest.raises(ListenError, match="do not exist"):
        inspect_direction(model, processor, headset=HeadSet([(9, 0)]), items=items, audio_dir=root)
    hs = tmp_path / "HEADS.json"
    heads.save(hs)
    assert read_source(hs)[0].heads == [(0, 1)]
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 40)
    with pytest.raises(ListenError, match="neither a HEADS.json"):
        read_source(junk)


@pytest.mark.slow
def test_steer_inspect_command(tiny_gqa, tmp_path):
    import json

    from mlx_listen.eval.demo_set import make_demo_set
    from mlx_listen.headset import HeadSet

    demo = make_demo_set(tmp_path / "demo", n_per_kind=1)
    heads = tmp_path / "H.json"
    HeadSet([(0, 1), (1, 2)]).save(heads)
    out = tmp_path / "inspect"
    r = ok(invoke("steer", "inspect", heads, "--data", demo, "--audio-dir", demo.parent, "--model",
                  tiny_gqa.mlx_path, "--limit", 3, "--out", out))
    assert json.loads((out / "inspect.json").read_text())
    assert r.stdout.strip()
    bad = invoke("steer", "inspect", heads, "--data", demo, "--model", tiny_gqa.mlx_path)
    assert bad.exit_code == 2 and "go together" in bad.output
