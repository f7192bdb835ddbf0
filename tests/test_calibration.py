"""Picking an operating point: target speed-up and max drop, on hand-built calibrations and on
the tiny checkpoint (Engine(target_speedup=...), engine.calibrate, eeengine calibrate)."""

import json
import shutil

import pytest

import eeengine.calibration
import eeengine.checkpoint as checkpoint_module
from eeengine import Engine
from eeengine._custom_ops import HAS_C, LOAD_ERROR
from eeengine.calibration import select_operating_point
from eeengine.checkpoint import save_checkpoint, update_checkpoint, write_json_atomic
from eeengine.cli import main
from eeengine.data import file_dataset, get_task, load_split
from eeengine.evaluation import evaluate, sweep
from eeengine.metrics import agreement
from eeengine.selection import choose_for_speedup
from tests.conftest import SENTENCES, make_tiny_model, tiny_manifest


def _point(metric: float, avg: float, num_layers: int = 6, **params) -> dict:
    return {
        **params,
        "metric": metric,
        "metrics": {"accuracy": metric},
        "avg_exit_layer": avg,
        "layer_saving": 1 - avg / num_layers,
        "speedup": num_layers / avg,
    }


# Full depth 90.0 on 6 layers. Layer speed-ups: 6 / avg.
CALIBRATION = {
    "metric": "accuracy",
    "num_layers": 6,
    "full_depth": 90.0,
    "full_depth_metrics": {"accuracy": 90.0},
    "policies": {
        "entropy": [
            _point(90.0, 5.0, threshold=0.1),  # 1.2x
            _point(89.7, 3.0, threshold=0.3),  # exactly 2x
            _point(88.0, 2.5, threshold=0.5),  # 2.4x
        ],
        "pcee": [
            _point(89.6, 2.9, threshold=0.2, patience=1),  # 2.07x
            _point(89.6, 2.8, threshold=0.3, patience=1),  # same metric, faster
            _point(89.0, 4.0, threshold=0.1, patience=2),
        ],
    },
}


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        # the most accurate point at >= 2x; 2x exactly counts
        ({"target_speedup": 2.0}, ("entropy", 0.3)),
        # within one policy; equal metric: the faster point
        ({"target_speedup": 2.0, "policy": "pcee"}, ("pcee", 0.3)),
        ({"target_speedup": 2.3}, ("entropy", 0.5)),
        ({"target_speedup": 1.0}, ("entropy", 0.1)),
        # the fastest point within max_drop points of 90.0
        ({"max_drop": 0.5}, ("pcee", 0.3)),
        ({"max_drop": 0.5, "policy": "entropy"}, ("entropy", 0.3)),
        ({"max_drop": 0.0}, ("entropy", 0.1)),
        ({"max_drop": 2.0}, ("entropy", 0.5)),
    ],
)
def test_select_operating_point(kwargs, expected):
    point = select_operating_point(CALIBRATION, **kwargs)
    assert (point.name, point.params["threshold"]) == expected


def test_choose_for_speedup_returns_none_when_too_fast():
    assert choose_for_speedup(CALIBRATION, 2.5) is None
    assert choose_for_speedup(CALIBRATION, 2.1, policy="pcee")[1]["avg_exit_layer"] == 2.8


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of target_speedup and max_drop"),
        ({"target_speedup": 2.0, "max_drop": 0.5}, "exactly one"),
        ({"target_speedup": 0.5}, r"target_speedup must be >= 1"),
        ({"max_drop": -1.0}, "max_drop must be >= 0"),
        (
            {"target_speedup": 3.0},
            r"reaches a layer speed-up of 3x; the fastest is 2.40x \(entropy",
        ),
        (
            {"target_speedup": 2.2, "policy": "pcee"},
            r"policy 'pcee' reaches .* the fastest is 2.14x \(pcee\(threshold=0.3, patience=1\)",
        ),
        (
            {"max_drop": 0.2, "policy": "pcee"},
            r"within 0.2 points of full depth \(accuracy 90.00\); the most accurate loses 0.40",
        ),
        ({"max_drop": 0.5, "policy": "lte"}, "policy 'lte' is not calibrated .*: entropy, pcee"),
    ],
)
def test_selection_errors_say_what_is_reachable(kwargs, message):
    with pytest.raises(ValueError, match=message):
        select_operating_point(CALIBRATION, **kwargs)


