"""Precision of the encoder layers (fp32, bf16, int8) against the fp32 reference, one
calibration per precision, and the ONNX Runtime executor's single copy of the weights.

Tolerances, on the tiny random fixtures (hidden 32, activations up to ~4 after LayerNorm):
- int8 (per-channel int8 weights, per-call uint8 activations): each layer's output within
  5e-3 of fp32 on the same input (measured: <= 6e-4), the logits of the whole loop within
  5e-3 (measured: <= 5e-4).
- bf16 (8-bit mantissa: relative rounding 2^-9 per op, on activations up to ~4): each layer
  within 5e-2 (measured: <= 2.5e-2), logits within 2e-2 (measured: <= 5.3e-3).
- at both, the argmax equal to fp32's on at least 80 % of rows (measured: all).
And neither may equal fp32 to fp32's own tolerance (1e-5): the precision must really change.
"""

import json

import pytest
import torch

from eeengine import Engine
from eeengine.batching import collate, encode
from eeengine.cli import main
from eeengine.data import Split
from eeengine.evaluation import evaluate, policy_params
from eeengine.executors import make_executor
from eeengine.modeling_bert import attention_bias
from eeengine.policies import make_policy
from eeengine.precision import calibration_file, read_calibration, write_calibration
from eeengine.selection import choose_operating_point, iter_points
from eeengine.token_pruning import TokenPruning
from eeengine.training.calibration_slice import calibration_slice
from tests.conftest import SENTENCES, make_tiny_model

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

LAYER_ATOL = {"int8": 5e-3, "bf16": 5e-2}
LOGITS_ATOL = {"int8": 5e-3, "bf16": 2e-2}
PRUNE_LAYER_2 = TokenPruning(layers=(2,), keep_ratio=0.7, beta=(1.0,))
FP32_ATOL = 1e-5


@pytest.fixture(scope="module")
def batch(tokenizer):
    return collate(encode(tokenizer, SENTENCES, None, 64), range(len(SENTENCES)), 0)


@pytest.mark.parametrize(("precision", "executor"), [("int8", "onnxruntime"), ("bf16", "torch")])
def test_every_layer_close_to_fp32(tiny_bert_dir, batch, precision, executor):
    input_ids, attention_mask, token_type_ids = batch
    reference = make_tiny_model(tiny_bert_dir)
    built = make_executor(None, make_tiny_model(tiny_bert_dir), precision)
    assert built.name == executor
    real = attention_mask.bool()
    with torch.inference_mode():
        hidden = reference.backbone.embed(input_ids, token_type_ids)
        mask = built.mask(attention_mask)
        for index, layer in enumerate(reference.backbone.layers):
            expected = layer(hidden, attention_bias(attention_mask))
            actual = built.layer(index, hidden, mask)  # same input per layer
            assert actual.dtype == torch.float32
            error = (actual - expected)[real].abs().max().item()
            assert FP32_ATOL < error <= LAYER_ATOL[precision], f"layer {index}: {error}"
            hidden = expected


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_engine_logits_close_to_fp32(tiny_ckpt, precision):
    fp32 = Engine(tiny_ckpt, policy="none").predict(SENTENCES, batch_size=4)
    with pytest.warns(UserWarning, match=f"calibrate --precision {precision}"):
        engine = Engine(tiny_ckpt, policy="none", precision=precision)
    assert engine.precision == precision
    actual = engine.predict(SENTENCES, batch_size=4)
    expected = torch.tensor([p.logits for p in fp32])
    logits = torch.tensor([p.logits for p in actual])
    torch.testing.assert_close(logits, expected, atol=LOGITS_ATOL[precision], rtol=0)
    same = sum(a.label == e.label for a, e in zip(actual, fp32, strict=True))
    assert same >= 0.8 * len(SENTENCES)


def test_onnxruntime_engine_keeps_one_copy_of_the_layers(tiny_ckpt):
    engine = Engine(tiny_ckpt, executor="onnxruntime")
    layers = engine.model.backbone.layers
    assert all(p.device.type == "meta" for p in layers.parameters())  # ORT holds them
    assert engine.model.backbone.embeddings.word_embeddings.weight.device.type == "cpu"
    # Full-depth evaluation runs through the executor, not the dropped torch layers.
    point = engine.calibrate(SENTENCES, [i % 2 for i in range(len(SENTENCES))], max_drop=100.0)
    assert point.metric >= 0.0


@pytest.mark.parametrize(("release", "device"), [(True, "meta"), (False, "cpu")])
def test_onnxruntime_releases_the_torch_layers_when_told(tiny_bert_dir, release, device):
    model = make_tiny_model(tiny_bert_dir)
    make_executor("onnxruntime", model, "fp32", PRUNE_LAYER_2, release_weights=release)
    devices = [next(layer.parameters()).device.type for layer in model.backbone.layers]
    assert devices == [device] * 4


def test_bf16_keeps_the_pruning_layers_in_float32(tiny_bert_dir):
    model = make_tiny_model(tiny_bert_dir)
    make_executor(None, model, "bf16", PRUNE_LAYER_2)
    dtypes = [next(layer.parameters()).dtype for layer in model.backbone.layers]
    assert dtypes == [torch.bfloat16, torch.float32, torch.bfloat16, torch.bfloat16]


