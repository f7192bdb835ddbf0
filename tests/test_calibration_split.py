"""The calibration protocol: model selection and thresholds come from rows held out of the
training data (or a calibration file), never from the dev set that is reported; the schedule
adapts to the data size."""

import json
import shutil
from collections import Counter

import pytest

from eeengine.cli import main
from eeengine.data import Split, calibration_size, file_dataset, holdout_split
from eeengine.training import TrainConfig, train
from eeengine.training.calibration_slice import calibration_slice
from eeengine.training.plan import describe_plan, load_dataset, schedule, split_calibration
from tests.conftest import SENTENCES, csv_config, write_rows


@pytest.mark.parametrize(
    ("rows", "expected"),
    [(67349, 2000), (3668, 367), (2490, 249), (600, 100), (300, 75), (40, 10)],
)
def test_calibration_size_rule(rows, expected):
    assert calibration_size(rows) == expected


def _split(n: int, positive_share: float) -> Split:
    labels = [int(i < positive_share * n) for i in range(n)]
    return Split([f"text {i}" for i in range(n)], None, labels)


@pytest.mark.parametrize(("n", "share", "size"), [(1000, 0.7, 100), (101, 0.33, 17), (50, 0.5, 7)])
def test_holdout_is_stratified_disjoint_and_seeded(n, share, size):
    split = _split(n, share)
    rest, held = holdout_split(split, size, seed=3, stratify=True)
    assert len(held.texts) == size and len(rest.texts) == n - size
    assert set(rest.texts).isdisjoint(held.texts)
    assert sorted(rest.texts + held.texts) == sorted(split.texts)
    # every class keeps its share: within one row of size * share
    positives = Counter(held.labels)[1]
    assert abs(positives - size * share) <= 1
    # the rows keep their labels and the original order
    for text, label in zip(held.texts, held.labels, strict=True):
        assert label == int(int(text.split()[1]) < share * n)
    assert held.texts == sorted(held.texts, key=lambda t: int(t.split()[1]))
    assert holdout_split(split, size, seed=3, stratify=True)[1] == held
    assert holdout_split(split, size, seed=4, stratify=True)[1] != held


def test_holdout_regression_and_bad_sizes():
    split = Split(["a", "b", "c", "d"], ["w", "x", "y", "z"], [0.5, 1.5, 2.5, 3.5])
    rest, held = holdout_split(split, 1, seed=0, stratify=False)
    assert len(held.texts) == 1 and held.text_pairs[0] == "wxyz"["abcd".index(held.texts[0])]
    assert held.labels[0] == 0.5 + "abcd".index(held.texts[0])
    for size in (0, 4):
        with pytest.raises(ValueError, match=f"cannot hold out {size} of 4 rows"):
            holdout_split(split, size, seed=0, stratify=False)