def test_sweep_reports_extra_metrics_and_picks_by_the_primary():
    import torch

    logits = torch.randn(4, 30, 2, generator=torch.Generator().manual_seed(0)) * 3
    labels = torch.randint(0, 2, (30,), generator=torch.Generator().manual_seed(1)).tolist()
    result = sweep(logits, labels, "f1", extra_metrics=("accuracy", "f1"))
    assert list(result["full_depth_metrics"]) == ["f1", "accuracy"]
    for points in result["policies"].values():
        for point in points:
            assert point["metric"] == point["metrics"]["f1"]
            assert set(point["metrics"]) == {"f1", "accuracy"}


# --- the tiny checkpoint (4 layers) ---------------------------------------------------------

TINY_CALIBRATION = {
    "metric": "accuracy",
    "num_layers": 4,
    "full_depth": 80.0,
    "policies": {
        "entropy": [
            _point(80.0, 3.5, 4, threshold=0.1),
            _point(79.8, 2.0, 4, threshold=0.5),
        ],
        "elbert": [_point(79.0, 1.5, 4, threshold=0.6, window=2, window_test="stable")],
    },
}


@pytest.fixture(scope="module")
def calibrated_ckpt(tmp_path_factory, tiny_bert_dir, tokenizer):
    """The tiny checkpoint with a hand-built calibration.json."""
    path = tmp_path_factory.mktemp("calibrated") / "tiny"
    return save_checkpoint(
        path, make_tiny_model(tiny_bert_dir), tokenizer, tiny_manifest(), TINY_CALIBRATION
    )


