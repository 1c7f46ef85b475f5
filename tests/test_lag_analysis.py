"""LAG analysis metrics against hand-computed values on small fixed arrays; no training."""

from __future__ import annotations

import glob
import json
import math
import os
import warnings

import numpy as np
import pytest

from megagrow.lag.analysis import (align, analyze, correlations_with_final, load_probe_results, recall_at_k,
                                   regret, self_correlation, settling_step)

# 4 candidates (A, B, C, D) x 3 steps. Finals 1, 2, 3, 4: A is the final best, spread max - min = 3.
STEPS = np.array([10, 20, 30])
FINALS = np.array([1.0, 2.0, 3.0, 4.0])
LOSSES = np.array([
    # step 10: reversed order (perfect negative); step 20: B and C tie; step 30: B ahead of A
    [4.0, 2.0, 1.5],   # A
    [3.0, 1.0, 1.0],   # B
    [2.0, 1.0, 3.0],   # C
    [1.0, 3.0, 4.0],   # D
])


def test_correlations_with_final():
    pearson, spearman = correlations_with_final(LOSSES, FINALS)
    # finals centred: dy = [-1.5, -0.5, 0.5, 1.5], sum dy^2 = 5.
    # step 10: x = [4, 3, 2, 1] = 5 - finals -> both -1.
    # step 20: x = [2, 1, 1, 3], mean 1.75, dx = [.25, -.75, -.75, 1.25]; sum dx*dy = 1.5, sum dx^2 = 2.75
    #   Pearson = 1.5 / sqrt(2.75 * 5) = 0.404520.
    #   ranks (tie -> average) [3, 1.5, 1.5, 4], centred [.5, -1, -1, 1.5]: sum = 1.5, sum sq = 4.5
    #   Spearman = 1.5 / sqrt(4.5 * 5) = 1 / sqrt(10) = 0.316228.
    # step 30: x = [1.5, 1, 3, 4], mean 2.375, dx = [-.875, -1.375, .625, 1.625]; sum dx*dy = 4.75,
    #   sum dx^2 = 5.6875 -> Pearson = 4.75 / sqrt(5.6875 * 5) = 0.890734.
    #   ranks [2, 1, 3, 4] vs [1, 2, 3, 4]: sum d^2 = 2 -> 1 - 6 * 2 / (4 * 15) = 0.8.
    np.testing.assert_allclose(pearson, [-1.0, 1.5 / math.sqrt(2.75 * 5), 4.75 / math.sqrt(5.6875 * 5)], rtol=1e-12)
    np.testing.assert_allclose(spearman, [-1.0, 1 / math.sqrt(10), 0.8], rtol=1e-12)


