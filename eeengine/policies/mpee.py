"""Layer-wise exit with recycling classifier memory (MPEE, Kong et al. 2022, Sec. 3.2, eq. 10)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from eeengine.policies.base import State, check_real, entropy
from eeengine.policies.entropy import EntropyPolicy
from eeengine.policy_codes import PolicyCode


class MpeePolicy(EntropyPolicy):
    """Exit at layer l if H(softmax(m_l)) < τ_l (nats), m_l being the classifier memory.

    m_1 = z_1;  m_l = (1 - λ)·m_{l-1} + λ·z_l for l >= 2 (z_l the exit head's logits, λ = 0.9
    as found by MPEE's grid search). The paper leaves m_0 undefined; m_1 = z_1 is what MPEE's
    released code does. A row exits with m_l as its logits (:meth:`output_logits`), at the
    last layer too: MPEE predicts softmax(C_zm^l) and trains every exit on it (eq. 11).

    τ is raw entropy in nats, in [0, log C], like :class:`EntropyPolicy`. λ = 1 is that policy.

    Args:
        threshold: τ in nats, one or per layer.
        memory_weight: λ in (0, 1], the weight of the current layer's logits.

    Raises:
        ValueError: a missing threshold or λ outside (0, 1].
    """

    name = "mpee"
    op_code = PolicyCode.MPEE
    op_state_keys = ("memory",)

    def __init__(
        self, threshold: float | Sequence[float] | None = None, memory_weight: float = 0.9
    ) -> None:
        super().__init__(threshold)
        self.memory_weight = check_real(
            self.name, "memory_weight", memory_weight, 0.0, 1.0, include_low=False
        )

    def init_state(self, batch_size: int, device: torch.device, num_labels: int) -> State:
        return {"memory": torch.zeros(batch_size, num_labels, device=device)}

    def step(self, logits: Tensor, layer: int, state: State) -> tuple[Tensor, State]:
        """``state["memory"]``: (batch_size, num_labels) float32, m_l after this step."""
        logits = logits.float()
        if layer == 1:
            memory = logits
        else:
            memory = (1.0 - self.memory_weight) * state["memory"] + self.memory_weight * logits
        return entropy(memory) < self.threshold_at(layer), {"memory": memory}

    def output_logits(self, logits: Tensor, state: State) -> Tensor:
        return state["memory"]

    def op_params(self, layer: int) -> list[float]:
        return [self.threshold_at(layer), self.memory_weight]

    def params(self) -> dict:
        return {"threshold": self.threshold, "memory_weight": self.memory_weight}
