"""Normalized-entropy exit (FastBERT, Liu et al. 2020; the first stage of ELBERT)."""

from __future__ import annotations

from torch import Tensor

from eeengine.policies.base import ExitPolicy, State, normalized_entropy
from eeengine.policy_codes import PolicyCode


class NormalizedEntropyPolicy(ExitPolicy):
    """Exit at layer l if H(softmax(z_l)) / log C < τ_l, τ in [0, 1]."""

    name = "normalized_entropy"
    op_code = PolicyCode.NORMALIZED_ENTROPY

    def step(self, logits: Tensor, layer: int, state: State) -> tuple[Tensor, State]:
        return normalized_entropy(logits) < self.threshold_at(layer), state