def test_constant_step_gives_nan_without_warning():
    losses = np.array([[2.0, 1.0], [2.0, 2.0], [2.0, 3.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pearson, spearman = correlations_with_final(losses, np.array([1.0, 2.0, 3.0]))
        sc = self_correlation(losses)
    assert math.isnan(pearson[0]) and math.isnan(spearman[0])
    assert pearson[1] == pytest.approx(1.0) and spearman[1] == pytest.approx(1.0)
    assert np.isnan(sc[0]).all() and np.isnan(sc[:, 0]).all() and sc[1, 1] == 1.0


def test_self_correlation():
    sc = self_correlation(LOSSES)
    assert sc.shape == (3, 3)
    np.testing.assert_array_equal(np.diag(sc), [1.0, 1.0, 1.0])
    np.testing.assert_allclose(sc, sc.T)
    # steps 10 vs 30: ranks [4, 3, 2, 1] vs [2, 1, 3, 4], d = [2, 2, -1, -3], sum d^2 = 18
    #   -> 1 - 6 * 18 / 60 = -0.8.
    assert sc[0, 2] == pytest.approx(-0.8)
    # steps 10 vs 20 (tie): ranks centred [1.5, .5, -.5, -1.5] . [.5, -1, -1, 1.5] = -1.5, norms^2 5 and 4.5
    #   -> -1.5 / sqrt(22.5) = -1 / sqrt(10).
    assert sc[0, 1] == pytest.approx(-1 / math.sqrt(10), rel=1e-12)


def test_recall_at_k():
    # A (final best) has 3, 2, 1 candidates strictly below it at steps 10, 20, 30.
    np.testing.assert_array_equal(recall_at_k(LOSSES, FINALS, 1), [0, 0, 0])
    np.testing.assert_array_equal(recall_at_k(LOSSES, FINALS, 2), [0, 0, 1])
    np.testing.assert_array_equal(recall_at_k(LOSSES, FINALS, 3), [0, 1, 1])
    np.testing.assert_array_equal(recall_at_k(LOSSES, FINALS, 4), [1, 1, 1])


def test_regret():
    # chosen: D (4.0) at step 10, B (first of the B/C tie, 2.0) at 20, B at 30; min final 1, spread 3.
    r, rel = regret(LOSSES, FINALS)
    np.testing.assert_allclose(r, [3.0, 1.0, 1.0])
    np.testing.assert_allclose(rel, [1.0, 1 / 3, 1 / 3])
    # every final equal: regret 0 and relative regret 0 (not 0 / 0)
    r, rel = regret(LOSSES, np.array([2.0, 2.0, 2.0, 2.0]))
    np.testing.assert_array_equal(r, [0, 0, 0])
    np.testing.assert_array_equal(rel, [0, 0, 0])


def test_settling_step():
    assert settling_step(STEPS, LOSSES, FINALS) is None  # A is never chosen
    finals = np.array([1.0, 2.0])
    # chosen: B, A, A -> settles at 20
    assert settling_step(STEPS, np.array([[3.0, 1.0, 1.0], [2.0, 2.0, 2.0]]), finals) == 20
    # chosen: A, B, A -> leaves A at 20, so it settles only at 30
    assert settling_step(STEPS, np.array([[1.0, 3.0, 1.0], [2.0, 2.0, 2.0]]), finals) == 30
    # chosen A throughout -> the first step
    assert settling_step(STEPS, np.array([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]), finals) == 10


def test_align_intersects_steps():
    curves = {"a": [(10, 3.0), (20, 2.0), (30, 1.0)], "b": [(30, 1.5), (10, 2.5), (40, 0.5)],
              "c": [(10, 4.0), (30, 2.0), (30, 1.8)]}  # c logged 30 twice (resumed): the last counts
    steps, specs, losses = align(curves)
    np.testing.assert_array_equal(steps, [10, 30])
    assert specs == ["a", "b", "c"]
    np.testing.assert_allclose(losses, [[3.0, 1.0], [2.5, 1.5], [4.0, 1.8]])


def _write(lag_dir, name, record):
    os.makedirs(lag_dir / name)
    (lag_dir / name / "result.json").write_text(json.dumps(record))


def test_load_probe_results_skips_failed(tmp_path):
    _write(tmp_path, "p1", {"spec": "lag:p=1,b=1,init=dup", "status": "done", "curve": [[5, 3.0], [10, 2.5]],
                            "final_loss": 2.0})
    _write(tmp_path, "p2", {"spec": "lag:p=2,b=1,init=dup", "status": "done", "curve": [[5, 3.1], [10, 2.4]],
                            "final_loss": 1.9})
    _write(tmp_path, "p3", {"spec": "lag:p=3,b=1,init=dup", "status": "failed", "reason": "exited with code 1",
                            "curve": [], "final_loss": None})
    curves, finals = load_probe_results(str(tmp_path))
    assert curves == {"lag:p=1,b=1,init=dup": [(5, 3.0), (10, 2.5)], "lag:p=2,b=1,init=dup": [(5, 3.1), (10, 2.4)]}
    assert finals == {"lag:p=1,b=1,init=dup": 2.0, "lag:p=2,b=1,init=dup": 1.9}
    # one done probe without a final loss -> no finals at all
    _write(tmp_path, "p4", {"spec": "lag:p=4,b=1,init=dup", "status": "done", "curve": [[5, 3.2]],
                            "final_loss": None})
    curves, finals = load_probe_results(str(tmp_path))
    assert len(curves) == 3 and finals is None


def _curves():
    return {spec: [(int(t), float(v)) for t, v in zip(STEPS, row)] for spec, row in zip("ABCD", LOSSES)}


def test_analyze_writes_json_figures_and_tensorboard(tmp_path):
    out, tb = tmp_path / "out", tmp_path / "tb"
    s = analyze(_curves(), dict(zip("ABCD", FINALS)), str(out), tensorboard_dir=str(tb))
    on_disk = json.loads((out / "lag_analysis.json").read_text())
    assert on_disk == s
    assert s["steps"] == [10, 20, 30] and s["specs"] == ["A", "B", "C", "D"]
    assert s["final_best"] == "A" and s["chosen"] == ["D", "B", "B"] and s["settling_step"] is None
    assert s["recall_at_k"] == {"1": [0, 0, 0], "2": [0, 0, 1], "3": [0, 1, 1]}
    assert s["regret"] == pytest.approx([3.0, 1.0, 1.0])
    assert s["spearman"] == pytest.approx([-1.0, 1 / math.sqrt(10), 0.8], rel=1e-12)
    assert len(s["self_correlation"]) == 3
    for name in ("correlation_vs_step", "self_correlation", "recall_at_k", "regret", "probe_curves"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert glob.glob(str(tb / "events.out.tfevents.*"))


def test_analyze_without_finals_uses_last_common_step(tmp_path):
    s = analyze(_curves(), None, str(tmp_path))
    # finals = step-30 losses [1.5, 1, 3, 4]: B is best, chosen D, B, B -> settles at 20
    assert s["final_best"] == "B" and s["settling_step"] == 20
    assert s["spearman"][-1] == pytest.approx(1.0)
    assert s["regret"] == pytest.approx([3.0, 0.0, 0.0])
    assert not glob.glob(str(tmp_path / "events.out.tfevents.*"))


def test_analyze_rejects_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="at least 2 candidates"):
        analyze({"A": [(10, 1.0)]}, None, str(tmp_path))
    with pytest.raises(ValueError, match="no step in common"):
        analyze({"A": [(10, 1.0)], "B": [(20, 1.0)]}, None, str(tmp_path))
    with pytest.raises(ValueError, match="no final loss for B"):
        analyze({"A": [(10, 1.0)], "B": [(10, 2.0)]}, {"A": 1.0}, str(tmp_path))
