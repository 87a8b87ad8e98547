"""Streaming statistics of per-input directions (`method/direction_stats.py`): task cosines on
hand-built directions and against brute-force Gram matrices."""

from __future__ import annotations

import numpy as np
import pytest
from support.checks import close_lists

from mlx_listen.method.direction_stats import DirectionStats


def test_task_cosines_on_hand_built_directions():
    e = np.eye(4)
    st = DirectionStats(n_layers=1, hidden=4)
    dirs = {"sound": [e[0], 2 * e[0]], "music": [e[1], e[1] + 0 * e[2]], "speech": [-e[0], e[2]]}
    for task, ds in dirs.items():
        for i, d in enumerate(ds):
            st.add(f"{task}{i}", task, diffs=d[None], d=d, applied=d)
    tk = st.task_consistency()
    assert tk["tasks"] == ["sound", "music", "speech"]
    # per-item: sound pairs cos 1, music 1, speech (−e0, e2) 0; sound x speech (1·-1 + 0 + 2·-1 / 2 ... ) by hand
    want_items = [[1.0, 0.0, -0.5], [0.0, 1.0, 0.0], [-0.5, 0.0, 0.0]]
    close_lists(tk["item_cosine"], want_items)
    # mean directions: sound 1.5 e0, music e1, speech (−e0 + e2)/2
    s2 = 1 / np.sqrt(2)
    close_lists(tk["mean_direction_cosine"], [[1, 0, -s2], [0, 1, 0], [-s2, 0, 1]])
    # across = mean over the 12 cross pairs: sound-speech 4 pairs sum -2, others 0
    assert tk["item_cosine_across"] == pytest.approx(-2 / 12)
    # all 15 pairs: 1 + 1 + 0 (within) - 2 (across)
    assert tk["item_cosine_all"] == pytest.approx(0 / 15)
    assert st.per_layer()["consistency"][0] == pytest.approx(0.0)


def test_streaming_cosines_equal_brute_force():
    rng = np.random.default_rng(0)
    tasks = ["sound"] * 5 + ["music"] * 3 + ["speech"] * 1
    X = rng.standard_normal((9, 2, 6)) + np.array([1.0, 0, 0, 0, 0, 0])
    st = DirectionStats(n_layers=2, hidden=6)
    for i, (t, x) in enumerate(zip(tasks, X)):
        st.add(str(i), t, diffs=x, d=x.mean(0), applied=x.mean(0))
    D = X.mean(1)
    U = D / np.linalg.norm(D, axis=1, keepdims=True)
    G = U @ U.T
    idx = {t: [i for i, x in enumerate(tasks) if x == t] for t in ("sound", "music", "speech")}
    tk = st.task_consistency()
    for a, ta in enumerate(tk["tasks"]):
        for b, tb in enumerate(tk["tasks"]):
            block = G[np.ix_(idx[ta], idx[tb])]
            if ta == tb:
                n = len(idx[ta])
                want = (block.sum() - n) / (n * (n - 1)) if n > 1 else None
            else:
                want = block.mean()
            close_lists([tk["item_cosine"][a][b]], [want], 1e-12)
    assert tk["item_cosine"][2][2] is None  # one speech item: no within-task pair
    L1 = X[:, 1] / np.linalg.norm(X[:, 1], axis=1, keepdims=True)
    assert st.per_layer()["consistency"][1] == pytest.approx(((L1 @ L1.T).sum() - 9) / 72, abs=1e-12)
