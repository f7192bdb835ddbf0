"""``Prediction``: the engine's answer for one input, and how a batch's exit outputs become
predictions."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from eeengine.device_loop import HostExits
from eeengine.flops import FlopCounter
from eeengine.runtime import check_finite
from eeengine.token_pruning import TokenPruning


@dataclass
class Prediction:
    """The engine's answer for one input.

    Attributes:
        label: predicted label name (classification), else None.
        score: probability of the predicted label (classification), else None.
        probs: softmax probabilities per label name (classification), else None.
        value: predicted value (regression), else None.
        exit_layer: 1-based layer whose exit head produced the answer.
        num_layers: depth of the model (exit_layer == num_layers means full depth).
        logits: raw logits of the exit taken, float32 values.
        tokens_kept: real tokens left after each layer the input ran (length ``exit_layer``)
            under token-wise exit; None without token pruning.
        flops: FLOPs the engine executed for this input (see :mod:`eeengine.flops`).
        full_flops: FLOPs of the full model (every layer, no pruning, one head) on this input;
            MPEE's ρ = Σ flops / Σ full_flops over a data set.
    """

    label: str | None
    score: float | None
    probs: dict[str, float] | None
    value: float | None
    exit_layer: int
    num_layers: int
    logits: list[float] = field(repr=False)
    tokens_kept: list[int] | None = None
    flops: int | None = None
    full_flops: int | None = None


def predictions_from(
    exits: HostExits,
    inputs: Sequence[int],
    lengths: Sequence[int],
    label_names: Sequence[str] | None,
    flop_counter: FlopCounter,
    token_pruning: TokenPruning | None,
) -> list[Prediction]:
    """One :class:`Prediction` per row of a batch's exits.

    Args:
        exits: the batch's logits, exit layers and, under token pruning, tokens kept.
        inputs: the caller's index of each row (named in errors).
        lengths: each row's token count (for its FLOPs).
        label_names: class names in index order; None for regression (one logit: the value).
        flop_counter: the model's :class:`eeengine.flops.FlopCounter`.
        token_pruning: the schedule the batch ran with.

    Raises:
        eeengine.runtime.NonFiniteLogitsError: a NaN or infinite logit (input and layer named).
    """
    num_layers = flop_counter.num_layers
    logits, layers = exits.logits, exits.exit_layer
    check_finite(logits, layers, inputs)
    kept = exits.tokens_kept if token_pruning is not None else [None] * len(layers)
    predictions = []
    for row, layer, length, row_kept in zip(logits, layers, lengths, kept, strict=True):
        if label_names is None:
            prediction = Prediction(None, None, None, row[0], layer, num_layers, row)
        else:
            probs = softmax(row)
            best = max(range(len(probs)), key=probs.__getitem__)
            named = dict(zip(label_names, probs, strict=True))
            prediction = Prediction(
                label_names[best], probs[best], named, None, layer, num_layers, row
            )
        prediction.tokens_kept = None if row_kept is None else row_kept[:layer]
        prediction.flops = flop_counter.executed(length, layer, token_pruning)
        prediction.full_flops = flop_counter.full(length)
        predictions.append(prediction)
    return predictions


def softmax(logits: Sequence[float]) -> list[float]:
    """Class probabilities of one row of finite logits, in float64 (a few classes: plain
    Python costs less than a tensor op here, measured at batch 1)."""
    top = max(logits)
    exps = [math.exp(value - top) for value in logits]
    total = sum(exps)
    return [value / total for value in exps]


def predictions_in_order(
    batches: Sequence[Sequence[int]],
    outs: Sequence[HostExits],
    lengths: Sequence[int],
    offset: int,
    label_names: Sequence[str] | None,
    flop_counter: FlopCounter,
    token_pruning: TokenPruning | None,
) -> list[Prediction]:
    """The predictions of batches that hold inputs out of order, back in input order.

    Args:
        batches: the indices of the inputs in each batch (every input in exactly one).
        outs: each batch's exits.
        lengths: every input's token count.
        offset: the index of input 0 among the caller's inputs (errors name
            ``offset + index``).
        label_names, flop_counter, token_pruning: as :func:`predictions_from`.

    Raises:
        eeengine.runtime.NonFiniteLogitsError: a NaN or infinite logit (input and layer named).
    """
    results: list[Prediction | None] = [None] * len(lengths)
    for indices, out in zip(batches, outs, strict=True):
        inputs = [offset + i for i in indices]
        batch_lengths = [lengths[i] for i in indices]
        batch = predictions_from(
            out, inputs, batch_lengths, label_names, flop_counter, token_pruning
        )
        for i, prediction in zip(indices, batch, strict=True):
            results[i] = prediction
    return results
