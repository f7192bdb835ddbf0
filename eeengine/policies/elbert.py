"""Confidence-window exit (ELBERT, Xie et al. 2021, Sec. 3.3, eq. 5)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from eeengine.policies.base import (
    ExitPolicy,
    State,
    check_int,
    check_real,
    normalized_entropy,
    probabilities,
)
from eeengine.policy_codes import PolicyCode, WindowTest

WINDOW_TESTS = tuple(test.name.lower() for test in WindowTest)  # "monotonic", "stable", "range"


class ElbertPolicy(ExitPolicy):
    """Two-stage exit: a confident layer, else a steady window of the last N layers.

    Stage 1: exit at layer l if H(p_l) / log C < τ_l (ELBERT's Puzzlement < δ, eq. 5).
    Stage 2, only when stage 1 does not fire and l >= N: with ĉ = argmax z_l (the current
    prediction, first index on ties) and q_k = p_k(ĉ) for k in the window W = l-N+1 … l, exit
    if the chosen window test passes:

    - ``"monotonic"`` (default; the criterion ELBERT found best and uses by default):
      q_k >= q_{k-1} for every k in W after the first (confidence in ĉ never falls);
    - ``"stable"``: argmax z_k = ĉ for every k in W (the label stayed the same);
    - ``"range"``: max_W q_k - min_W q_k <= r.

    ELBERT states the tests for a binary task on p(class 0) ("the prediction probability of a
    certain class varies monotonically", "the range of max(p_i) is less than a set value");
    they are generalized here to the probability of the currently predicted class, so they
    work for C > 2. Only one test is on at a time, as in the paper.

    Args:
        threshold: τ in [0, 1] (normalized entropy), one or per layer.
        window: N >= 2, the number of layers in the window (the current one included); the
            paper uses 8 on 24 layers, about 2 suits 6 layers.
        window_test: one of ``WINDOW_TESTS``.
        window_range: r in [0, 1], a probability; required by, and only taken with, ``"range"``.

    Raises:
        ValueError: a missing threshold, N < 2, an unknown window test, or r missing for
            ``"range"``, given for another test, or outside [0, 1].
    """

    name = "elbert"
    op_code = PolicyCode.ELBERT
    op_state_keys = ("window",)

    def __init__(
        self,
        threshold: float | Sequence[float] | None = None,
        window: int = 2,
        window_test: str = "monotonic",
        window_range: float | None = None,
    ) -> None:
        super().__init__(threshold)
        self.window = check_int(self.name, "window", window, 2)
        if window_test not in WINDOW_TESTS:
            raise ValueError(
                f"policy 'elbert': window_test must be one of {', '.join(WINDOW_TESTS)}, "
                f"got {window_test!r}"
            )
        self.window_test = window_test
        if (window_range is None) != (window_test != "range"):
            raise ValueError(
                "policy 'elbert': window_range (r) is required with window_test='range' "
                "and taken only with it"
            )
        if window_range is not None:
            window_range = check_real(self.name, "window_range", window_range, 0.0, 1.0)
        self.window_range = window_range

    def init_state(self, batch_size: int, device: torch.device, num_labels: int) -> State:
        if self.window_test == "stable":
            return {"window": torch.zeros(batch_size, self.window, dtype=torch.long, device=device)}
        return {"window": torch.zeros(batch_size, self.window, num_labels, device=device)}

    def step(self, logits: Tensor, layer: int, state: State) -> tuple[Tensor, State]:
        """``state["window"]``: the last N layers of each row, oldest first: (batch_size, N)
        int64 predicted labels for ``"stable"``, else (batch_size, N, num_labels) float32
        probabilities. Before layer N its first entries repeat layer 1 (never tested)."""
        labels = logits.argmax(-1)
        if self.window_test == "stable":
            window = self._push(state, layer, labels)
            # Every entry equals the newest (this layer's label): min == max, three ops (the
            # row graph's traced step; `(window == labels).all(1)` exports as six).
            steady = window.amin(1) == window.amax(1)
        else:
            window = self._push(state, layer, probabilities(logits))
            index = labels[:, None, None].expand(-1, self.window, 1)
            q = window.gather(2, index).squeeze(2)  # (batch_size, N)
            if self.window_test == "monotonic":
                steady = (q[:, 1:] >= q[:, :-1]).all(1)
            else:
                steady = q.amax(1) - q.amin(1) <= self.window_range
        confident = normalized_entropy(logits) < self.threshold_at(layer)
        if layer < self.window:  # a tensor test, not `& bool`: the step traces to ONNX
            return confident, {"window": window}
        return confident | steady, {"window": window}

    def _push(self, state: State, layer: int, current: Tensor) -> Tensor:
        """Append ``current`` (batch_size, ...) to the window, dropping its oldest entry."""
        if layer == 1:
            repeats = (1, self.window) + (1,) * (current.dim() - 1)
            return current.unsqueeze(1).repeat(repeats)
        return torch.cat([state["window"][:, 1:], current.unsqueeze(1)], dim=1)

    def op_params(self, layer: int) -> list[float]:
        """[τ_l, N, window test code, r (0 unless "range")]."""
        test = WindowTest[self.window_test.upper()]
        return [self.threshold_at(layer), self.window, test, self.window_range or 0.0]

    def params(self) -> dict:
        return {
            "threshold": self.threshold,
            "window": self.window,
            "window_test": self.window_test,
            "window_range": self.window_range,
        }
