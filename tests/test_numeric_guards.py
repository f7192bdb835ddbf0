"""A NaN or infinite logit never becomes a Prediction: the input and the layer are named."""

import pytest
import torch

from eeengine import Engine
from eeengine.batching import collate, encode
from eeengine.policies import make_policy
from eeengine.runtime import NonFiniteLogitsError, check_finite, early_exit_forward
from tests.conftest import SENTENCES, make_tiny_model


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_check_sees_what_the_loop_latched(tiny_bert_dir, tokenizer, backend, value):
    model = make_tiny_model(tiny_bert_dir)
    batch = collate(encode(tokenizer, SENTENCES[:3], None, 64), [0, 1, 2], 0)
    out = early_exit_forward(model, make_policy("none"), *batch, backend=backend)
    check_finite(out.logits.tolist(), out.exit_layer.tolist(), [7, 8, 9])  # finite: no error
    with torch.no_grad():
        model.exit_heads[3].classifier.bias[1] = value  # the last exit overflows
    out = early_exit_forward(model, make_policy("none"), *batch, backend=backend)
    with pytest.raises(NonFiniteLogitsError, match="3 input.*: input 7 at layer 4, input 8") as e:
        check_finite(out.logits.tolist(), out.exit_layer.tolist(), [7, 8, 9])
    assert (e.value.inputs, e.value.layers) == ([7, 8, 9], [4, 4, 4])


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("batch_size", [1, 3, 32])
def test_engine_names_the_input_whose_numbers_overflow(tiny_ckpt, backend, batch_size):
    engine = Engine(tiny_ckpt, backend=backend, executor="torch")
    expected = engine.predict(SENTENCES)
    token = engine.tokenizer.convert_tokens_to_ids("masterpiece")  # only in SENTENCES[6]
    embeddings = engine.model.bert.embeddings.word_embeddings.weight
    saved = embeddings[token].clone()
    with torch.no_grad():
        embeddings[token] = float("inf")  # its hidden states turn NaN after the LayerNorm
    with pytest.raises(NonFiniteLogitsError, match=r"1 input\(s\): input 6 at layer 4;") as error:
        engine.predict(SENTENCES, batch_size=batch_size)
    assert (error.value.inputs, error.value.layers) == ([6], [4])
    with torch.no_grad():
        embeddings[token] = saved
    again = engine.predict(SENTENCES)
    assert [(p.label, p.exit_layer, p.logits) for p in again] == [
        (p.label, p.exit_layer, p.logits) for p in expected
    ]