def test_engine_target_speedup_and_max_drop(calibrated_ckpt):
    engine = Engine(calibrated_ckpt, target_speedup=2.0)
    assert (engine.policy.name, engine.policy.threshold) == ("entropy", 0.5)
    assert engine.operating_point.speedup == 2.0
    engine = Engine(calibrated_ckpt, max_drop=1.0)
    assert engine.policy.name == "elbert" and engine.policy.window == 2
    engine = Engine(calibrated_ckpt, policy="entropy", max_drop=1.0)
    assert engine.policy.threshold == 0.5
    assert Engine(calibrated_ckpt).operating_point is None  # the default policy


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_speedup": 2.0, "threshold": 0.3}, "do not pass threshold too"),
        ({"target_speedup": 3.0}, r"the fastest is 2.67x \(elbert"),
        ({"max_drop": 0.5, "policy": "pcee"}, "policy 'pcee' is not calibrated"),
    ],
)
def test_engine_calibration_errors(calibrated_ckpt, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Engine(calibrated_ckpt, **kwargs)


def test_engine_without_calibration_json(tiny_ckpt):
    message = r"no calibration \(calibration.json missing.*eeengine calibrate"
    with pytest.raises(ValueError, match=message):
        Engine(tiny_ckpt, target_speedup=1.5)


@pytest.fixture(scope="module")
def dev():
    return load_split(get_task("sst2"), "dev")


def test_calibrate_switches_to_a_point_the_engine_reproduces(tiny_ckpt, dev):
    engine = Engine(tiny_ckpt)
    texts, labels = dev.texts[:200], dev.labels[:200]
    point = engine.calibrate(texts, labels, target_speedup=1.5, policy="elbert")
    assert point.name == "elbert" and point.speedup >= 1.5
    assert engine.policy.name == "elbert" and engine.operating_point == point
    assert engine.backend == ("cpp" if HAS_C else "reference")  # the fused op runs elbert
    assert set(engine.calibration["policies"]) >= {"entropy", "pcee", "elbert", "budget"}
    # the engine, row by row, takes exactly the exits the sweep measured
    predictions = engine.predict(texts)
    avg = sum(p.exit_layer for p in predictions) / len(predictions)
    assert avg == pytest.approx(point.avg_exit_layer)
    accuracy = 100 * sum(
        engine.label_names.index(p.label) == y for p, y in zip(predictions, labels, strict=True)
    )
    assert accuracy / len(labels) == pytest.approx(point.metric)

    names = [engine.label_names[y] for y in labels]
    point = engine.calibrate(texts, names, max_drop=100.0, policy="budget")
    assert point.params == {"layer": 1}  # anything goes: the fastest point
    assert engine.policy.name == "budget"


@pytest.mark.skipif(not HAS_C, reason=f"C++ extension not available: {LOAD_ERROR}")
def test_calibrate_resolves_the_backend_for_the_new_policy(tiny_ckpt, dev):
    """The chosen policy runs on the C++ op (every policy has one), unless the engine was asked
    for the reference backend, which calibration keeps."""
    texts, labels = dev.texts[:40], dev.labels[:40]
    engine = Engine(tiny_ckpt)
    engine.calibrate(texts, labels, max_drop=100.0, policy="elbert")
    assert (engine.policy.name, engine.backend) == ("elbert", "cpp")
    engine.calibrate(texts, labels, max_drop=100.0, policy="budget")
    assert (engine.policy.name, engine.backend) == ("budget", "cpp")
    pinned = Engine(tiny_ckpt, backend="reference")
    pinned.calibrate(texts, labels, max_drop=100.0, policy="elbert")
    assert (pinned.policy.name, pinned.backend) == ("elbert", "reference")


@pytest.mark.parametrize(
    ("texts", "labels", "kwargs", "error", "message"),
    [
        (SENTENCES, [0] * 3, {"target_speedup": 1.5}, ValueError, "8 texts but 3 labels"),
        (SENTENCES, [0] * 8, {"text_pairs": ["x"]}, ValueError, "8 texts but 1 text_pairs"),
        ([], [], {"target_speedup": 1.5}, ValueError, "at least one text"),
        (SENTENCES, [0] * 7 + [2], {"target_speedup": 1.5}, ValueError, r"labels\[7\] = 2"),
        (SENTENCES, [0] * 7 + ["neutral"], {"max_drop": 1}, ValueError, r"labels\[7\]"),
        (SENTENCES[:2] + [" "], [0] * 3, {"max_drop": 1}, ValueError, r"inputs\[2\] is empty"),
        (SENTENCES, [0] * 8, {}, ValueError, "exactly one of target_speedup and max_drop"),
        (SENTENCES, [0] * 8, {"target_speedup": 9.0}, ValueError, "the fastest is 4.00x"),
        (SENTENCES, [0] * 8, {"max_drop": 1, "policy": "lte"}, ValueError, "not calibrated"),
    ],
)
def test_calibrate_errors_leave_the_engine_unchanged(
    tiny_ckpt, texts, labels, kwargs, error, message
):
    engine = Engine(tiny_ckpt)
    before = (repr(engine.policy), engine.backend, engine.calibration)
    with pytest.raises(error, match=message):
        engine.calibrate(texts, labels, **kwargs)
    assert (repr(engine.policy), engine.backend, engine.calibration) == before


# --- eeengine calibrate [--write] ------------------------------------------------------------


@pytest.fixture
def ckpt_copy(tiny_ckpt, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, path)
    return path


def test_cli_calibrate_without_write_changes_nothing(ckpt_copy, capsys):
    before = {p.name: p.read_bytes() for p in ckpt_copy.iterdir()}
    args = ["calibrate", "--ckpt", str(ckpt_copy), "--task", "sst2", "--split", "dev"]
    assert main([*args, "--max-drop", "1"]) == 0
    out = capsys.readouterr().out
    assert "sst2 dev (872 examples, accuracy)" in out and "layer speed-up" in out
    assert {p.name: p.read_bytes() for p in ckpt_copy.iterdir()} == before


def test_cli_calibrate_write_sets_the_default_policy(ckpt_copy, capsys):
    args = ["calibrate", "--ckpt", str(ckpt_copy), "--split", "dev", "--policy", "pcee"]
    assert main([*args, "--target-speedup", "1.5", "--write"]) == 0
    assert "wrote the default policy" in capsys.readouterr().out
    manifest = json.loads((ckpt_copy / "eeengine.json").read_text())
    calibration = json.loads((ckpt_copy / "calibration.json").read_text())
    assert manifest["policy"]["name"] == "pcee"
    assert manifest["task"]["name"] == "sst2"  # the rest of the manifest is kept
    chosen = [
        p
        for p in calibration["policies"]["pcee"]
        if (p["threshold"], p["patience"])
        == (manifest["policy"]["threshold"], manifest["policy"]["patience"])
    ]
    assert chosen and chosen[0]["speedup"] >= 1.5
    assert set(manifest["policy"]) == {"name", "threshold", "patience"}
    engine = Engine(ckpt_copy)
    assert (engine.policy.threshold, engine.policy.patience) == (
        manifest["policy"]["threshold"],
        manifest["policy"]["patience"],
    )
    assert sorted(p.name for p in ckpt_copy.iterdir() if p.name.startswith(".")) == []


def test_interrupted_write_keeps_both_files(ckpt_copy, monkeypatch):
    before = {p.name: p.read_bytes() for p in ckpt_copy.iterdir()}

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        update_checkpoint(ckpt_copy, {"name": "none"}, TINY_CALIBRATION)
    assert {p.name: p.read_bytes() for p in ckpt_copy.iterdir()} == before  # no temp file left


def test_write_json_atomic_replaces_or_keeps(tmp_path):
    file = tmp_path / "x.json"
    write_json_atomic(file, {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(file, {"a": {1, 2}})  # not serializable: fails while writing
    assert json.loads(file.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_update_checkpoint_validates_the_policy(ckpt_copy):
    with pytest.raises(checkpoint_module.CheckpointError, match="policy.name"):
        update_checkpoint(ckpt_copy, {"threshold": 0.3}, TINY_CALIBRATION)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "mrpc", "--max-drop", "1"], "trained on sst2, not mrpc"),
        (["--split", "dev", "--target-speedup", "100"], "the fastest is 4.00x"),
        (["--split", "dev", "--max-drop", "1", "--policy", "nope"], "policy 'nope' is not"),
        # the tiny checkpoint was not trained: no calibration split to rebuild by default
        (["--max-drop", "1"], "has no field 'training.config'"),
        (["--max-drop", "1"], "--split dev or --dev-file FILE, or on in-domain texts"),
        (["--split", "calibration", "--dev-file", "x.csv"], "--dev-file or --split calibration"),
        (["--unlabeled", "x.csv", "--split", "dev"], "drop --task / --split / --dev-file"),
    ],
)
def test_cli_calibrate_errors(ckpt_copy, capsys, args, message):
    before = (ckpt_copy / "eeengine.json").read_bytes()
    assert main(["calibrate", "--ckpt", str(ckpt_copy), *args, "--write"]) == 2
    assert message in capsys.readouterr().err
    assert (ckpt_copy / "eeengine.json").read_bytes() == before


