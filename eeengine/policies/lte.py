"""Learning-to-exit (BERxiT, Xin et al. 2021, Sec. 4.2, eqs. 8-11)."""

from __future__ import annotations

from torch import Tensor

from eeengine.policies.base import ExitPolicy, State
from eeengine.policy_codes import PolicyCode


class LtePolicy(ExitPolicy):
    """Exit at layer l if s_l < τ_l, where s_l is the LTE module's score for the row.

    The LTE module is one linear layer shared by all layers on the pooled hidden state:
    s_l = sigmoid(c^T h_l + b), trained by MSE towards 1 - correct_l (classification) or
    tanh(|pred_l - y|) (regression), so s predicts "not yet correct". BERxiT writes the same
    module as the certainty u = 1 - s and exits when u > 1 - τ; the two are equivalent. Works
    for classification and regression alike; the logits are not looked at.

    The score is not in the logits: the runtime computes it and passes it to :meth:`step` as
    the keyword ``lte_score`` (see :attr:`needs`), and :meth:`validate` refuses a model that
    does not provide it.

    Args:
        threshold: τ in [0, 1], one or per layer.

    Raises:
        ValueError: ``threshold`` is missing; :meth:`validate` also raises for a checkpoint
            without an LTE module.
    """

    name = "lte"
    op_code = PolicyCode.LTE  # the op takes lte_score as an input
    supports_regression = True
    needs = ("lte_score",)

    def step(
        self, logits: Tensor, layer: int, state: State, lte_score: Tensor | None = None
    ) -> tuple[Tensor, State]:
        """Args:
            logits: (batch_size, num_labels), unused.
            layer: 1-based layer index.
            state: unused (the policy is stateless).
            lte_score: (batch_size,) float, s_l in [0, 1].

        Returns:
            exit_mask: (batch_size,) bool, s_l < τ_l.
            state: unchanged.

        Raises:
            ValueError: ``lte_score`` is not given.
        """
        if lte_score is None:
            raise ValueError("policy 'lte' needs the LTE module's score: step(..., lte_score=s)")
        return lte_score.float() < self.threshold_at(layer), state
