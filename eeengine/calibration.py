"""Operating points: measure every exit policy's trade-off on data, then pick one.

One pipeline serves :meth:`eeengine.Engine.calibrate` (:func:`calibrate_engine`), ``eeengine
eval --sweep`` and the trainer: the logits of every exit (one full-depth pass) → the FLOPs each
input costs when it exits at each layer → every policy swept over its grid
(:func:`eeengine.evaluation.sweep`) → one :class:`OperatingPoint` chosen by speed
(``target_speedup``) or by metric loss (``max_drop``).

Calibrating without labels (``labels=None``) measures *agreement with full depth*: each input's
full-depth prediction is its label and the metric is :func:`agreement` (percent of inputs whose
prediction matches full depth). The fastest point with agreement >= ``a`` is chosen on the
user's own in-domain texts, where thresholds tuned on another distribution do not transfer (a
model calibrated on SST-2 sentences loses points on 512-token movie reviews).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import Tensor
from transformers import PreTrainedTokenizerBase

from eeengine.checkpoint import load_checkpoint
from eeengine.evaluation import all_exit_outputs, flops_tables, policy_params, predictions_of, sweep
from eeengine.executors import LayerExecutor
from eeengine.inputs import normalize_inputs
from eeengine.metrics import METRICS
from eeengine.modeling_multiexit import MultiExitBert
from eeengine.policies import ExitPolicy, make_policy
from eeengine.selection import (
    checked_confidence,
    choose_for_speedup,
    choose_operating_point,
    iter_points,
    reference_full_depth,
)
from eeengine.token_pruning import TokenPruning

if TYPE_CHECKING:
    from eeengine.engine import Engine

AGREEMENT = "agreement"


@dataclass(frozen=True)
class OperatingPoint:
    """One calibrated setting of an exit policy and what it measured.

    Attributes:
        name: the policy (a key of :data:`eeengine.policies.POLICIES`).
        params: its parameters (``threshold``, ``patience``, ``window``, ``layer`` ...).
        metric: the calibration metric at this point (e.g. accuracy in percent, or
            :func:`eeengine.metrics.agreement` with full depth in percent).
        avg_exit_layer: average exit layer (layers, 1 … L).
        speedup: layer speed-up L / avg_exit_layer.
        layer_saving: 1 - avg_exit_layer / L (the papers' "speed-up").
        metrics: every metric measured at the point, ``{name: value}``.
        flops_ratio: MPEE's ρ = Σ executed / Σ full-model FLOPs (None when not measured).
        flops_speedup: 1 / ρ.
        drop_std: the paired-bootstrap standard deviation of full depth's metric minus this
            point's, in metric points (None where the sweep has none).
    """

    name: str
    params: dict = field(hash=False)
    metric: float
    avg_exit_layer: float
    speedup: float
    layer_saving: float
    metrics: dict = field(default_factory=dict, hash=False)
    flops_ratio: float | None = None
    flops_speedup: float | None = None
    drop_std: float | None = None

    @classmethod
    def from_sweep(cls, name: str, point: dict) -> OperatingPoint:
        """The point of policy ``name`` as :func:`eeengine.evaluation.sweep` stores it."""
        return cls(
            name=name,
            params=policy_params(point),
            metric=point["metric"],
            avg_exit_layer=point["avg_exit_layer"],
            speedup=point["speedup"],
            layer_saving=point["layer_saving"],
            metrics=point.get("metrics", {}),
            flops_ratio=point.get("flops_ratio"),
            flops_speedup=point.get("flops_speedup"),
            drop_std=point.get("drop_std"),
        )

    def policy(self) -> ExitPolicy:
        """A fresh :class:`eeengine.policies.ExitPolicy` with these parameters."""
        return make_policy(self.name, **self.params)

    def to_json(self) -> dict:
        """The policy as ``eeengine.json`` stores it: ``{"name", **params}``."""
        return {"name": self.name, **self.params}

    def describe(self) -> str:
        """One line: the policy, its parameters, metric and average exit layer."""
        params = ", ".join(f"{k}={v}" for k, v in self.params.items() if v is not None)
        return (
            f"{self.name}({params}): metric {self.metric:.2f}, "
            f"average exit layer {self.avg_exit_layer:.2f}"
        )


@dataclass
class TradeOff:
    """Every policy's measured trade-off on one data set.

    Attributes:
        sweep: the :func:`eeengine.evaluation.sweep` result (the content of
            ``calibration.json``): ``metric``, ``full_depth``, ``policies`` …
        all_logits: (num_layers, num_examples, num_labels) float32, every exit's logits.
    """

    sweep: dict
    all_logits: Tensor

    def select(
        self,
        target_speedup: float | None = None,
        max_drop: float | None = None,
        policy: str | None = None,
        confidence: float | None = None,
    ) -> OperatingPoint:
        """See :func:`select_operating_point`."""
        return select_operating_point(self.sweep, target_speedup, max_drop, policy, confidence)


def measure_trade_off(
    model: MultiExitBert,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    text_pairs: Sequence[str] | None,
    labels: Sequence | None,
    metric: str,
    max_length: int,
    extra_metrics: Sequence[str] = (),
    token_pruning: TokenPruning | None = None,
    batch_size: int = 64,
    progress: bool = False,
    outputs: tuple[Tensor, dict[str, Tensor]] | None = None,
    executor: LayerExecutor | None = None,
) -> TradeOff:
    """Run the model to full depth once and sweep every policy that applies.

    Args:
        model, tokenizer: the checkpoint's.
        texts, text_pairs: the inputs (``text_pairs`` None for single-sentence tasks).
        labels: class indices or values, one per text; None to calibrate for agreement with
            full depth (``metric`` and ``extra_metrics`` are then ignored).
        metric: the key of :data:`eeengine.metrics.METRICS` points are picked by.
        max_length: tokens per input (longer inputs are truncated).
        extra_metrics: more metrics recorded at every point.
        token_pruning: the schedule the engine runs with (it changes logits and FLOPs).
        batch_size: rows per full-depth forward pass.
        progress: show a progress bar.
        outputs: (logits, signals) of :func:`eeengine.evaluation.all_exit_outputs` when the
            caller has them already (the trainer's last evaluation).
        executor: runs the layers (the engine's, so that its precision is calibrated); None:
            the model's torch layers.

    Returns:
        A :class:`TradeOff`; every point carries MPEE's FLOPs ratio ρ and 1 / ρ.
    """
    if outputs is None:
        outputs = all_exit_outputs(
            model,
            tokenizer,
            texts,
            text_pairs,
            max_length,
            batch_size=batch_size,
            progress=progress,
            token_pruning=token_pruning,
            executor=executor,
        )
    all_logits, signals = outputs
    if labels is None:
        labels, metric, extra_metrics = predictions_of(all_logits[-1]), AGREEMENT, ()
    flops = flops_tables(model, tokenizer, texts, text_pairs, max_length, token_pruning)
    result = sweep(all_logits, list(labels), metric, signals, extra_metrics, flops)
    return TradeOff(result, all_logits)


def calibrate_engine(
    engine: Engine,
    executor: LayerExecutor,
    texts: Sequence[str],
    labels: Sequence[int | str | float] | None = None,
    text_pairs: Sequence[str] | None = None,
    target_speedup: float | None = None,
    max_drop: float | None = None,
    agreement: float | None = None,
    policy: str | None = None,
    batch_size: int = 64,
    progress: bool = False,
    confidence: float | None = None,
) -> tuple[OperatingPoint, dict]:
    """Measure every policy's trade-off on ``texts`` as ``engine`` runs (its model, precision
    and token pruning; one full-depth pass, every policy swept) and select the point that
    meets the target. The engine is not changed: :meth:`eeengine.Engine.calibrate` then runs
    the point.

    With ``labels`` points are scored by the checkpoint's metric: give ``target_speedup`` or
    ``max_drop``. Without labels they are scored by agreement with full depth on the same
    texts (:func:`eeengine.metrics.agreement`): the fastest point agreeing on at least
    ``agreement`` of them, or the most agreeing at ``target_speedup``.

    At a reduced precision (int8, bf16) with labels, the checkpoint's fp32 layers also run to
    full depth on the texts once (:func:`fp32_full_depth`), and ``max_drop`` is measured from
    that (the sweep's ``reference_full_depth``), so the drop includes the precision's own loss.

    Args:
        engine: the :class:`eeengine.Engine` to calibrate.
        executor: the engine's :class:`eeengine.executors.LayerExecutor` (what runs its layers,
            at its precision).
        texts, text_pairs: the inputs (``text_pairs`` None for single-sentence tasks).
        labels: class indices, label names or (regression) values, one per text; None to
            calibrate for agreement with full depth.
        target_speedup: the most accurate point with layer speed-up L / average exit layer
            >= this (>= 1).
        max_drop: the fastest point within this many metric points of full depth (>= 0;
            without labels, agreement percentage points; not with ``agreement``).
        agreement: without labels, the fraction of texts (0, 1] whose prediction must match
            full depth (default 0.99 when no target is given).
        policy: restrict the choice to this policy; None searches every policy that applies.
        batch_size: rows per full-depth forward pass.
        progress: show a progress bar.
        confidence: with ``max_drop`` (or ``agreement``), keep the drop within it at this
            confidence (:func:`eeengine.selection.choose_operating_point`).

    Returns:
        The chosen :class:`OperatingPoint` and the new sweep (the content of
        ``calibration.json``).

    Raises:
        TypeError / ValueError: bad texts or labels (index named), mismatched lengths, a
            target missing or given twice, a ``policy`` not swept for this model, or no point
            meets the target (the best reachable is named).
    """
    max_drop = check_calibration_args(
        texts, labels, text_pairs, target_speedup, max_drop, agreement
    )
    check_confidence(confidence, max_drop)
    values = None if labels is None else label_values(labels, engine.label_names)
    task = engine.manifest["task"]
    trade_off = measure_trade_off(
        engine.model,
        engine.tokenizer,
        texts,
        text_pairs,
        values,
        task["metric"],
        engine.max_length,
        task.get("metrics", [])[1:],
        engine.token_pruning,
        batch_size,
        progress,
        executor=executor,
    )
    if values is not None and engine.precision != "fp32":
        trade_off.sweep["reference_full_depth"] = fp32_full_depth(
            engine, texts, text_pairs, values, batch_size, progress
        )
    return trade_off.select(target_speedup, max_drop, policy, confidence), trade_off.sweep


def fp32_full_depth(
    engine: Engine,
    texts: Sequence[str],
    text_pairs: Sequence[str] | None,
    values: Sequence,
    batch_size: int = 64,
    progress: bool = False,
) -> float:
    """The checkpoint's metric at full depth with fp32 layers (its torch model, loaded again
    from ``engine.path``: a reduced-precision engine keeps no fp32 layers) on ``texts``: the
    ``reference_full_depth`` that a sweep measured at another precision picks ``max_drop``
    from (:func:`eeengine.selection.reference_full_depth`).

    Args:
        engine: the reduced-precision engine being calibrated.
        texts, text_pairs: the calibration inputs.
        values: their labels as class indices (or regression values).
    """
    model = load_checkpoint(engine.path).model.eval()
    logits, _ = all_exit_outputs(
        model, engine.tokenizer, texts, text_pairs, engine.max_length, batch_size, progress,
        engine.token_pruning,
    )  # fmt: skip
    return METRICS[engine.manifest["task"]["metric"]](predictions_of(logits[-1]), list(values))


def check_calibration_args(
    texts: Sequence[str],
    labels: Sequence | None,
    text_pairs: Sequence[str] | None,
    target_speedup: float | None,
    max_drop: float | None,
    agreement_fraction: float | None,
) -> float | None:
    """Check the arguments of :func:`calibrate_engine` before any work is done, and
    return the ``max_drop`` to select with (without labels: agreement points below full
    depth's 100 %, from ``agreement_fraction``, default 0.99, unless ``target_speedup`` is
    given).

    Raises:
        TypeError / ValueError: a text that is not a non-empty string (index named).
        ValueError: no texts, mismatched lengths, a target missing or given twice, or
            ``agreement_fraction`` with labels or out of (0, 1].
    """
    if text_pairs is not None and len(text_pairs) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(text_pairs)} text_pairs")
    if not texts:
        raise ValueError("calibration needs at least one text")
    normalize_inputs(
        list(texts) if text_pairs is None else list(zip(texts, text_pairs, strict=True))
    )
    if labels is not None:
        if agreement_fraction is not None:
            raise ValueError("agreement is the target of calibration without labels")
        if len(labels) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    elif agreement_fraction is not None or (target_speedup is None and max_drop is None):
        if max_drop is not None:
            raise ValueError("give max_drop or agreement, not both")
        max_drop = agreement_target(0.99 if agreement_fraction is None else agreement_fraction)
    check_target(target_speedup, max_drop)
    return max_drop


def agreement_target(agreement_fraction: float) -> float:
    """``max_drop`` (agreement points below full depth's 100 %) of an agreement fraction.

    Raises:
        ValueError: the fraction is not in (0, 1].
    """
    if not 0.0 < agreement_fraction <= 1.0:
        raise ValueError(f"agreement must be in (0, 1], got {agreement_fraction}")
    return 100.0 * (1.0 - agreement_fraction)


def select_operating_point(
    calibration: dict,
    target_speedup: float | None = None,
    max_drop: float | None = None,
    policy: str | None = None,
    confidence: float | None = None,
) -> OperatingPoint:
    """Pick a calibrated point by speed or by metric loss; exactly one of ``target_speedup``
    and ``max_drop``.

    Args:
        calibration: a :func:`eeengine.evaluation.sweep` result (``calibration.json``).
        target_speedup: the most accurate point with L / avg_exit_layer >= this (>= 1).
        max_drop: the fastest point within this many metric points of full depth (>= 0).
        policy: restrict to one policy; None searches every calibrated policy.
        confidence: with ``max_drop``, the drop must stay within it at this confidence, in
            (0, 1) (:func:`eeengine.selection.choose_operating_point`); None: as measured.

    Raises:
        ValueError: both or neither of ``target_speedup`` / ``max_drop``, a value out of range,
            ``confidence`` without ``max_drop`` or for a calibration without ``drop_std``,
            ``policy`` not in the calibration, or no point meets the target (the message gives
            the best reachable value).
    """
    check_target(target_speedup, max_drop)
    check_confidence(confidence, max_drop)
    if policy is not None and policy not in calibration["policies"]:
        raise ValueError(
            f"policy {policy!r} is not calibrated for this model; calibrated: "
            f"{', '.join(calibration['policies']) or 'none'}"
        )
    points = [OperatingPoint.from_sweep(n, p) for n, p in iter_points(calibration, policy)]
    if not points:
        raise ValueError("the calibration has no swept points")
    which = f"policy {policy!r}" if policy else "any policy"
    if target_speedup is not None:
        chosen = choose_for_speedup(calibration, target_speedup, policy)
        if chosen is None:
            fastest = min(points, key=lambda p: p.avg_exit_layer)
            raise ValueError(
                f"no calibrated point of {which} reaches a layer speed-up of "
                f"{target_speedup:g}x; the fastest is {fastest.speedup:.2f}x "
                f"({fastest.describe()})"
            )
        return OperatingPoint.from_sweep(*chosen)
    chosen = choose_operating_point(calibration, max_drop, policy, confidence)
    if chosen is None:
        best = max(points, key=lambda p: p.metric)
        reference = reference_full_depth(calibration)
        at = "" if confidence is None else f" at confidence {confidence:g}"
        loss = reference - best.metric
        # Only a confidence can refuse a point that beats full depth: too few rows to bound it.
        best_is = f"loses {loss:.2f}" if loss > 0 else f"scores {-loss:.2f} above full depth"
        raise ValueError(
            f"no calibrated point of {which} is within {max_drop:g} points of full depth "
            f"({calibration['metric']} {reference:.2f}){at}; the most accurate "
            f"{best_is} ({best.describe()})"
        )
    return OperatingPoint.from_sweep(*chosen)


def check_confidence(confidence: float | None, max_drop: float | None) -> None:
    """``confidence`` is None, or in (0, 1) together with a ``max_drop``.

    Raises:
        ValueError: otherwise.
    """
    if confidence is None:
        return
    checked_confidence(confidence)  # its range
    if max_drop is None:
        raise ValueError("confidence applies to max_drop (or agreement), not to target_speedup")


def check_target(target_speedup: float | None, max_drop: float | None) -> None:
    """Check an operating-point target before any work is done.

    Raises:
        ValueError: both or neither given, ``target_speedup`` < 1 (L / average exit layer
            cannot be), or ``max_drop`` < 0 metric points.
    """
    if (target_speedup is None) == (max_drop is None):
        raise ValueError("give exactly one of target_speedup and max_drop")
    if target_speedup is not None and not target_speedup >= 1.0:
        raise ValueError(
            f"target_speedup must be >= 1 (L / average exit layer), got {target_speedup}"
        )
    if max_drop is not None and not max_drop >= 0.0:
        raise ValueError(f"max_drop must be >= 0 metric points, got {max_drop}")


def label_values(
    labels: Sequence[int | str | float], label_names: Sequence[str] | None
) -> list[int] | list[float]:
    """Class indices (label names are looked up in ``label_names``) or, for regression
    (``label_names`` None), float values; checked one by one.

    Raises:
        TypeError: a regression label that is not a number (its index named).
        ValueError: a classification label that is neither a name nor an index in range.
    """
    if label_names is None:
        values = []
        for i, label in enumerate(labels):
            if isinstance(label, bool) or not isinstance(label, numbers.Real):
                raise TypeError(f"labels[{i}] must be a number (regression), got {label!r}")
            values.append(float(label))
        return values
    indices = []
    for i, label in enumerate(labels):
        if isinstance(label, str) and label in label_names:
            indices.append(list(label_names).index(label))
        elif (
            isinstance(label, numbers.Integral)
            and not isinstance(label, bool)
            and 0 <= label < len(label_names)
        ):
            indices.append(int(label))
        else:
            raise ValueError(
                f"labels[{i}] = {label!r} is neither a label name {list(label_names)} nor a "
                f"class index in [0, {len(label_names) - 1}]"
            )
    return indices
