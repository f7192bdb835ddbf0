"""Patient and confident early exit (PCEE-BERT, Zhang et al. 2022, Sec. 3, eq. 3)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from eeengine.policies.base import ExitPolicy, State, check_int, normalized_entropy
from eeengine.policy_codes import PolicyCode


class PceePolicy(ExitPolicy):
    """Exit when ``patience`` consecutive layers were confident.

    pct_0 = 0;  pct_l = pct_{l-1} + 1 if H(z_l)/log C < τ_l else 0;  exit at the first l with
    pct_l = t (the patience). With t = 1 this is :class:`NormalizedEntropyPolicy`.

    Args:
        threshold: τ in [0, 1] (normalized entropy), one or per layer.
        patience: t >= 1, number of consecutive confident layers.

    Raises:
        ValueError: a missing threshold or a bad patience.
    """

    name = "pcee"
    op_code = PolicyCode.PCEE
    op_state_keys = ("counter",)

    def __init__(self, threshold: float | Sequence[float] | None = None, patience: int = 2) -> None:
        super().__init__(threshold)
        self.patience = check_int(self.name, "patience", patience, 1)

    def init_state(self, batch_size: int, device: torch.device, num_labels: int) -> State:
        return {"counter": torch.zeros(batch_size, dtype=torch.long, device=device)}

    def step(self, logits: Tensor, layer: int, state: State) -> tuple[Tensor, State]:
        confident = normalized_entropy(logits) < self.threshold_at(layer)
        counter = torch.where(confident, state["counter"] + 1, 0)
        return counter >= self.patience, {"counter": counter}

    def op_params(self, layer: int) -> list[float]:
        return [self.threshold_at(layer), self.patience]

    def params(self) -> dict:
        return {"threshold": self.threshold, "patience": self.patience}