def test_one_calibration_per_precision(tiny_ckpt, tmp_path):
    import shutil

    ckpt = shutil.copytree(tiny_ckpt, tmp_path / "ckpt")
    fp32_file = ckpt / calibration_file("fp32")
    before = fp32_file.read_bytes() if fp32_file.exists() else None
    with pytest.warns(UserWarning):
        engine = Engine(ckpt, precision="int8")
    assert engine.calibration == {}
    labels = [i % 2 for i in range(len(SENTENCES))]
    engine.calibrate(SENTENCES, labels, max_drop=100.0, policy="entropy")
    written = write_calibration(ckpt, "int8", engine.calibration)
    assert written.name == "calibration-int8.json"
    assert read_calibration(ckpt, "int8") == engine.calibration
    assert (fp32_file.read_bytes() if fp32_file.exists() else None) == before
    # The default policy's parameters at int8 come from the int8 sweep.
    reloaded = Engine(ckpt, precision="int8")
    assert reloaded.calibration == engine.calibration
    assert reloaded.policy.name == "entropy"  # the checkpoint's default policy


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_calibration_at_a_reduced_precision_measures_the_drop_from_fp32(tiny_ckpt, precision):
    """With labels, an int8 / bf16 calibration records the fp32 full depth on the same texts
    (measured here by an fp32 engine at full depth, independently) and picks the fastest
    point within max_drop of it, not of its own full depth."""
    labels = [i % 2 for i in range(len(SENTENCES))]
    executor = "onnxruntime" if precision == "int8" else "torch"
    fp32 = Engine(tiny_ckpt, policy="none", executor=executor)
    expected = evaluate(fp32, Split(SENTENCES, None, labels), "accuracy")["value"]
    with pytest.warns(UserWarning):  # no calibration of that precision in the checkpoint
        engine = Engine(tiny_ckpt, precision=precision)
    point = engine.calibrate(SENTENCES, labels, max_drop=10.0)
    sweep = engine.calibration
    assert sweep["reference_full_depth"] == pytest.approx(expected)
    floor = expected - 10.0
    within = [p for _, p in iter_points(sweep, None) if p["metric"] >= floor - 1e-9]
    assert point.metric >= floor - 1e-9
    assert point.avg_exit_layer == min(p["avg_exit_layer"] for p in within)
    # Without labels (agreement with the engine's own full depth) there is no fp32 reference.
    engine.calibrate(SENTENCES)
    assert "reference_full_depth" not in engine.calibration


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"precision": "fp16"}, "unknown precision 'fp16'"),
        ({"precision": "int8", "executor": "torch"}, "runs on the onnxruntime executor"),
        ({"precision": "bf16", "executor": "onnxruntime"}, "runs on the torch executor"),
    ],
)
def test_bad_precision(tiny_ckpt, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Engine(tiny_ckpt, **kwargs)


def test_cli_precision(tiny_ckpt, capsys):
    args = ["--ckpt", str(tiny_ckpt), "--precision", "int8"]
    with pytest.warns(UserWarning, match="calibration-int8.json"):
        assert main(["predict", *args, "great fun"]) == 0
        assert main(["info", str(tiny_ckpt), "--precision", "int8"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith("great fun")
    assert "executor    onnxruntime, precision int8" in out


def test_trainer_writes_the_int8_calibration(trained_csv_ckpt, recwarn):
    """Training measures the int8 sweep on the calibration slice too: its full depth is what an
    int8 engine measures there, and an int8 engine takes its policy parameters from it."""
    sweep = json.loads((trained_csv_ckpt / "calibration-int8.json").read_text())
    training = json.loads((trained_csv_ckpt / "eeengine.json").read_text())["training"]
    assert training["int8_calibration"] == {
        "written": True,
        "file": "calibration-int8.json",
        "full_depth": sweep["full_depth"],
    }
    fp32_sweep = json.loads((trained_csv_ckpt / "calibration.json").read_text())
    assert sweep["reference_full_depth"] == fp32_sweep["full_depth"]  # the same slice at fp32
    manifest = json.loads((trained_csv_ckpt / "eeengine.json").read_text())
    calib, _ = calibration_slice(manifest, trained_csv_ckpt)
    full_depth = Engine(trained_csv_ckpt, policy="none", precision="int8")
    assert evaluate(full_depth, calib, "accuracy")["value"] == pytest.approx(sweep["full_depth"])
    engine = Engine(trained_csv_ckpt, precision="int8")
    assert not [w for w in recwarn if "calibration-int8.json" in str(w.message)]
    assert engine.calibration == sweep
    name = manifest["policy"]["name"]
    chosen = choose_operating_point(sweep, policy=name)
    expected = make_policy(name, **(policy_params(chosen[1]) if chosen else {}))
    assert engine.policy.params() == expected.params()
    # the atomic write left no temporary directory beside the checkpoint
    assert [p.name for p in trained_csv_ckpt.parent.iterdir()] == [trained_csv_ckpt.name]


def test_int8_default_policy_is_chosen_as_the_trainer_chose(trained_csv_ckpt, tmp_path):
    """At int8 the default policy's parameters are picked in the int8 sweep by the max_drop and
    max_drop_confidence the training run recorded, not by 0.5 points as measured."""
    import shutil

    ckpt = shutil.copytree(trained_csv_ckpt, tmp_path / "ckpt")
    manifest = json.loads((ckpt / "eeengine.json").read_text())
    manifest["training"]["config"].update(max_drop=20.0, max_drop_confidence=0.6)
    (ckpt / "eeengine.json").write_text(json.dumps(manifest))
    sweep = json.loads((ckpt / "calibration-int8.json").read_text())
    name = manifest["policy"]["name"]

    def params(chosen):
        return make_policy(name, **(policy_params(chosen[1]) if chosen else {})).params()

    expected = params(choose_operating_point(sweep, 20.0, policy=name, confidence=0.6))
    assert expected != params(choose_operating_point(sweep, 0.5, policy=name))  # can fail
    assert Engine(ckpt, precision="int8").policy.params() == expected
