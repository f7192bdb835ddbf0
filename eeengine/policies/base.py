"""What every exit policy shares: the state-machine interface, entropy, thresholds.

A policy is a batched, per-sample state machine. At layer l (1-based) it receives the exit
head's logits of the rows still running and returns which of them exit now:

    exit_mask, state = policy.step(logits_l, l, state)

``state`` is a dict of tensors whose first dimension is the batch, so the runtime can drop
exited rows from it with one index (``{k: v[keep]}``). A row that reaches the last layer always
exits there; the runtime enforces that, not the policy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

State = dict[str, Tensor]


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


class ExitPolicy:
    """Base class. Subclasses set ``name`` and implement :meth:`step`.

    Args:
        threshold: one threshold τ, or one per layer (a sequence of num_layers floats).
    """

    name: str = ""
    needs_threshold: bool = True
    # The fused op eeengine._custom_ops.exit_head_step implements policies with an op_code
    # (a PolicyCode); it takes op_params(layer) and the state tensors op_state_keys, in order.
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

    def validate(self, num_labels: int, num_layers: int) -> None:
        """Check the parameters against the model.

        Raises:
            ValueError: a threshold out of range, or a per-layer list of the wrong length.
        """
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

    def init_state(self, batch_size: int, device: torch.device) -> State:
        """The state before layer 1 for ``batch_size`` rows."""
        return {}

    def step(self, logits: Tensor, layer: int, state: State) -> tuple[Tensor, State]:
        """Decide which rows exit after ``layer``.

        Args:
            logits: (batch_size, num_labels) exit-head logits of the live rows.
            layer: 1-based layer index.
            state: from :meth:`init_state` or the previous step, rows aligned with ``logits``.

        Returns:
            exit_mask: (batch_size,) bool, True for rows that exit at this layer.
            state: the updated state.
        """
        raise NotImplementedError

    def op_params(self, layer: int) -> list[float]:
        """The ``params`` of the fused op at 1-based ``layer`` (see ``PolicyCode``)."""
        return [self.threshold_at(layer)]

    def params(self) -> dict:
        """The policy's parameters as stored in ``eeengine.json``."""
        return {"threshold": self.threshold}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


def run_policy(policy: ExitPolicy, all_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Apply a policy to precomputed logits of every layer, without dropping rows.

    This is the definition of a policy's outcome, used for calibration sweeps and as the
    reference the runtime loop is tested against.

    Args:
        all_logits: (num_layers, batch_size, num_labels).

    Returns:
        exit_layer: (batch_size,) int64, 1-based layer at which each row exits.
        logits: (batch_size, num_labels), the logits of that layer.
    """
    num_layers, batch_size, _ = all_logits.shape
    state = policy.init_state(batch_size, all_logits.device)
    exit_layer = torch.full((batch_size,), num_layers, dtype=torch.long, device=all_logits.device)
    done = torch.zeros(batch_size, dtype=torch.bool, device=all_logits.device)
    for layer in range(1, num_layers):
        exit_mask, state = policy.step(all_logits[layer - 1], layer, state)
        newly = exit_mask & ~done
        exit_layer[newly] = layer
        done |= exit_mask
    logits = all_logits[exit_layer - 1, torch.arange(batch_size, device=all_logits.device)]
    return exit_layer, logits
