"""Budgeted exit: every row stops at the same fixed layer (the layer-wise baseline of BERxiT,
Xin et al. 2021, Sec. 5.4: "use the first (100 - x)% layers for every sample")."""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import Tensor

from eeengine.policies.base import ExitPolicy, State, check_int
from eeengine.policy_codes import PolicyCode


class BudgetPolicy(ExitPolicy):
    """Exit at layer k for every row: exit_l = (l == k). k = num_layers is full depth.

    Args:
        layer: k, the 1-based exit layer (1 <= k <= num_layers, checked by :meth:`validate`).

    Raises:
        ValueError: ``layer`` is missing or not an integer >= 1; :meth:`validate` also raises
            when k exceeds the model's depth.
    """

    name = "budget"
    op_code = PolicyCode.BUDGET
    needs_threshold = False
    supports_regression = True

    def __init__(self, layer: int | None = None) -> None:
        super().__init__(None)
        if layer is None:
            raise ValueError("policy 'budget' needs layer (the 1-based layer every row exits at)")
        self.layer = check_int(self.name, "layer", layer, 1)

    def validate(self, num_labels: int, num_layers: int, signals: Collection[str] = ()) -> None:
        super().validate(num_labels, num_layers, signals)
        if self.layer > num_layers:
            raise ValueError(
                f"policy 'budget': layer {self.layer} is out of range [1, {num_layers}]"
            )

    def step(self, logits: Tensor, layer: int, state: State) -> tuple[Tensor, State]:
        # ones/zeros, not full(.., bool): the step traces to ONNX (eeengine.executors.row_graph)
        make = torch.ones if layer >= self.layer else torch.zeros
        return make(logits.shape[0], dtype=torch.bool, device=logits.device), state

    def decides_at(self, layer: int, num_layers: int) -> bool:
        return layer >= min(self.layer, num_layers)

    def op_params(self, layer: int) -> list[float]:
        return [self.layer]

    def params(self) -> dict:
        return {"layer": self.layer}
