"""Maximum-probability exit (Shallow-Deep Nets, Kaya et al. 2019; Right Tool, Schwartz et al.
2020; BERxiT, Xin et al. 2021, Sec. 4.1 "confidence threshold")."""

from __future__ import annotations

from torch import Tensor

from eeengine.policies.base import ExitPolicy, State, probabilities
from eeengine.policy_codes import PolicyCode


class MaxProbPolicy(ExitPolicy):
    """Exit at layer l if max_c softmax(z_l)_c >= τ_l.

    Unlike the entropy policies the comparison is not strict (``>=``), and a higher τ exits
    later. τ lies in [0, 1]; any τ <= 1/C exits every row at layer 1.

    Args:
        threshold: τ in [0, 1] (a probability), one or per layer.

    Raises:
        ValueError: ``threshold`` is missing.
    """

    name = "max_prob"
    op_code = PolicyCode.MAX_PROB

    def step(self, logits: Tensor, layer: int, state: State) -> tuple[Tensor, State]:
        return probabilities(logits).amax(-1) >= self.threshold_at(layer), state