@pytest.mark.parametrize(
    ("rows", "pairs", "overrides", "expected"),
    [
        # SST-2: one epoch is plenty of steps, 64 tokens as before the small-data rule
        (65349, False, {}, {"epochs": 1.0, "total_steps": 2043, "eval_every": 0}),
        # 600 rows less 100 held out: 16 steps an epoch, 10 epochs (the cap), every epoch;
        # single sentences keep 64 tokens
        (500, False, {}, {"epochs": 10.0, "total_steps": 160, "eval_every": 16}),
        # small pair data (RTE, 600 rows) trains at the inference length
        (500, True, {}, {"total_steps": 160, "max_seq_length": 128}),
        (500, True, {"eval_max_seq_length": 256}, {"max_seq_length": 256}),
        # MRPC: 3 epochs reach 300 steps; 3,301 pairs are not small data
        (3301, True, {}, {"epochs": 3.0, "total_steps": 312, "eval_every": 104}),
        # the small-data rule is strictly below small_data rows; an explicit length wins
        (1999, True, {}, {"max_seq_length": 128}),
        (2000, True, {}, {"max_seq_length": 64}),
        (500, True, {"small_data": 400}, {"max_seq_length": 64}),
        (500, True, {"max_seq_length": 64}, {"max_seq_length": 64}),
        (65349, False, {"max_seq_length": 32}, {"max_seq_length": 32}),
        # the contrastive stage: 2 pairs a row in each of 5 rounds, 16 pairs a step, for
        # classification below small_data rows unless set
        # and the backbone fine-tunes at a lower lr after it, unless lr is set
        (500, False, {}, {"contrastive_steps": 313, "lr": 2e-5}),
        (500, False, {"lr": 5e-5}, {"contrastive_steps": 313, "lr": 5e-5}),
        (65349, False, {}, {"contrastive_steps": 0, "lr": 1e-4}),
        (1999, True, {}, {"max_seq_length": 128, "contrastive_steps": 1250}),
        (2000, False, {}, {"contrastive_steps": 0}),
        (500, False, {"contrastive": False}, {"contrastive_steps": 0, "lr": 1e-4}),
        (500, False, {"contrastive_rounds": 2, "small_data": 400}, {"contrastive_steps": 0}),
        (65349, False, {"contrastive": True, "contrastive_rounds": 1}, {"contrastive_steps": 8169}),
        # label smoothing for classification below small_data rows, unless set
        (500, False, {}, {"label_smoothing": 0.1}),
        (500, True, {}, {"max_seq_length": 128, "label_smoothing": 0.1}),
        (1999, False, {}, {"label_smoothing": 0.1}),
        (2000, False, {}, {"label_smoothing": 0.0}),
        (65349, False, {}, {"label_smoothing": 0.0}),
        (500, False, {"label_smoothing": 0.0}, {"label_smoothing": 0.0}),
        (65349, False, {"label_smoothing": 0.2}, {"label_smoothing": 0.2}),
        # no early stopping below small_data rows (regression too), unless set
        (500, False, {}, {"early_stopping": 0}),
        (1999, True, {}, {"max_seq_length": 128, "early_stopping": 0}),
        (2000, False, {}, {"early_stopping": 2}),
        (500, False, {"early_stopping": 3}, {"early_stopping": 3}),
        (65349, False, {"early_stopping": 0}, {"early_stopping": 0}),
        # explicit epochs win
        (
            500,
            False,
            {"epochs": 2.0, "eval_every": 5},
            {"epochs": 2.0, "total_steps": 32, "eval_every": 5},
        ),
    ],
)
def test_schedule_adapts_to_the_data_size(rows, pairs, overrides, expected):
    plan = schedule(TrainConfig(base_model="", **overrides), rows, pairs)
    expected = {"max_seq_length": 64, **expected}
    assert {k: plan[k] for k in expected} == expected


@pytest.mark.parametrize(
    ("rows", "pairs", "overrides", "says"),
    [
        (
            500,
            True,
            {},
            "32, truncated to 128 tokens (chosen for sentence pairs, fewer than 2000 training "
            "rows); label smoothing 0.1 (chosen for classification, fewer than 2000 training "
            "rows); best step",
        ),
        (500, False, {"label_smoothing": 0.0}, "32, truncated to 64 tokens; best step"),
        (3301, True, {}, "32, truncated to 64 tokens; best step"),
        (3301, True, {"label_smoothing": 0.1}, "64 tokens; label smoothing 0.1; best step"),
        (500, True, {"max_seq_length": 128}, "32, truncated to 128 tokens; label smoothing"),
        (500, False, {"probe_init": True}, "heads from a linear probe of 500 rows; label"),
        (
            500,
            False,
            {},
            "(stratified); first 313 contrastive steps of 16 pairs (last layer's embeddings, "
            "lr 2e-05) (chosen for classification, fewer than 2000 training rows), then at "
            "backbone lr 2e-05 (chosen after the contrastive stage): 10 epoch",
        ),
        (
            500,
            False,
            {"contrastive": True, "contrastive_exits": "all", "lr": 1e-4},
            "(all layer's embeddings, lr 2e-05), then 10 epoch",
        ),
        (65349, False, {}, "(stratified); 1 epoch"),
        (
            500,
            False,
            {},
            "evaluated every 16 steps, no early stopping (chosen for fewer than 2000 training "
            "rows); fp32",
        ),
        (2000, False, {}, "evaluated every 63 steps, stopping after 2 evaluations without a gain;"),
        (500, False, {"early_stopping": 0}, "evaluated every 16 steps; fp32"),
        (500, False, {"early_stopping": 1}, "stopping after 1 evaluations without a gain"),
        (
            65349,
            False,
            {"label_smoothing": 0.1, "ema_decay": 0.998},
            "label smoothing 0.1; the moving average of the weights (decay 0.998) kept",
        ),
    ],
)
def test_the_plan_says_what_it_chose(rows, pairs, overrides, says):
    config = TrainConfig(base_model="", **overrides)
    plan = schedule(config, rows, pairs)
    assert says in describe_plan(plan, rows, "x (stratified)", False, config)


