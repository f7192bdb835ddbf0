"""Full depth: no early exit (the baseline every speed-up is measured against)."""

from __future__ import annotations

import torch
from torch import Tensor

from eeengine.policies.base import ExitPolicy, State
from eeengine.policy_codes import PolicyCode


class NoExitPolicy(ExitPolicy):
    """Never exit before the last layer."""

    name = "none"
    needs_threshold = False
    supports_regression = True
    op_code = PolicyCode.NONE

    def step(self, logits: Tensor, layer: int, state: State) -> tuple[Tensor, State]:
        return torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device), state

    def decides_at(self, layer: int, num_layers: int) -> bool:
        return layer == num_layers

    def op_params(self, layer: int) -> list[float]:
        return []

    def params(self) -> dict:
        return {}
