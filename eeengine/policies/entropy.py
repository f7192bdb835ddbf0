"""Raw-entropy exit (DeeBERT, Xin et al. 2020; BERxiT, Xin et al. 2021, Sec. 3.3)."""

from __future__ import annotations

import math

from torch import Tensor

from eeengine.policies.base import ExitPolicy, State, entropy
from eeengine.policy_codes import PolicyCode


class EntropyPolicy(ExitPolicy):
    """Exit at layer l if H(softmax(z_l)) < τ_l, with H in nats.

    τ lies in [0, log C]; it does not transfer to :class:`NormalizedEntropyPolicy`.
    """

    name = "entropy"
    op_code = PolicyCode.ENTROPY

    def threshold_range(self, num_labels: int) -> tuple[float, float]:
        return (0.0, math.log(max(num_labels, 2)))

    def step(self, logits: Tensor, layer: int, state: State) -> tuple[Tensor, State]:
        return entropy(logits) < self.threshold_at(layer), state