def test_no_contrastive_stage_nor_label_smoothing_for_regression():
    plan = schedule(TrainConfig(base_model=""), 500, classification=False)
    assert plan["contrastive_steps"] == 0 and plan["label_smoothing"] == 0.0
    with pytest.raises(ValueError, match="--contrastive needs class labels"):
        schedule(TrainConfig(base_model="", contrastive=True), 500, classification=False)


def test_dev_plays_no_part_in_selection_or_calibration(tiny_bert_dir, tiny_csv_task, tmp_path):
    """Two runs that differ only in their dev file (one with every label flipped) keep the same
    best step, weights and calibration; only the dev report differs."""
    rows = [[t, "good" if i % 2 == 0 else "bad"] for i, t in enumerate(SENTENCES * 5)][:12]
    flipped = [[t, "bad" if v == "good" else "good"] for t, v in rows]
    write_rows(tmp_path / "flipped.csv", ["review", "verdict"], flipped)
    runs = []
    for name, dev in (("a", tiny_csv_task / "dev.csv"), ("b", tmp_path / "flipped.csv")):
        config = csv_config(tiny_bert_dir, tiny_csv_task, epochs=3.0, dev_file=str(dev))
        path = train(config, tmp_path / name, progress=False)
        runs.append(
            (
                json.loads((path / "eeengine.json").read_text())["training"],
                (path / "calibration.json").read_text(),
                (path / "model.safetensors").read_bytes(),
            )
        )
    (first, calib_a, weights_a), (second, calib_b, weights_b) = runs
    assert first["best_step"] == second["best_step"]
    assert calib_a == calib_b and weights_a == weights_b
    assert first["calibration_exit_metrics"] == second["calibration_exit_metrics"]
    flipped_metric = [100.0 - m for m in first["dev_exit_metrics"]]
    assert second["dev_exit_metrics"] == pytest.approx(flipped_metric)
    assert first["calibration_data"]["examples"] == 10  # 40 training rows: a quarter at most
    reports = first["default_policy"]
    assert set(reports) == {"calibration", "dev"}
    for report in reports.values():
        assert report["drop"] == pytest.approx(report["full_depth"] - report["metric"])


def test_calib_file_replaces_the_holdout(tiny_bert_dir, tiny_csv_task, tmp_path, capsys):
    config = csv_config(tiny_bert_dir, tiny_csv_task, calib_file=str(tiny_csv_task / "dev.csv"))
    path = train(config, tmp_path / "c", progress=False)
    training = json.loads((path / "eeengine.json").read_text())["training"]
    assert training["calibration_data"] == {
        "source": str(tiny_csv_task / "dev.csv"),
        "examples": 12,
    }
    assert training["train_examples"] == 40  # nothing held out of train.csv
    assert main(["info", str(path)]) == 0
    promised = training["default_policy"]["calibration"]["drop"]
    expected = f"on {tiny_csv_task / 'dev.csv'}: default policy promised a drop of {promised:.2f}"
    assert expected in capsys.readouterr().out
    with pytest.raises(ValueError, match="--calib-file needs --train-file"):
        train(TrainConfig(base_model=str(tiny_bert_dir), calib_file="x.csv"), tmp_path / "g", False)


