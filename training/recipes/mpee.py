"""The ``mpee`` recipe: weighted ensemble self-distillation (MPEE, Kong et al. 2022, Sec. 3.3,
eqs. 12-14).

A teacher is built from all exits by attention over them,

    η_l = softmax_l( v · tanh(W_η z_l + b_η) ),     t = Σ_l η_l z_l

with z_l the logits of exit l, and every exit learns from the labels and from the teacher:

    L_total = Σ_l (1 − γ)·CE(z_l, y) + Σ_l γ·T²·KL(softmax(z_l/T) ‖ softmax(t/T)) + γ·CE(t, y)

γ = 0.1, T = 3. The KL term is written as in MPEE's eq. 13 (student first); the teacher is a
constant in it (``t.detach()``), so the attention (W_η, b_η, v: the recipe's own parameters,
trained at the exit heads' learning rate) learns from γ·CE(t, y) alone and the students are
pulled towards the teacher, not the reverse. The exits here are the plain logits z_l; the
classifier memory of MPEE's eq. 10 is an inference-time rule (the ``mpee`` policy).
Classification only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eeengine.training.recipes.base import Recipe


class MpeeRecipe(Recipe):
    """Args: see :class:`Recipe`; ``gamma`` γ, ``temperature`` T, ``attention_size`` the width
    of W_η.

    Raises:
        ValueError: a regression task (num_labels == 1).
    """

    name = "mpee"

    def __init__(
        self,
        num_layers: int,
        num_labels: int,
        layout: str,
        gamma: float = 0.1,
        temperature: float = 3.0,
        attention_size: int = 32,
    ) -> None:
        super().__init__(num_layers, num_labels, layout)
        if num_labels == 1:
            raise ValueError("recipe 'mpee' distils class distributions: classification only")
        self.gamma = gamma
        self.temperature = temperature
        self.attention = nn.Linear(num_labels, attention_size)  # W_η, b_η
        self.context = nn.Linear(attention_size, 1, bias=False)  # v

    def teacher(self, all_logits: Tensor) -> Tensor:
        """t = Σ_l η_l z_l: (num_layers, batch_size, num_labels) -> (batch_size, num_labels)."""
        logits = all_logits.float()
        scores = self.context(torch.tanh(self.attention(logits)))  # (L, B, 1)
        return (torch.softmax(scores, dim=0) * logits).sum(0)

    def loss(
        self, step: int, stage: int, all_logits: Tensor, labels: Tensor, signals: dict[str, Tensor]
    ) -> Tensor:
        """The MPEE loss above; a scalar float32 tensor."""
        gamma, temperature = self.gamma, self.temperature
        teacher = self.teacher(all_logits)
        log_students = F.log_softmax(all_logits.float() / temperature, dim=-1)
        log_teacher = F.log_softmax(teacher.detach() / temperature, dim=-1)
        # KL(p_l ‖ p_t) = Σ_c p_l (log p_l − log p_t), per row, summed over exits.
        kl = (log_students.exp() * (log_students - log_teacher)).sum(-1).mean(-1).sum()
        return (
            (1 - gamma) * self.exit_losses(all_logits, labels).sum()
            + gamma * temperature**2 * kl
            + gamma * F.cross_entropy(teacher, labels, label_smoothing=self.label_smoothing)
        )

    def hyperparameters(self) -> dict:
        return {
            "gamma": self.gamma,
            "temperature": self.temperature,
            "attention_size": self.attention.out_features,
        }
