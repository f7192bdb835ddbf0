"""The exit policies of the fused op ``exit_head_step``: codes, parameter and state layouts.

The C++ op and the CUDA kernel read the same table from ``EEENGINE_EXIT_POLICIES`` in
``csrc/exit_policy.h``; Python and the Triton kernel read it from here; tests/test_policy_codes.py
checks that the two agree. Per policy (B live rows, C classes, τ this layer's threshold):

========================  ===========================  ==========================================
code                      params                       state
========================  ===========================  ==========================================
NONE                      []                           []
ENTROPY                   [τ] (nats)                   []
NORMALIZED_ENTROPY        [τ]                          []
MAX_PROB                  [τ]                          []
PATIENCE                  [patience, δ]                [counter int64 (B,), previous (B,)]: the
                                                       int64 argmax (C >= 2; δ unused) or the
                                                       float32 value (C == 1, regression)
PCEE                      [τ, patience]                [counter int64 (B,)]
BUDGET                    [k]                          []
ELBERT                    [τ, N, window test, r]       [window]: int64 (B, N) labels for
                                                       STABLE, else float32 (B, N, C)
                                                       probabilities; oldest first
LTE                       [τ]                          []; the op takes ``lte_score`` (B,)
MPEE                      [τ, λ]                       [memory float32 (B, C)]
========================  ===========================  ==========================================
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


class PolicyCode(enum.IntEnum):
    """Exit policy codes of ``exit_head_step`` (``PolicyCode`` in csrc/exit_policy.h)."""

    NONE = 0
    ENTROPY = 1
    NORMALIZED_ENTROPY = 2
    MAX_PROB = 3
    PATIENCE = 4
    PCEE = 5
    BUDGET = 6
    ELBERT = 7
    LTE = 8
    MPEE = 9

    @property
    def num_params(self) -> int:
        """Length of ``params`` the op takes for this policy."""
        return POLICY_LAYOUTS[self][0]

    @property
    def num_state(self) -> int:
        """Number of ``state`` tensors the op takes for this policy."""
        return POLICY_LAYOUTS[self][1]


class WindowTest(enum.IntEnum):
    """ELBERT's window tests (``WindowTest`` in csrc/exit_policy.h); see
    :class:`eeengine.policies.elbert.ElbertPolicy`."""

    MONOTONIC = 0
    STABLE = 1
    RANGE = 2


# (number of params, number of state tensors) per policy.
POLICY_LAYOUTS: dict[PolicyCode, tuple[int, int]] = {
    PolicyCode.NONE: (0, 0),
    PolicyCode.ENTROPY: (1, 0),
    PolicyCode.NORMALIZED_ENTROPY: (1, 0),
    PolicyCode.MAX_PROB: (1, 0),
    PolicyCode.PATIENCE: (2, 2),
    PolicyCode.PCEE: (2, 1),
    PolicyCode.BUDGET: (1, 0),
    PolicyCode.ELBERT: (4, 1),
    PolicyCode.LTE: (1, 0),
    PolicyCode.MPEE: (2, 1),
}
# Policies the op runs on a regression head (C == 1); the others read the softmax.
REGRESSION_CODES = frozenset(
    {PolicyCode.NONE, PolicyCode.BUDGET, PolicyCode.PATIENCE, PolicyCode.LTE}
)


@dataclass(frozen=True)
class PolicyParams:
    """``params`` decoded (0 where the policy has none), as the C++ op decodes them."""

    code: PolicyCode
    threshold: float = 0.0
    patience: int = 0
    delta: float = 0.0
    budget: int = 0
    window: int = 0
    window_test: WindowTest = WindowTest.MONOTONIC
    window_range: float = 0.0
    memory_keep: float = 0.0  # MPEE: 1 - λ
    memory_weight: float = 0.0  # MPEE: λ


def _positive_int(value: float, what: str) -> int:
    if not (value >= 1 and value == math.floor(value) and value < 9.0e15):
        raise RuntimeError(f"exit_head_step: params: {what} must be an integer >= 1, got {value}")
    return int(value)


def decode_params(policy: int, params: Sequence[float], num_labels: int) -> PolicyParams:
    """Validate and decode ``params`` as the C++ op does (for the Triton launcher).

    Raises:
        RuntimeError: an unknown policy or window test code, a wrong number of params, a
            patience, budget layer or window that is not an integer >= 1 (window >= 2), λ
            outside (0, 1], or fewer than 2 classes for a policy that reads the softmax (the
            message names the argument, as the C++ op's does).
    """
    if not 0 <= policy < len(PolicyCode):
        raise RuntimeError(f"exit_head_step: policy: unknown policy code {policy}")
    code = PolicyCode(policy)
    if len(params) != code.num_params:
        raise RuntimeError(
            f"exit_head_step: params: policy code {policy} takes {code.num_params} "
            f"parameter(s), got {len(params)}"
        )
    if code not in REGRESSION_CODES and num_labels < 2:
        raise RuntimeError(
            f"exit_head_step: policy code {policy} needs at least 2 classes, weight has "
            f"{num_labels}"
        )
    p = [float(v) for v in params]
    if code == PolicyCode.PATIENCE:
        return PolicyParams(code, patience=_positive_int(p[0], "patience"), delta=p[1])
    if code == PolicyCode.PCEE:
        return PolicyParams(code, threshold=p[0], patience=_positive_int(p[1], "patience"))
    if code == PolicyCode.BUDGET:
        return PolicyParams(code, budget=_positive_int(p[0], "budget layer"))
    if code == PolicyCode.ELBERT:
        window = _positive_int(p[1], "window")
        if window < 2:
            raise RuntimeError(f"exit_head_step: params: window must be >= 2, got {window}")
        if not (0 <= p[2] < len(WindowTest) and p[2] == math.floor(p[2])):
            raise RuntimeError(f"exit_head_step: params: unknown window test code {p[2]}")
        return PolicyParams(
            code, threshold=p[0], window=window, window_test=WindowTest(int(p[2])),
            window_range=p[3],
        )  # fmt: skip
    if code == PolicyCode.MPEE:
        if not 0.0 < p[1] <= 1.0:
            raise RuntimeError(
                f"exit_head_step: params: memory_weight must be in (0, 1], got {p[1]}"
            )
        return PolicyParams(code, threshold=p[0], memory_keep=1.0 - p[1], memory_weight=p[1])
    return PolicyParams(code, threshold=p[0] if p else 0.0)


def state_specs(
    decoded: PolicyParams, batch_size: int, num_labels: int
) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of each state tensor the op takes, in order (table above)."""
    code, b = decoded.code, batch_size
    if code == PolicyCode.PATIENCE:
        previous = torch.float32 if num_labels == 1 else torch.int64
        return [("counter", torch.int64, (b,)), ("previous prediction", previous, (b,))]
    if code == PolicyCode.PCEE:
        return [("counter", torch.int64, (b,))]
    if code == PolicyCode.ELBERT:
        if decoded.window_test == WindowTest.STABLE:
            return [("window of labels", torch.int64, (b, decoded.window))]
        return [("window of probabilities", torch.float32, (b, decoded.window, num_labels))]
    if code == PolicyCode.MPEE:
        return [("classifier memory", torch.float32, (b, num_labels))]
    return []
