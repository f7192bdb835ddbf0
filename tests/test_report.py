"""Trade-off report (eeengine eval --sweep): JSON, markdown and PNG of every policy."""

import json

import pytest

from eeengine.cli import main
from eeengine.data import get_task, glue_dataset
from eeengine.report import pareto_front, summarize
from tests.test_calibration import CALIBRATION


def test_pareto_front_keeps_points_better_than_every_faster_one():
    points = [
        {"avg_exit_layer": avg, "metrics": {"f1": f1}}
        for avg, f1 in [(3.0, 80.0), (1.0, 70.0), (2.0, 69.0), (2.0, 75.0), (4.0, 79.0), (5, 81)]
    ]
    front = pareto_front(points, "f1")
    assert [(p["avg_exit_layer"], p["metrics"]["f1"]) for p in front] == [
        (1.0, 70.0),
        (2.0, 75.0),
        (3.0, 80.0),
        (5, 81),
    ]


def test_summarize_per_policy():
    rows = {row["policy"]: row for row in summarize(CALIBRATION, targets=(1.5, 2.0), max_drop=1.0)}
    assert list(rows) == ["entropy", "pcee"]
    entropy = rows["entropy"]
    assert [t["target"] for t in entropy["at_speedup"]] == [1.5, 2.0]
    assert [t["point"]["threshold"] for t in entropy["at_speedup"]] == [0.3, 0.3]
    assert entropy["within_drop"]["threshold"] == 0.3  # 88.0 at 2.4x loses 2 points
    assert rows["pcee"]["within_drop"]["avg_exit_layer"] == 2.8
    assert summarize(CALIBRATION, targets=(2.5,))[0]["at_speedup"][0]["point"] is None


@pytest.fixture(scope="module")
def mrpc_report(tiny_ckpt, tmp_path_factory):
    """eeengine eval --sweep on MRPC dev pairs (F1 primary, accuracy beside it)."""
    prefix = tmp_path_factory.mktemp("report") / "out" / "mrpc"
    code = main(
        ["eval", "--ckpt", str(tiny_ckpt), "--task", "mrpc", "--sweep", "--out", str(prefix)]
    )
    assert code == 0
    return prefix


def test_sweep_writes_json_with_every_policy_and_reference(mrpc_report):
    report = json.loads(mrpc_report.with_suffix(".json").read_text())
    assert report["task"] == "mrpc" and report["examples"] == 408
    assert report["metric"] == "f1" and report["metrics"] == ["f1", "accuracy"]
    assert set(report["policies"]) == {
        "entropy",
        "normalized_entropy",
        "max_prob",
        "patience",
        "pcee",
        "elbert",
        "mpee",
        "budget",
    }
    assert [e["layer"] for e in report["exits"]] == [1, 2, 3, 4]
    assert report["exits"][-1]["metrics"] == report["full_depth_metrics"]
    assert [row["policy"] for row in report["summary"]] == list(report["policies"])
    point = report["policies"]["pcee"][0]
    assert set(point) >= {"threshold", "patience", "metric", "metrics", "avg_exit_layer"}
    assert set(point["metrics"]) == {"f1", "accuracy"}


def test_sweep_writes_markdown_and_png(mrpc_report, capsys):
    md = mrpc_report.with_suffix(".md").read_text()
    assert "| policy | f1 / accuracy at ≥ 1.5x | f1 / accuracy at ≥ 2x |" in md
    assert "best speed-up within 1 point of full depth" in md
    assert "| exit layer | 1 | 2 | 3 | 4 |" in md
    for name in ("| entropy |", "| elbert |", "| budget |", "| f1 |", "| accuracy |"):
        assert name in md
    png = mrpc_report.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_sweep_default_prefix(tiny_ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--ckpt", str(tiny_ckpt), "--sweep"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "sweep-sst2.json",
        "sweep-sst2.md",
        "sweep-sst2.png",
    ]
    assert "wrote sweep-sst2.json" in capsys.readouterr().out


def test_sweep_of_a_missing_split(tiny_ckpt, tmp_path, capsys):
    args = ["eval", "--ckpt", str(tiny_ckpt), "--task", "qnli", "--split", "train", "--sweep"]
    assert main([*args, "--out", str(tmp_path / "x")]) == 2
    assert "not found" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_tasks_report_their_official_metrics():
    assert (get_task("mrpc").metric, get_task("mrpc").extra_metrics) == ("f1", ("accuracy",))
    assert (get_task("stsb").metric, get_task("stsb").extra_metrics) == ("pearson", ("spearman",))
    assert get_task("cola").extra_metrics == ()
    assert glue_dataset("stsb").extra_metrics == ("spearman",)  # what the trainer sweeps with
