"""Linear-probe initialisation of the exit heads (LP-FT, Kumar et al. 2022).

Before fine-tuning, every exit head's classifier is set to the L2-regularised linear model
(logistic regression; least squares for regression) fitted on the frozen, pooled features of
its layer over the training rows. Fine-tuning then starts from heads that already classify,
so the first steps do not spend the few examples of a small data set on undoing random heads
(and distorting the pretrained features while doing so).

The probe is fitted on at most :data:`PROBE_ROWS` rows: the trainer passes its rows in the
run's seeded shuffle, so the first rows are a random sample. A linear model of 384 features
needs no more, and a forward pass over all of SST-2's 65k rows took 87 s on 2 AMX cores in
fp32, against 11 s for 8,192 (the first-run recipe probes; its whole run has 15 minutes).
"""

from __future__ import annotations

import torch
from torch import Tensor

from eeengine.batching import Encoded, collate, length_sorted_batches
from eeengine.modeling_multiexit import MultiExitBert
from eeengine.token_pruning import TokenPruning
from eeengine.training.recipes.base import exit_losses

PROBE_ROWS = 8192


@torch.no_grad()
def pooled_features(
    model: MultiExitBert,
    encoded: Encoded,
    pad_token_id: int,
    token_pruning: TokenPruning | None = None,
    batch_size: int = 64,
) -> Tensor:
    """Every layer's pooled features of every input, in eval mode (no dropout), with the run's
    token-pruning schedule (None: none).

    Returns:
        (num_layers, len(encoded), hidden_size) float32, inputs in ``encoded`` order.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    features = torch.empty(model.num_layers, len(encoded), model.config.hidden_size)
    for indices in length_sorted_batches(encoded.lengths, batch_size):
        input_ids, attention_mask, token_type_ids = collate(encoded, indices, pad_token_id, device)
        outputs = model.backbone.layer_outputs(
            input_ids, attention_mask, token_type_ids, token_pruning
        )
        for layer, (hidden_states, mask) in enumerate(outputs):
            pooled = model.exit_head(layer).pool(hidden_states, mask)
            features[layer, indices] = pooled.float().cpu()
    model.train(was_training)
    return features


def fit_linear_heads(
    features: Tensor, labels: Tensor, num_labels: int, l2: float, max_iter: int = 100
) -> tuple[Tensor, Tensor]:
    """One L2-regularised linear model per layer, fitted jointly with L-BFGS on the mean
    per-exit loss (:func:`eeengine.training.recipes.base.exit_losses`) plus ``l2 / 2`` times
    the squared weights.

    Args:
        features: (num_layers, num_examples, hidden_size) float32.
        labels: (num_examples,) int64 classes, or float targets when ``num_labels == 1``.
        num_labels: C (1 for regression).
        l2: the weight penalty (not on the bias).
        max_iter: L-BFGS iterations.

    Returns:
        weight (num_layers, num_labels, hidden_size) and bias (num_layers, num_labels), float32.
    """
    num_layers, _, hidden_size = features.shape
    weight = torch.zeros(num_layers, num_labels, hidden_size, requires_grad=True)
    bias = torch.zeros(num_layers, num_labels, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def objective() -> Tensor:
        optimizer.zero_grad()
        logits = torch.einsum("lnh,lch->lnc", features, weight) + bias[:, None, :]
        loss = exit_losses(logits, labels).sum() + l2 / 2 * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
    return weight.detach(), bias.detach()


def probe_init(
    model: MultiExitBert,
    encoded: Encoded,
    labels: Tensor,
    pad_token_id: int,
    l2: float,
    token_pruning: TokenPruning | None = None,
    max_rows: int = PROBE_ROWS,
) -> None:
    """Set every exit head's classifier to the linear probe of its layer's features on the
    first ``max_rows`` training rows (with layout ``shared``, the one head gets the last
    layer's probe).

    Args:
        model: the multi-exit model, heads untrained.
        encoded, labels: the training rows, shuffled (``labels`` as the recipe's loss takes
            them).
        pad_token_id: the tokenizer's padding id.
        l2: the weight penalty of the probe (see :func:`fit_linear_heads`).
        token_pruning: the run's token-pruning schedule (None: none).
        max_rows: the most rows the probe is fitted on.
    """
    encoded = Encoded(encoded.input_ids[:max_rows], encoded.token_type_ids[:max_rows])
    features = pooled_features(model, encoded, pad_token_id, token_pruning)
    weight, bias = fit_linear_heads(features, labels[:max_rows], model.num_labels, l2)
    with torch.no_grad():
        for layer in range(len(model.exit_heads)):
            source = layer if model.layout != "shared" else model.num_layers - 1
            classifier = model.exit_heads[layer].classifier
            classifier.weight.copy_(weight[source])
            classifier.bias.copy_(bias[source])