# --- the checkpoint's calibration split, rebuilt: eeengine calibrate's default ----------------


def _manifest(path) -> dict:
    return json.loads((path / "eeengine.json").read_text())


def test_calibration_slice_is_the_rows_the_trainer_held_out(
    trained_csv_ckpt, tiny_bert_dir, tiny_csv_task
):
    manifest = _manifest(trained_csv_ckpt)
    rebuilt, source = calibration_slice(manifest, trained_csv_ckpt)
    config = csv_config(tiny_bert_dir, tiny_csv_task)
    _, expected, expected_source = split_calibration(config, load_dataset(config))
    assert rebuilt == expected and source == expected_source
    # and independently of the trainer: the stratified, seeded holdout of train.csv
    data = file_dataset(tiny_csv_task / "train.csv", tiny_csv_task / "dev.csv", "review", "verdict")
    _, held = holdout_split(data.train, calibration_size(40), config.seed, stratify=True)
    assert rebuilt == held
    assert manifest["training"]["calibration_data"] == {
        "source": source,
        "examples": len(rebuilt.texts),
    }
    assert len(rebuilt.texts) == 10 and set(rebuilt.texts) <= set(data.train.texts)


def test_cli_calibrate_defaults_to_the_calibration_split(trained_csv_ckpt, tmp_path, capsys):
    """No --split: the CLI calibrates on the rows the trainer calibrated on, so the sweep it
    writes is the trainer's calibration.json again; --split dev still reads the dev file."""
    path = shutil.copytree(trained_csv_ckpt, tmp_path / "ckpt")
    trained = json.loads((path / "calibration.json").read_text())
    args = ["calibrate", "--ckpt", str(path), "--executor", "torch", "--max-drop", "100"]
    assert main([*args, "--write"]) == 0
    assert "train calibration (10 examples, accuracy): " in capsys.readouterr().out
    again = json.loads((path / "calibration.json").read_text())
    assert again["full_depth"] == pytest.approx(trained["full_depth"])
    assert again["policies"].keys() == trained["policies"].keys()
    for name, points in trained["policies"].items():
        assert [p["metric"] for p in again["policies"][name]] == pytest.approx(
            [p["metric"] for p in points]
        )
        assert [p["avg_exit_layer"] for p in again["policies"][name]] == pytest.approx(
            [p["avg_exit_layer"] for p in points]
        )
    assert main([*args, "--split", "dev"]) == 0
    assert "train dev.csv (12 examples, accuracy): " in capsys.readouterr().out


def test_cli_eval_on_the_calibration_split(trained_csv_ckpt, capsys):
    args = ["eval", "--ckpt", str(trained_csv_ckpt), "--policy", "none", "--json"]
    assert main([*args, "--split", "calibration"]) == 0
    report = json.loads(capsys.readouterr().out)
    training = _manifest(trained_csv_ckpt)["training"]
    assert (report["split"], report["examples"]) == ("calibration", 10)
    assert report["per_exit"] == pytest.approx(training["calibration_exit_metrics"])
    assert main(args) == 0  # eval's default stays dev
    report = json.loads(capsys.readouterr().out)
    assert (report["split"], report["examples"]) == ("dev.csv", 12)
    assert report["per_exit"] == pytest.approx(training["dev_exit_metrics"])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.pop("config"), "has no field 'training.config'"),
        (lambda t: t.pop("calibration_data"), "has no field 'training.calibration_data'"),
        (lambda t: t["calibration_data"].update(examples=11), "the data changed since training"),
    ],
)
def test_calibration_split_that_cannot_be_rebuilt(trained_csv_ckpt, tmp_path, edit, message):
    manifest = _manifest(trained_csv_ckpt)
    edit(manifest["training"])
    with pytest.raises(ValueError, match=message):
        calibration_slice(manifest, tmp_path)
