"""Training on tiny random models: every recipe on every backbone and layout gives a checkpoint
the engine loads and predicts with; LTE end to end; resume after an interruption; best-of
evaluation; failures leave an existing checkpoint alone."""

import json
import math
import warnings

import pytest
import torch
from safetensors.torch import load_file

import eeengine.training.loop as loop_module
import eeengine.training.trainer as trainer_module
from eeengine import Engine
from eeengine._custom_ops import HAS_C
from eeengine.calibration import select_operating_point
from eeengine.cli import build_parser
from eeengine.data import calibration_size, file_dataset, holdout_split
from eeengine.evaluation import evaluate
from eeengine.modeling_multiexit import load_backbone_weights
from eeengine.training import TrainConfig, train
from eeengine.training.recipes import RECIPES
from eeengine.training.state import state_dir
from tests.conftest import BACKBONE_TYPES, SENTENCES, csv_config

LAYOUTS = ("per_layer", "shared_pooler", "shared")
MATRIX = [
    (recipe, backbone, layout)
    for recipe in RECIPES
    for backbone in BACKBONE_TYPES
    for layout in LAYOUTS
    if not (recipe == "two_stage" and layout == "shared")
]


@pytest.mark.parametrize(("recipe", "backbone", "layout"), MATRIX)
def test_recipe_trains_a_checkpoint_the_engine_serves(
    recipe, backbone, layout, tiny_backbone_dirs, tiny_csv_task, tmp_path
):
    config = csv_config(
        tiny_backbone_dirs[backbone], tiny_csv_task, recipe=recipe, layout=layout, pooling="cls"
    )
    path = train(config, tmp_path / "ckpt", progress=False)
    manifest = json.loads((path / "eeengine.json").read_text())
    assert manifest["backbone"] == backbone
    assert manifest["exit_heads"] == {"layout": layout, "pooling": "cls", "lte": recipe == "lte"}
    assert manifest["training"]["recipe"] == recipe
    assert manifest["task"]["label_names"] == ["bad", "good"]
    int8 = manifest["training"]["int8_calibration"]  # int8 layers run BERT backbones only
    assert (path / "calibration-int8.json").exists() == int8["written"]
    if backbone != "bert":
        assert not int8["written"] and "BERT layers" in int8["reason"]
    engine = Engine(path, policy="entropy", threshold=0.5)
    assert engine.model.layout == layout and engine.model.backbone_type == backbone
    prediction = engine.predict("a gorgeous, witty, seductive movie.")
    assert prediction.label in ("bad", "good") and 1 <= prediction.exit_layer <= 4


def test_recipe_settings_are_recorded(tiny_bert_dir, tiny_csv_task, tmp_path):
    path = train(csv_config(tiny_bert_dir, tiny_csv_task, recipe="elbert"), tmp_path / "e", False)
    training = json.loads((path / "eeengine.json").read_text())["training"]
    assert training["recipe_params"] == {"init": 4.0, "lr": 1e-2}
    native_bf16 = loop_module.cpu_has_amx_bf16()
    assert training["mixed_precision"] == ("bf16" if native_bf16 else None)
    weights = training["recipe_learned"]["loss_weights"]
    assert len(weights) == 4 and sum(weights) == pytest.approx(4.0, abs=1e-4)
    s = 1 / (1 + math.exp(-4))
    assert weights[:3] != pytest.approx([s] * 3, abs=1e-6), "the weights must have trained"


def test_two_stage_freezes_the_backbone_and_final_head_in_stage_2(
    tiny_bert_dir, tiny_csv_task, tmp_path, monkeypatch
):
    snapshots = {}
    real_step = loop_module.TrainLoop.train_step

    def spy(loop, batch, labels):
        snapshots[loop.step] = {k: v.clone() for k, v in loop.model.state_dict().items()}
        return real_step(loop, batch, labels)

    monkeypatch.setattr(loop_module.TrainLoop, "train_step", spy)
    config = csv_config(tiny_bert_dir, tiny_csv_task, recipe="two_stage", epochs=3.0)
    train(config, tmp_path / "two", progress=False)
    before_stage2, last = snapshots[3], snapshots[5]  # 6 steps: stage 2 is steps 3-5
    for key, value in last.items():
        changed = not torch.equal(value, before_stage2[key])
        early_exit = key.startswith(("exit_heads.0.", "exit_heads.1.", "exit_heads.2."))
        assert changed == early_exit, key


