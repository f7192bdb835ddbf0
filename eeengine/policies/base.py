"""What every exit policy shares: the state-machine interface, signals, thresholds.

A policy is a batched, per-sample state machine. At layer l (1-based) it receives the exit
head's logits of the rows still running and returns which of them exit now:

    exit_mask, state = policy.step(logits_l, l, state, **signals_l)

``state`` is a dict of tensors whose first dimension is the batch, so the runtime can drop
exited rows from it with one index (``{k: v[keep]}``). ``signals_l`` holds the extra per-layer
inputs the policy names in :attr:`ExitPolicy.needs` (for example ``lte_score`` for ``lte``),
rows aligned with ``logits_l``; policies that need none take no keywords.

``step`` is called at every layer, the last one included: a row that reaches the last layer
always exits there (the runtime enforces that, not the policy, and ignores the mask), but the
state update still matters to policies whose output depends on it. The logits a row exits
with are :meth:`ExitPolicy.output_logits` of the layer it exits at: the exit head's logits
for every policy except ``mpee``, whose output is its classifier memory.

Signals are computed in fp32 and compared with thresholds in fp32 (a Python float threshold is
rounded to fp32 by the comparison); a fused op must do the same to take the same exits.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence

import torch
from torch import Tensor

State = dict[str, Tensor]

# Where each extra per-layer signal comes from, for the error raised when a model lacks it.
SIGNAL_SOURCES = {
    "lte_score": "a checkpoint trained with the LTE module (BERxiT learning-to-exit, "
    "training recipe 'lte')",
}


def entropy(logits: Tensor) -> Tensor:
    """Shannon entropy of softmax(logits) in nats, computed in fp32.

    Args:
        logits: (batch_size, num_labels), any float dtype.

    Returns:
        (batch_size,) float32, in [0, log num_labels].
    """
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1)


def normalized_entropy(logits: Tensor) -> Tensor:
    """Entropy divided by log C (FastBERT's uncertainty), in [0, 1]; (batch_size,) float32."""
    return entropy(logits) / math.log(logits.shape[-1])


def probabilities(logits: Tensor) -> Tensor:
    """softmax(logits) in fp32: (batch_size, num_labels) -> (batch_size, num_labels) float32."""
    return torch.softmax(logits.float(), dim=-1)


def check_int(policy: str, name: str, value: object, low: int) -> int:
    """Return ``value`` if it is an int (not a bool) >= ``low``.

    Raises:
        ValueError: naming the policy and the parameter.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"policy {policy!r}: {name} must be an integer >= {low}, got {value!r}")
    return value


def check_real(
    policy: str, name: str, value: object, low: float, high: float, include_low: bool = True
) -> float:
    """Return ``value`` as a float if it is a real number in [low, high] (or (low, high] when
    ``include_low`` is False).

    Raises:
        ValueError: naming the policy and the parameter.
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (low <= value if include_low else low < value) and value <= high
    if not ok:
        interval = f"{'[' if include_low else '('}{low:.4g}, {high:.4g}]"
        raise ValueError(f"policy {policy!r}: {name} must be a number in {interval}, got {value!r}")
    return float(value)


class ExitPolicy:
    """Base class. Subclasses set ``name`` and implement :meth:`step`.

    Class attributes:
        name: the registry name (``eeengine.json`` field ``policy.name``).
        needs_threshold: the constructor requires ``threshold``.
        supports_regression: the policy works on a regression head (num_labels == 1).
        needs: extra per-layer signals :meth:`step` takes as keywords, each (batch_size,)
            (keys of :data:`SIGNAL_SOURCES`).

    Args:
        threshold: one threshold τ, or one per layer (a sequence of num_layers floats).

    Raises:
        ValueError: ``threshold`` is missing for a policy that needs one.
    """

    name: str = ""
    needs_threshold: bool = True
    supports_regression: bool = False
    needs: tuple[str, ...] = ()
    # The fused op eeengine._custom_ops.exit_head_step implements policies with an op_code
    # (an eeengine.policy_codes.PolicyCode); it takes op_params(layer) and the state tensors
    # op_state_keys, in order, and updates them in place.
    op_code: int | None = None
    op_state_keys: tuple[str, ...] = ()

    def __init__(self, threshold: float | Sequence[float] | None = None) -> None:
        if self.needs_threshold and threshold is None:
            raise ValueError(f"policy {self.name!r} needs a threshold")
        if isinstance(threshold, (int, float)):
            threshold = float(threshold)
        elif threshold is not None:
            threshold = [float(t) for t in threshold]
        self.threshold = threshold

    def threshold_range(self, num_labels: int) -> tuple[float, float]:
        """The closed interval a threshold must lie in for ``num_labels`` classes."""
        return (0.0, 1.0)

    def validate(self, num_labels: int, num_layers: int, signals: Collection[str] = ()) -> None:
        """Check the parameters against the model.

        Args:
            num_labels: classes of the exit heads; 1 for a regression head.
            num_layers: encoder layers (= exits).
            signals: the extra per-layer signals the model provides besides the logits, e.g.
                ``("lte_score",)`` for a checkpoint with an LTE module.

        Raises:
            ValueError: a signal the policy needs is missing, a classification-only policy on a
                regression head, a threshold out of range, or a per-layer list of the wrong
                length.
        """
        for signal in self.needs:
            if signal not in signals:
                raise ValueError(
                    f"policy {self.name!r} needs {SIGNAL_SOURCES[signal]}; this model has none"
                )
        if num_labels == 1 and not self.supports_regression:
            raise ValueError(
                f"policy {self.name!r} needs class probabilities and this model is a regression "
                "model (num_labels == 1); use 'patience', 'lte', 'budget' or 'none'"
            )
        if self.threshold is None:
            return
        thresholds = self.threshold if isinstance(self.threshold, list) else [self.threshold]
        if isinstance(self.threshold, list) and len(thresholds) != num_layers:
            raise ValueError(
                f"policy {self.name!r}: {len(thresholds)} per-layer thresholds given, "
                f"the model has {num_layers} layers"
            )
        low, high = self.threshold_range(num_labels)
        for t in thresholds:
            if not low <= t <= high:
                raise ValueError(
                    f"policy {self.name!r}: threshold {t} is out of range [{low:.4g}, {high:.4g}]"
                )

    def threshold_at(self, layer: int) -> float:
        """τ_l for 1-based layer l."""
        if isinstance(self.threshold, list):
            return self.threshold[layer - 1]
        return self.threshold

    def decides_at(self, layer: int, num_layers: int) -> bool:
        """Whether :meth:`step` at 1-based ``layer`` needs the exit head: False only where its
        outcome is known without logits (no row exits and the state does not change), so the
        early-exit loop skips the head there. Every logit-driven policy: True everywhere."""
        return True

    def init_state(self, batch_size: int, device: torch.device, num_labels: int) -> State:
        """The state before layer 1 for ``batch_size`` rows of a ``num_labels``-class head: every
        tensor the fused op updates (:attr:`op_state_keys`), allocated."""
        return {}

    def step(
        self, logits: Tensor, layer: int, state: State, **signals: Tensor
    ) -> tuple[Tensor, State]:
        """Decide which rows exit after ``layer``.

        Args:
            logits: (batch_size, num_labels) exit-head logits of the live rows.
            layer: 1-based layer index.
            state: from :meth:`init_state` or the previous step, rows aligned with ``logits``.
            **signals: the signals named in :attr:`needs`, each (batch_size,).

        Returns:
            exit_mask: (batch_size,) bool, True for rows that exit at this layer.
            state: the updated state.
        """
        raise NotImplementedError

    def output_logits(self, logits: Tensor, state: State) -> Tensor:
        """The logits a row exits with, given this layer's logits and the state :meth:`step`
        returned for it: (batch_size, num_labels). The exit head's logits unless overridden."""
        return logits

    def op_params(self, layer: int) -> list[float]:
        """The ``params`` of the fused op at 1-based ``layer`` (see ``PolicyCode``)."""
        return [self.threshold_at(layer)]

    def params(self) -> dict:
        """The policy's parameters as stored in ``eeengine.json``."""
        return {"threshold": self.threshold}

    def key(self) -> tuple:
        """What its exits depend on, for caches of loops and graphs made for a policy: its
        class and :meth:`params`, compared with ``==`` (a policy changed in place gets a new
        key). Cheaper than ``repr``: 10 us at batch 1 right after a forward pass, asked twice
        per call."""
        return (type(self), self.params())

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


def run_policy(
    policy: ExitPolicy, all_logits: Tensor, signals: Mapping[str, Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """Apply a policy to precomputed logits of every layer, without dropping rows.

    This is the definition of a policy's outcome, used for calibration sweeps and as the
    reference the runtime loop is tested against.

    Args:
        all_logits: (num_layers, batch_size, num_labels).
        signals: the signals the policy needs (:attr:`ExitPolicy.needs`), each
            (num_layers, batch_size).

    Returns:
        exit_layer: (batch_size,) int64, 1-based layer at which each row exits.
        logits: (batch_size, num_labels) float32, :meth:`ExitPolicy.output_logits` at that layer.

    Raises:
        ValueError: a signal the policy needs is not in ``signals``.
    """
    signals = signals or {}
    missing = [name for name in policy.needs if name not in signals]
    if missing:
        raise ValueError(f"policy {policy.name!r} needs signal(s) {', '.join(missing)}")
    num_layers, batch_size, num_labels = all_logits.shape
    device = all_logits.device
    state = policy.init_state(batch_size, device, num_labels)
    exit_layer = torch.full((batch_size,), num_layers, dtype=torch.long, device=device)
    out = torch.empty(batch_size, num_labels, dtype=torch.float32, device=device)
    done = torch.zeros(batch_size, dtype=torch.bool, device=device)
    for layer in range(1, num_layers + 1):
        logits = all_logits[layer - 1]
        layer_signals = {name: signals[name][layer - 1] for name in policy.needs}
        exit_mask, state = policy.step(logits, layer, state, **layer_signals)
        if layer == num_layers:
            exit_mask = torch.ones_like(exit_mask)
        newly = exit_mask & ~done
        exit_layer[newly] = layer
        out[newly] = policy.output_logits(logits, state)[newly].float()
        done |= exit_mask
    return exit_layer, out
