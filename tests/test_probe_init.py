"""Linear-probe initialisation of the exit heads (LP-FT): the fit, and heads that reproduce
it exactly. Tiny random models only; nothing is fine-tuned."""

import pytest
import torch

from eeengine.batching import collate, encode
from eeengine.training.probe_init import PROBE_ROWS, fit_linear_heads, pooled_features, probe_init
from tests.conftest import SENTENCES, make_tiny_model


def test_fit_separates_separable_classes_per_layer():
    torch.manual_seed(0)
    labels = torch.arange(60) % 3
    centres = torch.randn(2, 3, 8) * 4  # two layers, three classes, 8 features
    features = centres[:, labels] + torch.randn(2, 60, 8) * 0.1
    weight, bias = fit_linear_heads(features, labels, num_labels=3, l2=1e-3)
    assert weight.shape == (2, 3, 8) and bias.shape == (2, 3)
    logits = torch.einsum("lnh,lch->lnc", features, weight) + bias[:, None]
    assert logits.argmax(-1).eq(labels).all()


def test_fit_regression_and_the_penalty_shrinks():
    torch.manual_seed(0)
    features = torch.randn(1, 50, 4)
    targets = features[0] @ torch.tensor([1.0, -2.0, 0.5, 0.0]) + 3.0
    weight, bias = fit_linear_heads(features, targets, num_labels=1, l2=1e-6)
    assert weight[0, 0] == pytest.approx(torch.tensor([1.0, -2.0, 0.5, 0.0]), abs=1e-3)
    assert bias[0, 0].item() == pytest.approx(3.0, abs=1e-3)
    shrunk, _ = fit_linear_heads(features, targets, num_labels=1, l2=10.0)
    assert shrunk.norm() < weight.norm()


@pytest.mark.parametrize(
    "layout,max_rows", [("per_layer", PROBE_ROWS), ("shared", PROBE_ROWS), ("per_layer", 3)]
)
def test_probe_init_heads_give_the_probe_logits(tiny_bert_dir, tokenizer, layout, max_rows):
    """After probe_init, every exit of the model computes exactly the probe fitted on its
    layer's features of the first ``max_rows`` rows (``shared``: the last layer's probe); the
    backbone is untouched."""
    model = make_tiny_model(tiny_bert_dir)
    if layout == "shared":
        model.exit_heads = model.exit_heads[:1]
        model.layout = "shared"
    model.train()
    backbone = {k: v.clone() for k, v in model.bert.state_dict().items()}
    encoded = encode(tokenizer, SENTENCES, None, 64)
    labels = torch.tensor([i % 2 for i in range(len(SENTENCES))])
    probe_init(model, encoded, labels, tokenizer.pad_token_id, l2=0.1, max_rows=max_rows)

    assert model.training  # left as it was
    assert all(torch.equal(v, backbone[k]) for k, v in model.bert.state_dict().items())
    features = pooled_features(model, encoded, tokenizer.pad_token_id)
    weight, bias = fit_linear_heads(features[:, :max_rows], labels[:max_rows], 2, l2=0.1)
    model.eval()
    with torch.no_grad():
        logits, _ = model.exits(*collate(encoded, range(len(SENTENCES)), tokenizer.pad_token_id))
    for layer in range(model.num_layers):
        source = layer if layout == "per_layer" else model.num_layers - 1
        expected = features[layer] @ weight[source].T + bias[source]
        torch.testing.assert_close(logits[layer], expected, atol=1e-4, rtol=1e-4)