def test_cli_calibrate_needs_a_target(ckpt_copy, capsys):
    assert main(["calibrate", "--ckpt", str(ckpt_copy), "--split", "dev"]) == 2
    assert "exactly one of target_speedup and max_drop" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("labels", "kwargs"),
    [([0] * 7 + [2], {"max_drop": 1}), ([0] * 8, {}), ([0] * 8, {"target_speedup": 0.5})],
)
def test_bad_arguments_fail_before_the_full_depth_pass(tiny_ckpt, monkeypatch, labels, kwargs):
    engine = Engine(tiny_ckpt)

    def run_model(*args, **kwargs):
        pytest.fail("the model ran before the arguments were checked")

    monkeypatch.setattr(eeengine.calibration, "all_exit_outputs", run_model)
    with pytest.raises(ValueError):
        engine.calibrate(SENTENCES, labels, **kwargs)


def test_calibrate_a_checkpoint_trained_on_user_files(trained_csv_ckpt, tiny_csv_task, capsys):
    """A task from the user's files is not a GLUE name: calibration uses the checkpoint's metric
    (accuracy), and the point it picks is what the engine then measures; with --split dev the
    CLI reads the checkpoint's own dev file."""
    path = trained_csv_ckpt
    engine = Engine(path)
    dev = file_dataset(
        tiny_csv_task / "train.csv", tiny_csv_task / "dev.csv", "review", "verdict"
    ).dev
    labels = [engine.label_names[y] for y in dev.labels]
    point = engine.calibrate(dev.texts, labels, max_drop=100.0, policy="budget")
    assert engine.calibration["metric"] == "accuracy" and point.params == {"layer": 1}
    measured = evaluate(engine, dev, "accuracy")
    assert measured["value"] == pytest.approx(point.metric)
    args = ["calibrate", "--ckpt", str(path), "--max-drop", "100", "--policy", "budget"]
    assert main([*args, "--split", "dev"]) == 0
    assert "dev.csv (12 examples, accuracy): budget(layer=1)" in capsys.readouterr().out


