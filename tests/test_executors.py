"""Layer executors against the reference (eeengine's torch encoder, unfused), and the Engine
with each executor.

Tolerance: ONNX Runtime computes the same fp32 math with other kernels (GEMM blocking, fused
softmax and LayerNorm), so only the order of fp32 sums differs. That moves each layer's output
by a few ulps of the largest activation; ATOL = 1e-5 covers it with margin (measured: <= 6e-6
on all-MiniLM-L6-v2, whose activations reach ~10). Exit decisions must be equal.
"""

import pytest
import torch

from eeengine import Engine
from eeengine.batching import collate, encode
from eeengine.executors import EXECUTORS, TorchExecutor, make_executor
from eeengine.modeling_bert import attention_bias
from eeengine.policies import make_policy
from eeengine.runtime import early_exit_forward
from tests.conftest import SENTENCES, make_tiny_model

ATOL = RTOL = 1e-5


def _available(name: str) -> str:
    if name == "onnxruntime":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnx")
    return name


@pytest.fixture(scope="module")
def model(tiny_bert_dir):
    return make_tiny_model(tiny_bert_dir)


@pytest.fixture(scope="module")
def batch(tokenizer):
    """Right-padded rows of different lengths, with a second segment in the last row."""
    input_ids, attention_mask, token_type_ids = collate(
        encode(tokenizer, SENTENCES, None, 64), range(len(SENTENCES)), 0
    )
    token_type_ids[-1, 3:] = 1
    return input_ids, attention_mask, token_type_ids


def _reference_hidden_states(model, input_ids, attention_mask, token_type_ids) -> list:
    """Embeddings, then every layer, through the unfused torch modules."""
    bias = attention_bias(attention_mask)
    hidden = model.backbone.embed(input_ids, token_type_ids)
    states = [hidden]
    for layer in model.backbone.layers:
        hidden = layer(hidden, bias)
        states.append(hidden)
    return states


@pytest.mark.parametrize("name", EXECUTORS)
def test_every_layer_matches_the_reference(model, batch, name):
    input_ids, attention_mask, token_type_ids = batch
    with torch.inference_mode():
        expected = _reference_hidden_states(model, *batch)
        executor = make_executor(_available(name), model)
        assert executor.name == name
        hidden = executor.embed(input_ids, token_type_ids)
        actual = [hidden]
        mask = executor.mask(attention_mask)
        for index in range(model.num_layers):
            hidden = executor.layer(index, expected[index], mask)  # same input per layer
            actual.append(hidden)
    real = attention_mask.bool()
    for layer, (a, e) in enumerate(zip(actual, expected, strict=True)):
        torch.testing.assert_close(a[real], e[real], atol=ATOL, rtol=RTOL, msg=f"layer {layer}")


@pytest.mark.parametrize("name", EXECUTORS)
@pytest.mark.parametrize(
    ("policy", "params"),
    [
        ("entropy", {"threshold": [0.45, 0.15, 0.6, 0.6]}),
        ("pcee", {"threshold": 0.75, "patience": 2}),
    ],
)
def test_loop_exits_as_with_the_reference(model, batch, name, policy, params):
    policy = make_policy(policy, **params)
    expected = early_exit_forward(model, policy, *batch)
    executor = make_executor(_available(name), model)
    actual = early_exit_forward(model, policy, *batch, executor=executor)
    assert len(set(expected.exit_layer.tolist())) >= 2  # rows leave the batch early
    assert actual.exit_layer.tolist() == expected.exit_layer.tolist()
    torch.testing.assert_close(actual.logits, expected.logits, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", EXECUTORS)
def test_engine_batched_equals_one_by_one(tiny_ckpt, name):
    engine = Engine(tiny_ckpt, executor=_available(name))
    assert engine.executor == name
    together = engine.predict(SENTENCES, batch_size=5)
    for sentence, batched in zip(SENTENCES, together, strict=True):
        alone = engine.predict(sentence)
        assert (alone.label, alone.exit_layer) == (batched.label, batched.exit_layer)
        assert alone.logits == pytest.approx(batched.logits, abs=ATOL)


def test_engine_executors_agree(tiny_ckpt):
    _available("onnxruntime")
    reference = Engine(tiny_ckpt, executor="torch").predict(SENTENCES, batch_size=3)
    default = Engine(tiny_ckpt)  # None: onnxruntime where it can run
    assert default.executor == "onnxruntime"
    actual = default.predict(SENTENCES, batch_size=3)
    assert [p.exit_layer for p in actual] == [p.exit_layer for p in reference]
    torch.testing.assert_close(
        torch.tensor([p.logits for p in actual]),
        torch.tensor([p.logits for p in reference]),
        atol=ATOL,
        rtol=RTOL,
    )


def _copy(model):
    """A fresh, unfused copy of ``model`` in eval mode."""
    clone = type(model)(model.config, model.num_labels)
    clone.load_state_dict(model.state_dict())
    return clone.eval()


def test_fused_qkv_is_used_in_eval_only(model, batch):
    fresh = _copy(model)
    with torch.inference_mode():
        expected = _reference_hidden_states(fresh, *batch)[-1]
        TorchExecutor(fresh)  # fuses
        attention = fresh.bert.encoder.layer[0].attention.self
        assert attention.qkv_weight.shape == (
            3 * attention.query.out_features,
            attention.query.in_features,
        )
        fused = _reference_hidden_states(fresh, *batch)[-1]
    torch.testing.assert_close(fused, expected, atol=ATOL, rtol=RTOL)
    assert "qkv_weight" not in "".join(fresh.state_dict())  # Hugging Face keys only
    fresh.train()
    assert attention.qkv_weight is None  # training never reads a stale copy


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"executor": "tensorrt"}, "unknown executor 'tensorrt'")],
)
def test_bad_executor(tiny_ckpt, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Engine(tiny_ckpt, **kwargs)


def test_onnxruntime_refuses_training_mode(tiny_bert_dir):
    _available("onnxruntime")
    with pytest.raises(ValueError, match="model.eval"):
        make_executor("onnxruntime", make_tiny_model(tiny_bert_dir).train())
