import sys

import pytest
from test_leaderboard import BETTER, rec, with_items

from pkt_bench.api import UserError
from pkt_bench.leaderboard import scores
from pkt_bench.plots import plot

PNG = b"\x89PNG\r\n\x1a\n"


def png_size(path):
    data = path.read_bytes()
    assert data.startswith(PNG)
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # IHDR width, height


def records():
    out = BETTER + [with_items("student", 0, 0.1), rec("lora", "mmlu", 0, 0.5), rec("student", "mmlu", 0, 0.4)]
    for r in out:
        r["wall_s"] = 2.0 if r["method"] == "student" else 30.0
        r["costs"] = {"teacher_forward": 64} if r["method"] == "sensitivity" else {}
    return out


def test_scores_per_task_and_cost_against_gain(tmp_path):
    written = plot(scores(records(), baseline="lora"), tmp_path)
    # the mmlu records carry no per-item values: scores without CIs, and no paired Δ to plot against cost
    assert sorted(p.name for p in written) == ["cost-probe.png", "scores-mmlu.png", "scores-probe.png"]
    three_methods, two_methods = png_size(tmp_path / "scores-probe.png"), png_size(tmp_path / "scores-mmlu.png")
    assert three_methods[1] > two_methods[1]  # one row per method
    teacher_cost = plot(scores(records(), ["probe"], baseline="lora"), tmp_path / "tf", cost="teacher_forward")
    assert [p.name for p in teacher_cost] == ["scores-probe.png", "cost-probe.png"]


def test_without_a_baseline_only_score_plots(tmp_path):
    assert [p.name for p in plot(scores(records(), ["probe"]), tmp_path)] == ["scores-probe.png"]


def test_unknown_cost_and_missing_matplotlib_are_user_errors(tmp_path, monkeypatch):
    rows = scores(records(), baseline="lora")
    with pytest.raises(UserError, match="no record states a cost 'gpu_hours'; use one of: teacher_forward, wall_s"):
        plot(rows, tmp_path, cost="gpu_hours")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(UserError, match=r"pip install 'pkt-bench\[plots\]'"):
        plot(rows, tmp_path)
    assert not list(tmp_path.iterdir())
