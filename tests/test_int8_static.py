"""Precision "int8_static" (eeengine.executors.int8_static): fixed, calibrated activation
scales make every row's answer the same alone and batched, unlike "int8" (ONNX Runtime's
per-call scales), and the smoothed int8 layer stays close to the torch layer it quantizes.
The statistics live in the checkpoint; without them the engine refuses to build and says
which command measures them."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
import onnxruntime  # noqa: E402
from onnx import TensorProto, numpy_helper  # noqa: E402

import eeengine.executors.int8_static as int8_static_module  # noqa: E402
from eeengine import Engine  # noqa: E402
from eeengine.checkpoint import CheckpointError  # noqa: E402
from eeengine.cli import main  # noqa: E402
from eeengine.executors.int8_static import (  # noqa: E402
    ACTIVATIONS_FILE,
    POINTS,
    activation_absmax,
    int8_static_attention_graph,
    int8_static_feed_forward_graph,
    int8_static_layer_graph,
    read_activations,
    write_activations,
)
from eeengine.executors.ort_environment import neighbour_session_options  # noqa: E402
from eeengine.precision import calibration_file  # noqa: E402
from tests.conftest import SENTENCES, write_rows  # noqa: E402


@pytest.fixture(scope="module")
def fp32(tiny_ckpt):
    return Engine(tiny_ckpt, policy="none", executor="torch")


@pytest.fixture(scope="module")
def stats(fp32):
    return activation_absmax(fp32.model, fp32.tokenizer, SENTENCES, batch_size=3)


@pytest.fixture
def static_ckpt(tiny_ckpt, tmp_path, stats):
    ckpt = shutil.copytree(tiny_ckpt, tmp_path / "ckpt")
    write_activations(ckpt, stats)
    return ckpt


def test_statistics_cover_every_point_of_every_layer(fp32, stats, tmp_path):
    config = fp32.model.config
    widths = {"qkv": config.hidden_size, "attn_out": config.hidden_size,
              "ffn_in": config.hidden_size, "ffn_out": config.intermediate_size}  # fmt: skip
    assert set(stats) == {f"layer{i}.{p}" for i in range(fp32.num_layers) for p in POINTS}
    for key, value in stats.items():
        assert value.shape == (widths[key.split(".")[1]],) and bool((value > 0).all())
    # One batch or one text at a time: the same maxima.
    one_by_one = activation_absmax(fp32.model, fp32.tokenizer, SENTENCES, batch_size=1)
    for key, value in stats.items():
        torch.testing.assert_close(one_by_one[key], value, rtol=1e-5, atol=1e-6)
    write_activations(tmp_path, stats)
    assert read_activations(tmp_path, fp32.model).keys() == stats.keys()


@pytest.mark.parametrize(("vnni", "levels"), [(True, 127), (False, 63)])
def test_weights_use_7_bits_without_vnni(fp32, stats, monkeypatch, vnni, levels):
    """Without VNNI, u8·s8 products are summed in pairs in int16 and saturate: weights then
    span ±63, as ``reduce_range`` makes them for "int8"; with it, ±127."""
    monkeypatch.setattr(int8_static_module, "cpu_has_vnni", lambda: vnni)
    config = fp32.model.config
    graph = int8_static_layer_graph(
        fp32.model.backbone.layers[0], config.num_attention_heads, config.layer_norm_eps, stats, 0
    )
    weights = [
        numpy_helper.to_array(t) for t in graph.graph.initializer if t.data_type == TensorProto.INT8
    ]
    assert weights and max(int(np.abs(w.astype(np.int32)).max()) for w in weights) == levels


def test_layer_rows_alone_equal_rows_batched_and_close_to_torch(fp32, stats):
    layer = fp32.model.backbone.layers[0]
    config = fp32.model.config
    graph = int8_static_layer_graph(
        layer, config.num_attention_heads, config.layer_norm_eps, stats, 0
    )
    session = onnxruntime.InferenceSession(  # beside the executors' global pool, if made
        graph.SerializeToString(), neighbour_session_options(1), providers=["CPUExecutionProvider"]
    )
    enc = fp32.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = fp32.model.backbone.embeddings(enc["input_ids"], enc["token_type_ids"])
    mask = enc["attention_mask"]

    def run(h: torch.Tensor, m: torch.Tensor) -> np.ndarray:
        feed = {"hidden_states": h.numpy(), "attention_mask": m.numpy().astype(np.int32)}
        return session.run(None, feed)[0]

    batched = run(hidden, mask)
    for row, length in enumerate(mask.sum(1).tolist()):
        alone = run(hidden[row : row + 1, :length], mask[row : row + 1, :length])
        np.testing.assert_allclose(alone[0], batched[row, :length], rtol=0, atol=1e-5)
    with torch.inference_mode():
        bias = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        expected = layer(hidden, bias).numpy()
    # Measured 1e-4 here; weights left unsmoothed (the smoothing not folded in) give 7e-3.
    error = np.abs(batched - expected)[mask.bool().numpy()].mean()
    assert error < 2e-3, f"mean error {error:.5f} against the torch layer"


def test_engine_answers_do_not_depend_on_the_batch(static_ckpt, fp32):
    with pytest.warns(UserWarning, match="calibration-int8_static.json"):
        engine = Engine(static_ckpt, policy="entropy", threshold=0.4, precision="int8_static")
    assert engine.executor == "onnxruntime"
    alone = [engine.predict(text) for text in SENTENCES]
    batched = engine.predict(SENTENCES, batch_size=len(SENTENCES))
    for a, b in zip(alone, batched, strict=True):
        assert (a.label, a.exit_layer) == (b.label, b.exit_layer)
        np.testing.assert_allclose(a.logits, b.logits, rtol=0, atol=1e-5)
    full = Engine(static_ckpt, policy="none", precision="fp32").predict(SENTENCES)
    with pytest.warns(UserWarning, match="calibration-int8_static.json"):
        quantized = Engine(static_ckpt, policy="none", precision="int8_static")
    quantized = quantized.predict(SENTENCES)
    for f, q in zip(full, quantized, strict=True):
        np.testing.assert_allclose(q.logits, f.logits, rtol=0, atol=0.05)


def test_missing_statistics_name_the_command(tiny_ckpt):
    with pytest.raises(FileNotFoundError, match="--precision int8_static --write"):
        with pytest.warns(UserWarning, match="calibration-int8_static.json"):
            Engine(tiny_ckpt, precision="int8_static")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            lambda s: {k: v for k, v in s.items() if not k.startswith("layer3.")},
            "no statistics for layer3.qkv",
        ),
        (
            lambda s: {**s, "layer1.ffn_out": s["layer1.ffn_out"][:5]},
            r"layer1.ffn_out must be 64 finite, non-negative maxima, got shape \(5,\)",
        ),
        (lambda s: {**s, "layer0.qkv": s["layer0.qkv"] * float("nan")}, "layer0.qkv must be"),
    ],
    ids=["missing layer", "wrong width", "nan"],
)
def test_bad_statistics_are_named(fp32, tmp_path, stats, damage, message):
    write_activations(tmp_path, damage(stats))
    with pytest.raises(CheckpointError, match=message):
        read_activations(tmp_path, fp32.model)


def test_corrupt_statistics_file_is_named(fp32, tmp_path):
    (tmp_path / ACTIVATIONS_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt or unreadable safetensors"):
        read_activations(tmp_path, fp32.model)


def test_sublayer_graphs_compose_to_the_layer(fp32, stats):
    """A pruning layer's two int8_static sessions, run back to back, are the whole layer's
    session; the [CLS] query and the keys they return are the torch layer's (the keys through
    the quantized projection, so to quantization error)."""
    layer = fp32.model.backbone.layers[1]
    config = fp32.model.config
    heads, eps = config.num_attention_heads, config.layer_norm_eps
    sessions = [
        onnxruntime.InferenceSession(
            graph.SerializeToString(), neighbour_session_options(1),
            providers=["CPUExecutionProvider"],
        )
        for graph in (
            int8_static_layer_graph(layer, heads, eps, stats, 1),
            int8_static_attention_graph(layer, heads, eps, stats, 1),
            int8_static_feed_forward_graph(layer, eps, stats, 1),
        )
    ]  # fmt: skip
    enc = fp32.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = fp32.model.backbone.embeddings(enc["input_ids"], enc["token_type_ids"])
        query, key = layer.attention.self.query(hidden), layer.attention.self.key(hidden)
    feed = {"hidden_states": hidden.numpy(),
            "attention_mask": enc["attention_mask"].numpy().astype(np.int32)}  # fmt: skip
    (whole,) = sessions[0].run(None, feed)
    attention_output, cls_query, present_key = sessions[1].run(None, feed)
    (composed,) = sessions[2].run(None, {"attention_output": attention_output})
    np.testing.assert_array_equal(composed, whole)
    batch, seq_len, hidden_size = hidden.shape
    head_size = hidden_size // heads
    np.testing.assert_allclose(
        cls_query, query[:, 0].reshape(batch, heads, head_size).numpy(), rtol=1e-5, atol=1e-5
    )
    keys = key.reshape(batch, seq_len, heads, head_size).transpose(1, 2).numpy()
    assert present_key.shape == keys.shape
    assert np.abs(present_key - keys).mean() < 0.02 * np.abs(keys).mean()


def test_token_pruning_answers_do_not_depend_on_the_batch(static_ckpt):
    """With MPEE token pruning (its layers as two int8_static sessions, the fused prune between
    them) a row's answer and kept tokens are the same alone and batched, and the logits stay
    near fp32's with the same schedule."""
    schedule = {"layers": [2, 3], "keep_ratio": 0.6, "beta": [1.0, 0.5]}
    with pytest.warns(UserWarning, match="calibration-int8_static.json"):
        engine = Engine(static_ckpt, policy="none", precision="int8_static", token_pruning=schedule)
    alone = [engine.predict(text) for text in SENTENCES]
    batched = engine.predict(SENTENCES, batch_size=len(SENTENCES))
    for a, b in zip(alone, batched, strict=True):
        assert (a.label, a.exit_layer, a.tokens_kept) == (b.label, b.exit_layer, b.tokens_kept)
        np.testing.assert_allclose(a.logits, b.logits, rtol=0, atol=1e-5)
    assert any(p.tokens_kept[-1] < p.tokens_kept[0] for p in batched)  # pruning happened
    full = Engine(static_ckpt, policy="none", token_pruning=schedule).predict(SENTENCES)
    for f, q in zip(full, batched, strict=True):
        assert f.tokens_kept == q.tokens_kept
        np.testing.assert_allclose(q.logits, f.logits, rtol=0, atol=0.05)


