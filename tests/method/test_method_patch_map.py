"""Patch maps (`method/patch_map.py`): which layers, positions and heads carry the audio's effect,
on the planted-head model (`support.planted`: the answer carried by one known head), over a data
set with resume, on one clip, and through `mlx-listen patch`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from support import invoke, ok
from support.planted import zero_head

from mlx_listen.errors import ListenError, ListenWarning
from mlx_listen.headset import HeadSet
from mlx_listen.hooks import run_with_cache
from mlx_listen.method.patch_map import (
    GROUPS_PNG,
    HEADS_PNG,
    META,
    RECORDS,
    SUMMARY,
    PatchConfig,
    choose,
    patch_lines,
    patch_prompt,
    patch_run,
)
from mlx_listen.presets import build_prompt
from mlx_listen.prompt import prepare

Q = "Describe the audio."


def test_choice_rule_and_config_checks():
    # a: the audio run's best; b: the silence run's best, or the audio run's next when they agree
    s = [[1], [2], [3]]
    assert choose(np.array([0.0, -1, -2]), np.array([-3.0, 0, -1]), s) == (0, 1)
    assert choose(np.array([0.0, -2, -1]), np.array([0.0, -1, -2]), s) == (0, 2)
    assert choose(np.array([0.0, -2, -1]), np.array([0.0, -1, -2]), [[1], [1], [3]]) == (0, 2)  # same tokens: skip
    for bad in (dict(groups=("audio", "nope")), dict(head_at="everywhere"), dict(min_gap=-1.0), dict(preset="x")):
        with pytest.raises(ListenError):
            PatchConfig(**bad).validate()


@pytest.mark.parametrize("preset,head_at,first_diff", [("mmau", "last", False), ("r1-aqa", "last+prefix", False),
                                                      ("r1-aqa", "last+prefix", True)])
def test_planted_head_is_found_and_its_ablation_flips_the_answer(planted, preset, head_at, first_diff):
    model, processor, layer, head, info = planted
    item = info["item"]
    prompt = prepare(model, processor, [info["clip"]], build_prompt(item, preset))
    rec = patch_prompt(model, processor, prompt, choices=item["choices"],
                       config=PatchConfig(preset=preset, head_at=head_at, first_diff=first_diff))
    if first_diff:
        assert processor.decode(rec["a_tokens"]) == "<answer>x" and processor.decode(rec["b_tokens"]) == "<answer>y"
    assert (rec["choice_audio"], rec["choice_silence"]) == (0, 1) and rec["flagged"] is None
    heads = np.array(rec["restored_heads"])
    assert np.unravel_index(np.argmax(heads), heads.shape) == (layer, head)
    assert heads[layer, head] > 0.9 and np.abs(np.delete(heads.ravel(), layer * heads.shape[1] + head)).max() < 0.1
    decisive = "last" if preset == "mmau" else "prefix"  # the position that predicts "x" / "y"
    by_layer = np.array(rec["restored_groups"][decisive])
    assert int(np.argmax(by_layer)) == layer and by_layer[layer] > 0.9
    assert rec["restored_groups"]["audio"][0] > 0.9  # the audio positions, read by the head in layer 1
    # zero the head's output where it decides (T for "mmau"): the answer flips to the silence's
    if preset == "mmau":
        tok = info["tokens"]
        logits = np.array(run_with_cache(model, prompt, [])[0][0])
        with model.hooks.using([zero_head(layer, head, prompt.last)]):
            ablated = np.array(run_with_cache(model, prompt, [])[0][0])
        assert int(np.argmax(logits)) == tok["x"] and int(np.argmax(ablated)) == tok["y"]


@pytest.mark.slow
def test_patch_run_over_a_data_set_resumes_and_records_bad_items(planted, tmp_path):
    model, processor, layer, head, info = planted
    item = info["item"]
    items = [item, {**item, "id": "broken", "audio_id": "missing.wav"},
             {**item, "id": "music-0", "task": "music"}]
    cfg = PatchConfig(preset="mmau")
    data = tmp_path / "items.json"
    data.write_text(json.dumps(items))
    out = tmp_path / "run"
    s = patch_run((model, processor), out, data=data, audio_dir=info["audio_dir"], config=cfg,
                  heads=HeadSet([(layer, head)]), progress=False)
    rows = [json.loads(line) for line in (out / RECORDS).read_text().splitlines()]
    assert [r["id"] for r in rows] == ["planted-0", "broken", "music-0"] and "error" in rows[1]
    assert s["n_items"] == 3 and s["n_used"] == 2 and s["skipped"][0]["id"] == "broken"
    assert s["top_heads"][0] == {"layer": layer, "head": head, "restored": s["top_heads"][0]["restored"]}
    assert set(s["tasks"]) == {"sound", "music"} and s["tasks"]["music"]["n"] == 1
    assert rows[0]["answer_is_a"] is True
    assert (out / GROUPS_PNG).stat().st_size > 1000 and (out / HEADS_PNG).stat().st_size > 1000
    assert json.loads((out / SUMMARY).read_text())["best_layer"]["last"] == layer
    lines = "\n".join(patch_lines(s, [(layer, head)]))
    assert "2 used, 1 skipped" in lines and f"{layer}.{head} +" in lines and "best rank 1 of 8" in lines
    # a rerun does nothing again; other settings are refused
    again = patch_run((model, processor), out, data=data, audio_dir=info["audio_dir"], config=cfg, progress=False)
    assert len((out / RECORDS).read_text().splitlines()) == 3 and again["restored_heads"] == s["restored_heads"]
    assert (out / META).exists()
    with pytest.raises(ListenError, match="other settings"):
        patch_run((model, processor), out, data=data, audio_dir=info["audio_dir"],
                  config=PatchConfig(preset="r1-aqa"), progress=False)


@pytest.mark.slow
def test_patch_run_one_clip_free_form(planted, tmp_path):
    """CLIP QUESTION without options: a and b are the two runs' greedy answers ("xxxx" / "yyyy")."""
    model, processor, layer, head, info = planted
    s = patch_run((model, processor), tmp_path, clip=info["wav"], question=info["question"],
                  config=PatchConfig(tokens=4), progress=False)
    rec = s["item"]
    assert rec["a"] == "xxxx" and rec["b"] == "yyyy" and s["n"] == 1
    assert s["top_heads"][0]["layer"] == layer and s["top_heads"][0]["head"] == head
    assert (tmp_path / GROUPS_PNG).exists() and (tmp_path / HEADS_PNG).exists()
    with pytest.warns(ListenWarning, match="barely changes"):
        flagged = patch_run((model, processor), tmp_path / "f", clip=info["wav"], question=info["question"],
                            config=PatchConfig(tokens=2, min_gap=1e6), progress=False)
    assert flagged["n"] == 0 and flagged["item"]["m_audio"] > flagged["item"]["m_silence"]
    with pytest.raises(ListenError, match="not both"):
        patch_run((model, processor), tmp_path, progress=False)


def test_same_answers_with_and_without_audio_is_an_error(tiny_gqa):
    model, processor = tiny_gqa.mlx
    prompt = prepare(model, processor, [np.zeros(16000, np.float32)], Q)  # silence against silence
    with pytest.raises(ListenError, match="same first"):
        patch_prompt(model, processor, prompt, config=PatchConfig(tokens=3))


def test_patch_command(planted, tmp_path):
    """`mlx-listen patch` on the planted model: the head map's best head is the planted one."""
    _, _, layer, head, info = planted
    out = tmp_path / "p"
    r = ok(invoke("patch", "--data", info["data"], "--audio-dir", info["audio_dir"], "--model", info["mlx_path"],
                  "--prompt", info["preset"], "--out", out))
    res = json.loads((out / "patch.json").read_text())
    assert (out / "patch.groups.png").exists() and (out / "patch.heads.png").exists()
    assert "patch.json" in r.stderr
    bad = invoke("patch", "--model", info["mlx_path"], "--out", out)
    assert bad.exit_code == 2 and "CLIP and QUESTION" in bad.output
    assert res  # the numbers themselves are checked against the planted truth above