@pytest.mark.parametrize("backbone", BACKBONE_TYPES)
def test_freeze_word_embeddings_keeps_the_table_and_trains_the_rest(
    backbone, tiny_backbone_dirs, tiny_csv_task, tmp_path
):
    config = csv_config(tiny_backbone_dirs[backbone], tiny_csv_task, freeze_word_embeddings=True)
    path = train(config, tmp_path / "frozen", progress=False)
    _, before = load_backbone_weights(tiny_backbone_dirs[backbone])
    after = load_file(path / "model.safetensors")
    table = "embeddings.word_embeddings.weight"
    assert torch.equal(after[f"{backbone}.{table}"], before[table])
    trained = [key for key in before if key != table and "embeddings" not in key]
    changed = [key for key in trained if not torch.equal(after[f"{backbone}.{key}"], before[key])]
    assert changed, "the encoder must have trained"


def test_ema_saves_the_moving_average_of_the_trained_weights(
    tiny_bert_dir, tiny_csv_task, tmp_path, monkeypatch
):
    """With ema_decay d the saved weights are a_t = d·a_(t−1) + (1 − d)·w_t over the raw
    weights w_t after each step (a_1 = w_1), computed here from snapshots of the raw model."""
    raw = []
    real_step = loop_module.TrainLoop.train_step

    def spy(loop, batch, labels):
        loss = real_step(loop, batch, labels)
        raw.append({k: v.detach().clone() for k, v in loop.model.named_parameters()})
        return loss

    monkeypatch.setattr(loop_module.TrainLoop, "train_step", spy)
    config = csv_config(tiny_bert_dir, tiny_csv_task, batch_size=4, ema_decay=0.6)  # one eval
    path = train(config, tmp_path / "ema", progress=False)
    assert len(raw) >= 3
    average = raw[0]
    for weights in raw[1:]:
        average = {k: 0.6 * average[k] + 0.4 * weights[k] for k in average}
    saved = load_file(path / "model.safetensors")
    for key, value in average.items():
        torch.testing.assert_close(saved[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert any(not torch.equal(saved[k], raw[-1][k]) for k in average), "not the raw weights"
    with pytest.raises(ValueError, match=r"ema_decay must be in \(0, 1\), got 1.0"):
        train(csv_config(tiny_bert_dir, tiny_csv_task, ema_decay=1.0), tmp_path / "bad", False)
    assert not (tmp_path / "bad").exists()


def test_default_policy_at_a_confidence_is_the_certified_point(
    tiny_bert_dir, tiny_csv_task, tmp_path
):
    """max_drop_confidence: the default policy is the point select_operating_point certifies on
    the saved sweep, or every layer when none is certified; a bad value fails before training."""
    config = csv_config(tiny_bert_dir, tiny_csv_task, max_drop=5.0, max_drop_confidence=0.9)
    path = train(config, tmp_path / "conf", progress=False)
    manifest = json.loads((path / "eeengine.json").read_text())
    sweep = json.loads((path / "calibration.json").read_text())
    try:
        expected = select_operating_point(sweep, max_drop=5.0, confidence=0.9).to_json()
    except ValueError:
        expected = {"name": "none"}
    assert manifest["policy"] == expected
    # On the tiny slice the confidence changes the choice, so ignoring it would fail here.
    assert expected != select_operating_point(sweep, max_drop=5.0).to_json()
    with pytest.raises(ValueError, match="confidence"):
        train(csv_config(tiny_bert_dir, tiny_csv_task, max_drop_confidence=1.5), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_default_policy_needs_a_certified_point(tiny_bert_dir, tiny_csv_task, tmp_path, capsys):
    """By default the policy must keep max_drop at 90 % confidence: 10 calibration rows certify
    no point (the margin alone is over 30 points), so the checkpoint runs every layer, and the
    run says why and what to do; ``max_drop_confidence=None`` picks as measured."""
    path = train(csv_config(tiny_bert_dir, tiny_csv_task), tmp_path / "c", progress=True)
    manifest = json.loads((path / "eeengine.json").read_text())
    assert manifest["training"]["config"]["max_drop_confidence"] == 0.9
    assert manifest["policy"] == {"name": "none"}
    err = capsys.readouterr().err
    assert "the default policy runs every layer: no" in err and "--unlabeled" in err
    measured = csv_config(tiny_bert_dir, tiny_csv_task, max_drop_confidence=None)
    path = train(measured, tmp_path / "m", progress=False)
    sweep = json.loads((path / "calibration.json").read_text())
    expected = select_operating_point(sweep, max_drop=0.5)
    assert json.loads((path / "eeengine.json").read_text())["policy"] == expected.to_json()


def test_optimizer_is_fused_where_supported():
    params = [torch.nn.Parameter(torch.randn(3))]
    assert loop_module.adamw([{"params": params}]).defaults["fused"]


def test_lte_checkpoint_serves_the_lte_policy(tiny_bert_dir, tiny_csv_task, tmp_path):
    config = csv_config(tiny_bert_dir, tiny_csv_task, recipe="lte", lte_base="joint")
    path = train(config, tmp_path / "lte", progress=False)
    assert any(k.startswith("lte.") for k in load_file(path / "model.safetensors"))
    calibration = json.loads((path / "calibration.json").read_text())
    assert "lte" in calibration["policies"]
    for threshold, layer in ((1.0, 1), (0.0, 4)):  # s < 1 always; s < 0 never
        engine = Engine(path, policy="lte", threshold=threshold)
        assert engine.backend == ("cpp" if HAS_C else "reference")
        assert engine.predict(["great fun", "a dull mess"])[1].exit_layer == layer


def test_lte_policy_refused_without_the_module(tiny_ckpt):
    with pytest.raises(ValueError, match="LTE module"):
        Engine(tiny_ckpt, policy="lte", threshold=0.5)


def test_regression_on_a_user_file(tiny_bert_dir, tmp_path):
    from tests.conftest import SENTENCES, write_rows

    rows = [[text, str(i % 5 + 0.5)] for i, text in enumerate(SENTENCES * 3)]
    write_rows(tmp_path / "train.tsv", ["s", "score"], rows)
    write_rows(tmp_path / "dev.tsv", ["s", "score"], rows[:8])
    config = TrainConfig(
        base_model=str(tiny_bert_dir),
        train_file=str(tmp_path / "train.tsv"),
        dev_file=str(tmp_path / "dev.tsv"),
        text_column="s",
        label_column="score",
        regression=True,
        recipe="lte",
        epochs=1.0,
        save_every=0,
    )
    path = train(config, tmp_path / "reg", progress=False)
    manifest = json.loads((path / "eeengine.json").read_text())
    assert manifest["training"]["contrastive"] is None  # no classes to pair
    task = manifest["task"]
    assert task == {
        "name": "train",
        "type": "regression",
        "label_names": None,
        "metric": "pearson",
        "metrics": ["pearson"],
    }
    prediction = Engine(path, policy="lte", threshold=0.5).predict("ok")
    assert prediction.label is None and isinstance(prediction.value, float)
    for engine in (Engine(path), Engine(path, policy="patience", threshold=0.5, patience=1)):
        assert engine.backend == ("cpp" if HAS_C else "reference")  # the fused op, C = 1
        reference = Engine(
            path,
            policy=engine.policy.name,
            backend="reference",
            **{k: v for k, v in engine.policy.params().items() if v is not None},
        )
        got, expected = engine.predict(SENTENCES), reference.predict(SENTENCES)
        assert [p.exit_layer for p in got] == [p.exit_layer for p in expected]


def test_contrastive_stage_runs_on_small_classification_data_unless_turned_off(
    tiny_bert_dir, tiny_csv_task, tmp_path
):
    """30 training rows: the stage runs by default (5 rounds of 2 pairs a row, 16 a step) and
    the backbone then fine-tunes at 2e-5; ``contrastive=False`` trains without it, at 1e-4,
    from other encoder weights."""
    paths = {
        flag: train(
            csv_config(tiny_bert_dir, tiny_csv_task, contrastive=flag), tmp_path / str(flag), False
        )
        for flag in (None, False)
    }
    training = {
        flag: json.loads((path / "eeengine.json").read_text())["training"]
        for flag, path in paths.items()
    }
    records = {flag: record["contrastive"] for flag, record in training.items()}
    assert training[None]["schedule"]["lr"] == 2e-5 and training[False]["schedule"]["lr"] == 1e-4
    assert records[False] is None
    assert records[None]["pairs"] == 300 and records[None]["steps"] == 19
    weights = {flag: load_file(path / "model.safetensors") for flag, path in paths.items()}
    key = "bert.embeddings.word_embeddings.weight"
    assert not torch.equal(weights[None][key], weights[False][key])


@pytest.mark.parametrize(("overrides", "smoothing"), [({}, 0.1), ({"label_smoothing": 0.0}, 0.0)])
def test_small_classification_data_trains_with_label_smoothing_unless_set(
    overrides, smoothing, tiny_bert_dir, tiny_csv_task, tmp_path, monkeypatch
):
    """30 training rows are small data: every exit's loss gets ε = 0.1 unless it is set."""
    real_make_recipe = trainer_module.make_recipe
    seen = []

    def spy(*args):
        recipe = real_make_recipe(*args)
        seen.append(recipe.label_smoothing)
        return recipe

    monkeypatch.setattr(trainer_module, "make_recipe", spy)
    config = csv_config(tiny_bert_dir, tiny_csv_task, contrastive=False, epochs=1.0, **overrides)
    path = train(config, tmp_path / "ckpt", False)
    schedule = json.loads((path / "eeengine.json").read_text())["training"]["schedule"]
    assert seen == [smoothing] and schedule["label_smoothing"] == smoothing


def test_contrastive_refused_for_regression(tiny_bert_dir, tmp_path):
    config = TrainConfig(base_model=str(tiny_bert_dir), task="stsb", contrastive=True)
    with pytest.raises(ValueError, match="--contrastive needs class labels"):
        train(config, tmp_path / "reg", progress=False)


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("ema_decay", [None, 0.9])
def test_resume_after_an_interruption_equals_an_uninterrupted_run(
    ema_decay, tiny_bert_dir, tiny_csv_task, tmp_path, monkeypatch
):
    config = csv_config(
        tiny_bert_dir,
        tiny_csv_task,
        recipe="elbert",
        epochs=3.0,
        save_every=2,
        eval_every=2,
        early_stopping=0,
        ema_decay=ema_decay,
    )
    reference = train(config, tmp_path / "reference", progress=False)

    out = tmp_path / "resumed"
    real_step = loop_module.TrainLoop.train_step

    def crash_at_step_5(loop, *args):
        if loop.step == 4:  # after the contrastive stage, which this small task runs
            raise Interrupted
        return real_step(loop, *args)

    monkeypatch.setattr(loop_module.TrainLoop, "train_step", crash_at_step_5)
    with pytest.raises(Interrupted):
        train(config, out, progress=False)
    assert not out.exists() and (state_dir(out) / "state.pt").is_file()
    monkeypatch.setattr(loop_module.TrainLoop, "train_step", real_step)
    ran = []
    monkeypatch.setattr(trainer_module, "contrastive_tune", lambda *a, **k: ran.append(1))

    resumed = train(config, out, progress=False)
    assert not ran  # the resumed run starts from the saved weights, after the stage
    assert not state_dir(out).exists()
    expected, actual = (
        load_file(reference / "model.safetensors"),
        load_file(resumed / "model.safetensors"),
    )
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)
    training = [
        json.loads((p / "eeengine.json").read_text())["training"] for p in (reference, resumed)
    ]
    assert training[0]["contrastive"]["steps"] > 0
    for field in ("dev_exit_metrics", "best_step", "recipe_learned", "contrastive"):
        assert training[0][field] == training[1][field]


def test_resume_refuses_a_state_of_another_config(
    tiny_bert_dir, tiny_csv_task, tmp_path, monkeypatch
):
    config = csv_config(tiny_bert_dir, tiny_csv_task, save_every=1)
    monkeypatch.setattr(trainer_module, "remove_state", lambda out: None)  # keep the state
    train(config, tmp_path / "ckpt", progress=False)
    with pytest.raises(ValueError, match="another config.*differs in lr"):
        train(
            csv_config(tiny_bert_dir, tiny_csv_task, save_every=1, lr=5e-5),
            tmp_path / "ckpt",
            False,
        )


@pytest.mark.parametrize(
    ("overrides", "steps"),
    [
        ({"early_stopping": 2}, 3),  # patience set
        ({"small_data": 1}, 3),  # early_stopping=None from small_data rows up: patience 2
        ({}, 6),  # early_stopping=None below small_data rows: no early stopping
    ],
)
def test_best_evaluation_is_kept_and_early_stopping_follows_the_plan(
    tiny_bert_dir, tiny_csv_task, tmp_path, monkeypatch, overrides, steps
):
    """Evaluations on the calibration slice at steps 1, 2, 3, ... score 90, 10, 20, 10, 20
    and 30 at the end: with patience 2 two evaluations without a gain stop the run at step 3
    of 6; without early stopping it takes all 6. Either way the weights of step 1 are saved,
    and dev (scored 55 afterwards) is only reported."""
    slice_scores = [90.0, 10.0, 20.0, 10.0, 20.0, 30.0][:steps]
    scores = iter([[score] * 4 for score in slice_scores] + [[55.0] * 4])

    def fake_metrics(logits, labels, metric):
        return next(scores)

    monkeypatch.setattr(loop_module, "exit_metrics", fake_metrics)
    weights = {}
    real_offer = loop_module.TrainLoop.offer

    def spy(loop, evaluation):
        weights[evaluation.step] = {k: v.clone() for k, v in loop.model.state_dict().items()}
        return real_offer(loop, evaluation)

    monkeypatch.setattr(loop_module.TrainLoop, "offer", spy)
    config = csv_config(tiny_bert_dir, tiny_csv_task, epochs=3.0, eval_every=1, **overrides)
    path = train(config, tmp_path / "best", progress=False)
    training = json.loads((path / "eeengine.json").read_text())["training"]
    assert training["best_step"] == 1 and training["calibration_exit_metrics"] == [90.0] * 4
    assert training["steps"] == steps and training["schedule"]["stopped_early"] == (steps < 6)
    assert training["schedule"]["total_steps"] == 6
    assert training["dev_exit_metrics"] == [55.0] * 4
    saved = load_file(path / "model.safetensors")
    for key, value in saved.items():
        torch.testing.assert_close(value, weights[1][key], rtol=0, atol=0)


def test_failed_training_leaves_existing_checkpoint(tiny_ckpt, tiny_bert_dir, tmp_path):
    import shutil

    target = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, target)
    before = (target / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="unknown task"):
        train(TrainConfig(base_model=str(tiny_bert_dir), task="imdb"), target, progress=False)
    assert (target / "model.safetensors").read_bytes() == before


def test_glue_task_by_name(tiny_bert_dir, tmp_path):
    config = TrainConfig(
        base_model=str(tiny_bert_dir),
        max_train_examples=32,
        batch_size=16,
        epochs=1.0,
        save_every=0,
    )
    path = train(config, tmp_path / "sst2", progress=False)
    manifest = json.loads((path / "eeengine.json").read_text())
    assert manifest["task"]["name"] == "sst2" and manifest["training"]["steps"] == 2
    assert len(manifest["training"]["dev_exit_metrics"]) == 4
    calibration = json.loads((path / "calibration.json").read_text())
    assert set(calibration["policies"]) >= {"entropy", "normalized_entropy", "pcee"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_autocast_on_cuda(tiny_bert_dir, tiny_csv_task, tmp_path):
    config = csv_config(tiny_bert_dir, tiny_csv_task, recipe="lte", device="cuda")
    path = train(config, tmp_path / "cuda", progress=False)
    training = json.loads((path / "eeengine.json").read_text())["training"]
    assert training["mixed_precision"] == ("bf16" if torch.cuda.is_bf16_supported() else None)
    assert Engine(path, device="cuda", policy="lte", threshold=0.5).predict("ok").exit_layer >= 1


@pytest.mark.parametrize("recipe", ["weighted", "mpee"])
def test_train_with_token_pruning(recipe, tiny_bert_dir, tiny_csv_task, tmp_path):
    """The schedule is trained with, evaluated with (per-exit dev metrics and calibration), and
    saved; the engine serves the checkpoint with it."""
    schedule = {"layers": [1, 3], "keep_ratio": 0.6, "beta": [1.0, 0.5]}
    config = csv_config(tiny_bert_dir, tiny_csv_task, recipe=recipe, token_pruning=schedule)
    path = train(config, tmp_path / "pruned", progress=False)
    manifest = json.loads((path / "eeengine.json").read_text())
    assert manifest["token_pruning"] == schedule
    assert manifest["training"]["config"]["token_pruning"] == schedule
    engine = Engine(path, policy="none")
    prediction = engine.predict(SENTENCES[5])
    assert prediction.tokens_kept is not None and prediction.tokens_kept[-1] < 20
    # The calibration's FLOPs ratio of a fixed exit is the engine's on the held-out rows.
    point = engine.calibration["policies"]["budget"][1]
    train_rows = file_dataset(
        tiny_csv_task / "train.csv", tiny_csv_task / "dev.csv", "review", "verdict"
    ).train
    size = calibration_size(len(train_rows.texts))
    _, calib = holdout_split(train_rows, size, config.seed, stratify=True)
    measured = evaluate(Engine(path, policy="budget", layer=point["layer"]), calib, "accuracy")
    assert point["flops_ratio"] == pytest.approx(measured["flops_ratio"])


def test_train_with_token_pruning_writes_int8_static(tiny_bert_dir, tiny_csv_task, tmp_path):
    """A checkpoint trained with a schedule gets int8_static statistics and its sweep, measured
    with the pruning layers at int8_static; its engine prunes as the fp32 one does."""
    pytest.importorskip("onnxruntime")
    schedule = {"layers": [1, 3], "keep_ratio": 0.6, "beta": [1.0, 0.5]}
    config = csv_config(tiny_bert_dir, tiny_csv_task, token_pruning=schedule)
    path = train(config, tmp_path / "pruned", progress=False)
    record = json.loads((path / "eeengine.json").read_text())["training"]["int8_static_calibration"]
    sweep = json.loads((path / "calibration-int8_static.json").read_text())
    assert record == {"written": True, "file": "calibration-int8_static.json",
                      "full_depth": sweep["full_depth"]}  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # its own calibration: no warning
        static = Engine(path, policy="none", precision="int8_static")
    expected = Engine(path, policy="none", precision="fp32").predict(SENTENCES)
    got = static.predict(SENTENCES)
    assert [p.tokens_kept for p in got] == [p.tokens_kept for p in expected]


def test_cli_reads_the_schedule_as_json():
    args = build_parser().parse_args(
        ["train", "--out", "x", "--token-pruning", '{"layers": [2, 4], "keep_ratio": 0.7, '
         '"beta": [1.0, 0.5]}']
    )  # fmt: skip
    assert args.token_pruning == {"layers": [2, 4], "keep_ratio": 0.7, "beta": [1.0, 0.5]}


def test_cli_contrastive_is_automatic_unless_given():
    parse = build_parser().parse_args
    assert parse(["train", "--out", "x"]).contrastive is None
    assert parse(["train", "--out", "x", "--contrastive"]).contrastive is True
    assert parse(["train", "--out", "x", "--no-contrastive"]).contrastive is False
    args = parse(["train", "--out", "x", "--contrastive-exits", "all"])
    assert args.contrastive_exits == "all"
