"""Dev-set evaluation of an engine (:func:`evaluate`) and of every exit, and threshold sweeps
of the exit policies.

Sweeps run the policies on the logits of all exits computed once (``run_policy``), which gives
exactly what the engine would do row by row, at the cost of one full-depth pass.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from eeengine.batching import collate, encode, length_sorted_batches
from eeengine.executors import LayerExecutor
from eeengine.flops import FlopCounter
from eeengine.metrics import METRICS, bootstrap_weights
from eeengine.modeling_multiexit import MultiExitBert
from eeengine.policies import POLICIES, make_policy, run_policy
from eeengine.runtime import ExitLoop
from eeengine.token_pruning import TokenPruning

if TYPE_CHECKING:
    from eeengine.data import Split
    from eeengine.engine import Engine

# Threshold grids per policy, in the policy's own units.
SWEEP_GRIDS: dict[str, list[float]] = {
    "entropy": [round(0.025 * i, 3) for i in range(1, 28)],  # nats, up to 0.675 < log 2
    "normalized_entropy": [round(0.025 * i, 3) for i in range(1, 40)],
    "max_prob": [round(0.5 + 0.0125 * i, 4) for i in range(40)],  # probability, 0.5 to 0.9875
    "pcee": [round(0.025 * i, 3) for i in range(1, 40)],
    "elbert": [round(0.025 * i, 3) for i in range(1, 40)],  # normalized entropy, stage 1
    "mpee": [round(0.025 * i, 3) for i in range(1, 28)],  # nats, entropy of the memory
    "lte": [round(0.025 * i, 3) for i in range(1, 40)],  # LTE score
    # Regression only: δ in the label's units (STS-B: 0-5). Classification compares argmax.
    "patience": [0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0],
}
SWEEP_PATIENCE = {"pcee": (1, 2, 3), "patience": (1, 2, 3, 4)}
# ELBERT's second stage, (N, window test): on a 6-layer model the window changes the trade-off
# more than the threshold does. The "range" test (it needs r as well) is not swept.
SWEEP_ELBERT_WINDOWS = (
    (2, "monotonic"),
    (3, "monotonic"),
    (4, "monotonic"),
    (2, "stable"),
    (3, "stable"),
    (4, "stable"),
)
# Swept policies: those with a grid, and "budget" over layers 1 … L-1.
SWEPT_POLICIES = (*SWEEP_GRIDS, "budget")
# Keys of a sweep point that are measurements, not parameters of the policy.
POINT_MEASUREMENTS = (
    "metric",
    "metrics",
    "drop_std",
    "avg_exit_layer",
    "layer_saving",
    "speedup",
    "flops_ratio",
    "flops_speedup",
)


def sweep_params(name: str, num_labels: int, num_layers: int) -> list[dict]:
    """The parameter sets :func:`sweep` tries for policy ``name`` on a model with
    ``num_labels`` classes (1: regression) and ``num_layers`` layers."""
    if name == "budget":
        return [{"layer": layer} for layer in range(1, num_layers)]
    thresholds: list[float | None] = list(SWEEP_GRIDS[name])
    if name == "elbert":
        return [
            {"threshold": threshold, "window": window, "window_test": test}
            for window, test in SWEEP_ELBERT_WINDOWS
            for threshold in thresholds
        ]
    if name == "patience" and num_labels > 1:
        thresholds = [None]
    return [
        {"threshold": threshold, "patience": patience}
        for patience in SWEEP_PATIENCE.get(name, (None,))
        for threshold in thresholds
    ]


@torch.inference_mode()
def all_exit_outputs(
    model: MultiExitBert,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    text_pairs: Sequence[str] | None,
    max_length: int,
    batch_size: int = 64,
    progress: bool = False,
    token_pruning: TokenPruning | None = None,
    executor: LayerExecutor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Full-depth logits and signals of every exit, on the model's device, with the
    token-pruning schedule if one is given (the engine's logits exactly: pruning does not
    depend on exits).

    Args:
        executor: runs the layers (an engine's, so that its precision is measured: see
            :func:`exits_through`), in batches cut where padding costs more than a pass (its
            ``split_cost``); None: the model's own torch layers, batches not cut.

    Returns:
        logits: (num_layers, len(texts), num_labels) float32 on CPU, rows in input order.
        signals: the model's extra per-layer signals (``lte_score`` with an LTE module), each
            (num_layers, len(texts)) float32 on CPU; ready for :func:`sweep`.
    """
    model.eval()
    device = next(model.parameters()).device
    encoded = encode(tokenizer, texts, text_pairs, max_length)
    out = torch.empty(model.num_layers, len(texts), model.num_labels)
    signals = {name: torch.empty(model.num_layers, len(texts)) for name in model.signals}
    split_cost = math.inf if executor is None else executor.split_cost
    batches = length_sorted_batches(encoded.lengths, batch_size, split_cost)
    try:
        for indices in tqdm(batches, desc="evaluating", disable=not progress, leave=False):
            batch = collate(encoded, indices, tokenizer.pad_token_id, device)
            if executor is None:
                logits, batch_signals = model.exits(*batch, token_pruning)
            else:
                logits, batch_signals = exits_through(executor, model, batch, token_pruning)
            out[:, indices] = logits.float().cpu()
            for name, value in batch_signals.items():
                signals[name][:, indices] = value.float().cpu()
    finally:
        if executor is not None:
            executor.release_scratch()
    return out, signals