# --- label-free calibration: agreement with full depth ----------------------------------------


def test_agreement_metric_by_hand():
    assert agreement([0, 1, 1, 0], [0, 1, 0, 0]) == 75.0
    # regression: within 5 % of the reference's spread (4.0 here: tolerance 0.2)
    assert agreement([0.1, 1.3, 2.0, 3.19, 5.0], [0.0, 1.0, 2.0, 3.0, 4.0]) == pytest.approx(60.0)


@pytest.mark.parametrize("target", [0.9, 0.99])
def test_calibrate_without_labels_agrees_with_full_depth(tiny_ckpt, dev, target):
    texts = dev.texts[:200]
    full = [p.label for p in Engine(tiny_ckpt, policy="none").predict(texts)]
    engine = Engine(tiny_ckpt)
    point = engine.calibrate(texts, agreement=target)
    assert engine.calibration["metric"] == "agreement"
    assert engine.calibration["full_depth"] == 100.0
    ours = [p.label for p in engine.predict(texts)]
    measured = 100 * sum(a == b for a, b in zip(ours, full, strict=True)) / len(texts)
    assert measured == pytest.approx(point.metric) and measured >= 100 * target
    # the fastest such point: every faster swept point agrees less
    for points in engine.calibration["policies"].values():
        for other in points:
            if other["avg_exit_layer"] < point.avg_exit_layer - 1e-9:
                assert other["metric"] < 100 * target


def test_calibrate_without_labels_defaults_to_99_percent(tiny_ckpt, dev):
    engine = Engine(tiny_ckpt)
    point = engine.calibrate(dev.texts[:100])
    assert point.metric >= 99.0


@pytest.mark.parametrize(
    ("labels", "kwargs", "message"),
    [
        ([0] * 8, {"agreement": 0.9}, "agreement is the target of calibration without labels"),
        (None, {"agreement": 1.5}, r"agreement must be in \(0, 1\]"),
        (None, {"agreement": 0.9, "max_drop": 1.0}, "max_drop or agreement, not both"),
        (None, {"agreement": 0.9, "target_speedup": 2.0}, "exactly one"),
    ],
)
def test_label_free_argument_errors(tiny_ckpt, labels, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Engine(tiny_ckpt).calibrate(SENTENCES, labels, **kwargs)


def test_cli_calibrate_unlabeled_writes_the_point(ckpt_copy, dev, tmp_path, capsys):
    from tests.conftest import write_rows

    file = tmp_path / "traffic.csv"
    write_rows(file, ["id", "text"], [[str(i), t] for i, t in enumerate(dev.texts[:60])])
    args = ["calibrate", "--ckpt", str(ckpt_copy), "--unlabeled", str(file), "--agreement", "0.95"]
    assert main([*args, "--text-column", "text", "--write"]) == 0
    out = capsys.readouterr().out
    assert "unlabeled traffic.csv (60 examples, agreement)" in out
    calibration = json.loads((ckpt_copy / "calibration.json").read_text())
    assert calibration["metric"] == "agreement"
    assert main([*args]) == 2
    assert "--unlabeled needs --text-column" in capsys.readouterr().err
