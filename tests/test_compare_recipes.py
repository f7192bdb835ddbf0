"""The recipe comparison (eeengine.training.compare_recipes): the grid trains real (tiny)
checkpoints and skips finished cells; the tables' statistics and paired claims against values
computed by hand."""

from __future__ import annotations

import json
import math

import pytest

from eeengine.training.compare_recipes import (
    aggregate,
    claims,
    main,
    mean_std,
    read_cell,
    run_grid,
)


def test_mean_std_by_hand() -> None:
    assert mean_std([1.0, None, 3.0]) == {"mean": 2.0, "std": math.sqrt(2.0), "n": 2}
    assert mean_std([5.0]) == {"mean": 5.0, "std": 0.0, "n": 1}
    assert mean_std([None, None]) is None


def cell(recipe: str, seed: int, per_exit: list[float], pcee2: float | None) -> dict:
    return {
        "task": "t",
        "recipe": recipe,
        "seed": seed,
        "metric": "accuracy",
        "seconds": 10.0,
        "per_exit": per_exit,
        "learned": {},
        "trade_off": {"pcee": {"1.5": None, "2": pcee2, "3": None}},
        "curve": {"pcee": [pcee2, None]},
    }


def test_claims_are_paired_by_seed() -> None:
    cells = {
        "joint": [cell("joint", 1, [50, 60, 70], 65.0), cell("joint", 2, [52, 62, 72], 60.0)],
        "weighted": [
            cell("weighted", 2, [50, 64, 75], 61.0),
            cell("weighted", 1, [40, 60, 71], None),
        ],
        "alternating": [cell("alternating", 1, [50, 60, 70], 66.0)],
    }
    rows = {(r["recipe"], r["measure"]): r for r in claims(cells)}
    # PCEE-BERT, deep exits (2 and 3 of 3): seed 1 (60+71)/2 - (60+70)/2 = 0.5, seed 2: 2.5.
    deep = rows[("weighted", "exits:-2,-1")]
    assert deep["difference"]["mean"] == pytest.approx(1.5)
    assert deep["difference"]["std"] == pytest.approx(math.sqrt(2.0))
    assert (deep["seeds_favouring"], deep["seeds"]) == (2, 2)
    # BERxiT at >= 2x under pcee: one seed, 66 - 65.
    assert rows[("alternating", "pcee@2")]["difference"]["mean"] == pytest.approx(1.0)
    # No elbert cells: its claims are left out; a missing trade-off point drops that seed.
    assert not any(recipe == "elbert" for recipe, _ in rows)
    assert ("weighted", "pcee@2") not in rows  # not a claim of the table


def test_aggregate_means_over_seeds() -> None:
    cells = [cell("joint", 1, [50, 60], 65.0), cell("joint", 2, [52, 64], None)]
    row = aggregate(cells)["t"]["recipes"]["joint"]
    assert row["seeds"] == [1, 2]
    assert [s["mean"] for s in row["per_exit"]] == [51.0, 62.0]
    assert row["trade_off"]["pcee"]["2"] == {"mean": 65.0, "std": 0.0, "n": 1}
    assert row["trade_off"]["pcee"]["3"] is None


def test_read_cell_picks_the_best_point_at_each_speedup(tmp_path) -> None:
    points = [  # 6 layers: speed-ups 6/4 = 1.5, 6/3 = 2, 6/2 = 3, 6/1.5 = 4
        {"threshold": 0.1, "metric": 80.0, "avg_exit_layer": 4.0},
        {"threshold": 0.2, "metric": 79.0, "avg_exit_layer": 3.0},
        {"threshold": 0.3, "metric": 79.5, "avg_exit_layer": 2.9},
        {"threshold": 0.4, "metric": 70.0, "avg_exit_layer": 1.5},
    ]
    calibration = {"metric": "accuracy", "num_layers": 6, "full_depth": 81.0}
    calibration["policies"] = {"pcee": points, "entropy": points[:1]}
    manifest = {
        "task": {"name": "sst2"},
        "training": {
            "recipe": "elbert",
            "config": {"seed": 7},
            "dev_metric": "accuracy",
            "seconds": 1.5,
            "dev_exit_metrics": [70.0, 75.0, 78.0, 80.0, 81.0, 81.0],
        },
    }
    (tmp_path / "eeengine.json").write_text(json.dumps(manifest))
    (tmp_path / "calibration.json").write_text(json.dumps(calibration))
    result = read_cell(tmp_path)
    assert (result["task"], result["recipe"], result["seed"]) == ("sst2", "elbert", 7)
    assert result["trade_off"] == {"pcee": {"1.5": 80.0, "2": 79.5, "3": 70.0}}
    assert result["curve"]["pcee"][0] == 80.0  # speed-up >= 1: the best point overall


def test_grid_trains_each_cell_once_and_reports(tiny_bert_dir, tiny_csv_task, tmp_path) -> None:
    train_args = [
        "--base-model", str(tiny_bert_dir),
        "--train-file", str(tiny_csv_task / "train.csv"),
        "--dev-file", str(tiny_csv_task / "dev.csv"),
        "--text-column", "review", "--label-column", "verdict",
        "--batch-size", "16", "--save-every", "0",
    ]  # fmt: skip
    workdir = tmp_path / "grid"
    trained = run_grid(["user"], ["joint", "elbert"], [1, 2], workdir, train_args, jobs=2)
    assert sorted(path.name for path, _ in trained) == [
        "user-elbert-s1", "user-elbert-s2", "user-joint-s1", "user-joint-s2",
    ]  # fmt: skip
    assert all(status == 0 for _, status in trained)
    assert run_grid(["user"], ["joint", "elbert"], [1, 2], workdir, train_args, jobs=2) == []

    assert main(["report", "--workdir", str(workdir), "--out", str(tmp_path / "out" / "r")]) == 0
    report = json.loads((tmp_path / "out" / "r.json").read_text())
    assert len(report["cells"]) == 4
    (task,) = report["tasks"].values()
    assert list(task["recipes"]) == ["joint", "elbert"]
    elbert_claims = [c for c in task["claims"] if c["recipe"] == "elbert"]
    assert elbert_claims and all(c["seeds"] == 2 for c in elbert_claims[:1])
    markdown = (tmp_path / "out" / "r.md").read_text()
    assert "| elbert | 2 |" in markdown and "ELBERT: learnable loss weights" in markdown
    assert "elbert learned loss_weights (layer 1 first): " in markdown
    assert (tmp_path / "out" / "r.png").stat().st_size > 0


def test_report_without_checkpoints_names_the_folder(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no trained checkpoint"):
        main(["report", "--workdir", str(tmp_path), "--out", str(tmp_path / "r")])