def exits_through(
    executor: LayerExecutor,
    model: MultiExitBert,
    batch: tuple[Tensor, Tensor, Tensor],
    token_pruning: TokenPruning | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """:meth:`MultiExitBert.exits` with the layers run by ``executor`` (the engine's loop,
    :class:`eeengine.runtime.ExitLoop`, with policy ``none``: no row leaves before the last
    layer), so the logits are those the engine computes at the executor's precision.

    Args:
        batch: input_ids, attention_mask (1 = real token), token_type_ids: (batch_size,
            seq_len) each.

    Returns:
        As :meth:`MultiExitBert.exits`: logits (num_layers, batch_size, num_labels) and
        signals.
    """
    loop = ExitLoop(model, make_policy("none"), "reference", token_pruning, executor)
    all_logits, all_scores = [], []
    with executor.host_ops():
        live = loop.start(*batch)
        out = loop.outputs(batch[0].shape[0], batch[0].device)
        for layer in range(1, model.num_layers + 1):
            loop.step(live, layer, out)
            head = model.exit_head(layer - 1)
            pooled = head.pool(live.hidden_states, live.attention_mask)
            all_logits.append(head.classify(pooled))
            if model.lte is not None:
                all_scores.append(model.lte(pooled))
    signals = {"lte_score": torch.stack(all_scores)} if model.lte is not None else {}
    return torch.stack(all_logits), signals


def flops_tables(
    model: MultiExitBert,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    text_pairs: Sequence[str] | None,
    max_length: int,
    token_pruning: TokenPruning | None = None,
) -> tuple[Tensor, Tensor]:
    """The ``flops`` argument of :func:`sweep` for these inputs: each one's FLOPs when it exits
    at each layer (num_layers, len(texts)) and of the full model (len(texts),), float64, at its
    own token count (truncated to ``max_length``) under ``token_pruning``
    (:meth:`eeengine.flops.FlopCounter.tables`)."""
    lengths = encode(tokenizer, texts, text_pairs, max_length).lengths
    return FlopCounter.for_model(model).tables(lengths, token_pruning)


def all_exit_logits(
    model: MultiExitBert,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    text_pairs: Sequence[str] | None,
    max_length: int,
    batch_size: int = 64,
    progress: bool = False,
    token_pruning: TokenPruning | None = None,
    executor: LayerExecutor | None = None,
) -> Tensor:
    """The logits of :func:`all_exit_outputs`: (num_layers, len(texts), num_labels) float32."""
    logits, _ = all_exit_outputs(
        model,
        tokenizer,
        texts,
        text_pairs,
        max_length,
        batch_size,
        progress,
        token_pruning,
        executor,
    )
    return logits


def predictions_of(logits: Tensor) -> list:
    """Class indices (classification) or values (regression, num_labels == 1)."""
    if logits.shape[-1] == 1:
        return logits[..., 0].tolist()
    return logits.argmax(-1).tolist()


def exit_metrics(all_logits: Tensor, labels: Sequence, metric: str) -> list[float]:
    """The task metric of each exit on its own; one float per layer, layer 1 first."""
    return [METRICS[metric](predictions_of(layer_logits), labels) for layer_logits in all_logits]


def score_predictions(predictions: Sequence, labels: Sequence, metric: str) -> dict:
    """Score :class:`eeengine.prediction.Prediction` s of a labelled split.

    Args:
        predictions: one per example, in the split's order.
        labels: class indices or values, one per example.
        metric: name in :data:`eeengine.metrics.METRICS`.

    Returns:
        ``{"metric", "value", "avg_exit_layer" (layers), "layer_saving" (1 - avg / L),
        "speedup" (L / avg), "flops_ratio" (MPEE's ρ = Σ executed / Σ full-model FLOPs),
        "flops_speedup" (1 / ρ, MPEE's acceleration)}``.
    """
    if predictions[0].label is None:
        outputs = [p.value for p in predictions]
    else:
        names = list(predictions[0].probs)
        outputs = [names.index(p.label) for p in predictions]
    num_layers = predictions[0].num_layers
    avg = sum(p.exit_layer for p in predictions) / len(predictions)
    flops_ratio = sum(p.flops for p in predictions) / sum(p.full_flops for p in predictions)
    return {
        "metric": metric,
        "value": METRICS[metric](outputs, labels),
        "avg_exit_layer": avg,
        "layer_saving": 1.0 - avg / num_layers,
        "speedup": num_layers / avg,
        "flops_ratio": flops_ratio,
        "flops_speedup": 1.0 / flops_ratio,
    }


def evaluate(engine: Engine, split: Split, metric: str, batch_size: int = 32) -> dict:
    """Run :meth:`eeengine.Engine.predict` on a labelled split and score it.

    Args:
        engine: the engine, with the policy it runs.
        split: texts (and pairs) with one label (class index or value) each.
        metric: name in :data:`eeengine.metrics.METRICS`.
        batch_size: rows per forward pass.

    Returns:
        :func:`score_predictions`' dict (metric value, average exit layer, speed-ups, FLOPs
        ratio) plus ``seconds``, the wall-clock time of the predictions.

    Raises:
        As :meth:`eeengine.Engine.predict`.
    """
    inputs = (
        split.texts
        if split.text_pairs is None
        else list(zip(split.texts, split.text_pairs, strict=True))
    )
    started = time.perf_counter()
    predictions = engine.predict(inputs, batch_size=batch_size)
    seconds = time.perf_counter() - started
    return {**score_predictions(predictions, split.labels, metric), "seconds": seconds}


def policy_params(point: dict) -> dict:
    """The parameters of the policy in a sweep point (or in ``eeengine.json``'s ``policy``):
    every key but the measurements and ``name``, e.g. ``layer`` for ``budget`` or ``window``
    for ``elbert``, ready for :func:`eeengine.policies.make_policy`."""
    return {k: v for k, v in point.items() if k not in POINT_MEASUREMENTS and k != "name"}


def sweep(
    all_logits: Tensor,
    labels: Sequence,
    metric: str,
    signals: Mapping[str, Tensor] | None = None,
    extra_metrics: Sequence[str] = (),
    flops: tuple[Tensor, Tensor] | None = None,
) -> dict:
    """Every policy that applies over its grid, on precomputed logits of all exits.

    A policy applies when it supports the task (regression: num_labels == 1) and every signal
    it needs is in ``signals`` (``lte`` needs ``lte_score``).

    Args:
        all_logits: (num_layers, num_examples, num_labels).
        labels: one label (class index or value) per example.
        metric: a key of :data:`eeengine.metrics.METRICS`, the one operating points are
            picked by.
        signals: extra per-layer signals, each (num_layers, num_examples).
        extra_metrics: more keys of :data:`eeengine.metrics.METRICS` to report (e.g. MRPC's
            accuracy beside its F1).
        flops: (executed, full) of :meth:`eeengine.flops.FlopCounter.tables`: (num_layers,
            num_examples) FLOPs of each example when it exits at each layer, and (num_examples,)
            FLOPs of the full model. With it every point also gets MPEE's ``flops_ratio``
            ρ = Σ executed / Σ full (Kong et al. 2022, eq. 15) and ``flops_speedup`` 1 / ρ.

    Returns:
        ``{"metric", "num_layers", "num_examples", "full_depth", "full_depth_metrics",
        "policies": {name: [point, ...]}}`` where a point holds the policy's parameters,
        ``metric`` (the value of ``metric``), ``metrics`` (``{name: value}`` of ``metric`` and
        ``extra_metrics``), ``avg_exit_layer`` (layers), ``layer_saving`` (1 - avg / L) and
        ``speedup`` (L / avg), ``drop_std`` (the standard deviation of full depth's metric minus
        the point's over :data:`eeengine.metrics.BOOTSTRAP_SAMPLES` paired bootstrap resamples
        of the examples, in metric points: how far the drop measured on these examples may be
        from the drop on other data of the same kind;
        :func:`eeengine.selection.choose_operating_point` ``confidence``), and with ``flops``
        also ``flops_ratio`` and ``flops_speedup``.
    """
    signals = signals or {}
    num_layers, _, num_labels = all_logits.shape
    names = [metric, *(m for m in extra_metrics if m != metric)]

    def scores(predictions: list) -> dict[str, float]:
        return {name: METRICS[name](predictions, labels) for name in names}

    full_predictions = predictions_of(all_logits[-1])
    full_depth = scores(full_predictions)
    # The drop's spread, paired: the same resamples of the rows for full depth and the point.
    weights = bootstrap_weights(len(full_predictions))
    full_resampled = METRICS[metric](full_predictions, labels, weights)
    result = {
        "metric": metric,
        "num_layers": num_layers,
        "num_examples": len(full_predictions),
        "full_depth": full_depth[metric],
        "full_depth_metrics": full_depth,
        "policies": {},
    }
    for name in SWEPT_POLICIES:
        cls = POLICIES[name]
        if num_labels == 1 and not cls.supports_regression:
            continue
        if any(signal not in signals for signal in cls.needs):
            continue
        points = []
        for params in sweep_params(name, num_labels, num_layers):
            policy = make_policy(name, **params)
            exit_layer, logits = run_policy(policy, all_logits, signals)
            avg = exit_layer.double().mean().item()
            predictions = predictions_of(logits)
            measured = scores(predictions)
            resampled = METRICS[metric](predictions, labels, weights)
            point = {
                **policy.params(),
                "metric": measured[metric],
                "metrics": measured,
                "drop_std": _finite_or_none((full_resampled - resampled).std().item()),
                "avg_exit_layer": avg,
                "layer_saving": 1.0 - avg / num_layers,
                "speedup": num_layers / avg,
            }
            if flops is not None:
                executed, full = flops
                ratio = executed.gather(0, exit_layer[None].long() - 1).sum() / full.sum()
                point.update(flops_ratio=ratio.item(), flops_speedup=1.0 / ratio.item())
            points.append(point)
        result["policies"][name] = points
    return result


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN: a metric undefined on some resample (a constant regression output)
    leaves the spread unknown."""
    return value if math.isfinite(value) else None
