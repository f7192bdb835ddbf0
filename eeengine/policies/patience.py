"""Patience-based early exit (PABEE, Zhou et al. 2020, "BERT loses patience"; described in
PCEE-BERT, Zhang et al. 2022, Sec. 2 and Table 1, and BERxiT, Xin et al. 2021, Sec. 2)."""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

import torch
from torch import Tensor

from eeengine.policies.base import ExitPolicy, State, check_int
from eeengine.policy_codes import PolicyCode


class PatiencePolicy(ExitPolicy):
    """Exit when the prediction stayed the same for ``patience`` consecutive layers.

    cnt_1 = 0 (layer 1 has no previous prediction to agree with);
    cnt_l = cnt_{l-1} + 1 if same(l, l-1) else 0 for l >= 2; exit at the first l with
    cnt_l = t. So the earliest exit is layer t + 1, which matches PABEE's numbers in
    PCEE-BERT's Table 1: t = 11 on a 12-layer BERT averages exactly 12 layers.

    same(l, l-1) is argmax z_l == argmax z_{l-1} (first index on ties) for classification,
    and |v_l - v_{l-1}| < δ_l (strict) for regression (num_labels == 1, v the single output).

    Args:
        threshold: δ >= 0 in the label's units, one or per layer; regression only.
        patience: t >= 1.

    Raises:
        ValueError: a bad patience; :meth:`validate` also raises for a regression model without
            δ and for a classification model given one.
    """

    name = "patience"
    op_code = PolicyCode.PATIENCE
    op_state_keys = ("counter", "previous")
    needs_threshold = False
    supports_regression = True

    def __init__(self, threshold: float | Sequence[float] | None = None, patience: int = 2) -> None:
        super().__init__(threshold)
        self.patience = check_int(self.name, "patience", patience, 1)

    def threshold_range(self, num_labels: int) -> tuple[float, float]:
        return (0.0, math.inf)

    def validate(self, num_labels: int, num_layers: int, signals: Collection[str] = ()) -> None:
        if num_labels == 1 and self.threshold is None:
            raise ValueError(
                "policy 'patience' on a regression model needs threshold δ: two layers agree "
                "when their outputs differ by less than δ"
            )
        if num_labels > 1 and self.threshold is not None:
            raise ValueError(
                "policy 'patience' takes a threshold only for regression (num_labels == 1); "
                "for classification two layers agree when their argmax is the same"
            )
        super().validate(num_labels, num_layers, signals)

    def init_state(self, batch_size: int, device: torch.device, num_labels: int) -> State:
        """``previous``: the argmax (int64, -1: none yet) or, for regression, the value
        (float32) of the layer before; read from layer 2 on."""
        previous_dtype = torch.float32 if num_labels == 1 else torch.long
        return {
            "counter": torch.zeros(batch_size, dtype=torch.long, device=device),
            "previous": torch.full((batch_size,), -1, dtype=previous_dtype, device=device),
        }

    def step(self, logits: Tensor, layer: int, state: State) -> tuple[Tensor, State]:
        if logits.shape[-1] == 1:
            current = logits[:, 0].float()
        else:
            current = logits.argmax(-1)
        if layer == 1:
            same = torch.zeros(current.shape, dtype=torch.bool, device=current.device)
        elif logits.shape[-1] == 1:
            same = (current - state["previous"]).abs() < self.threshold_at(layer)
        else:
            same = current == state["previous"]
        counter = torch.where(same, state["counter"] + 1, 0)
        return counter >= self.patience, {"counter": counter, "previous": current}

    def op_params(self, layer: int) -> list[float]:
        """[patience, δ_l]; δ is read only on a regression head (0 for classification)."""
        return [self.patience, 0.0 if self.threshold is None else self.threshold_at(layer)]

    def params(self) -> dict:
        return {"threshold": self.threshold, "patience": self.patience}