def test_calibrate_writes_statistics_then_its_calibration(tiny_ckpt, tmp_path, capsys):
    ckpt = shutil.copytree(tiny_ckpt, tmp_path / "ckpt")
    texts = tmp_path / "texts.csv"
    write_rows(texts, ["text"], [[s] for s in SENTENCES * 3])
    args = ["calibrate", "--ckpt", str(ckpt), "--precision", "int8_static", "--unlabeled",
            str(texts), "--text-column", "text", "--agreement", "0.5", "--write"]  # fmt: skip
    with pytest.warns(UserWarning, match="calibration-int8_static.json"):
        assert main(args) == 0
    assert (ckpt / ACTIVATIONS_FILE).exists()
    assert (ckpt / calibration_file("int8_static")).exists()
    assert f"activations of {len(SENTENCES) * 3} rows" in capsys.readouterr().out
    Engine(ckpt, precision="int8_static")  # its own calibration now: no warning needed


def test_trainer_writes_the_statistics_and_the_sweep(trained_csv_ckpt, recwarn):
    """Training measures int8_static on the calibration slice too: an engine built from the
    checkpoint needs no calibrate run, and its full depth there is the sweep's."""
    import json

    from eeengine.evaluation import evaluate
    from eeengine.training.calibration_slice import calibration_slice

    manifest = json.loads((trained_csv_ckpt / "eeengine.json").read_text())
    sweep = json.loads((trained_csv_ckpt / calibration_file("int8_static")).read_text())
    record = manifest["training"]["int8_static_calibration"]
    assert record == {"written": True, "file": "calibration-int8_static.json",
                      "full_depth": sweep["full_depth"]}  # fmt: skip
    assert (trained_csv_ckpt / ACTIVATIONS_FILE).exists()
    engine = Engine(trained_csv_ckpt, policy="none", precision="int8_static")
    assert not [w for w in recwarn if "calibration-int8_static.json" in str(w.message)]
    calib, _ = calibration_slice(manifest, trained_csv_ckpt)
    assert evaluate(engine, calib, "accuracy")["value"] == pytest.approx(sweep["full_depth"])
