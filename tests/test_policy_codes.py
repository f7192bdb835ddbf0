"""The policy codes and layouts of exit_head_step agree across C++/CUDA (the X-macro tables of
csrc/exit_policy.h), Python and Triton (eeengine.policy_codes), and with every policy's
``op_code`` / ``op_params`` / ``op_state_keys`` / ``init_state``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from eeengine._custom_ops import HAS_C, LOAD_ERROR, exit_head_step
from eeengine.policies import POLICIES, make_policy
from eeengine.policies.elbert import WINDOW_TESTS
from eeengine.policy_codes import (
    POLICY_LAYOUTS,
    PolicyCode,
    WindowTest,
    decode_params,
    state_specs,
)

HEADER = Path(__file__).resolve().parents[1] / "csrc" / "exit_policy.h"


def macro_rows(macro: str) -> list[tuple[str, ...]]:
    """The ``X(...)`` rows of ``#define <macro>(X)`` in csrc/exit_policy.h, as strings."""
    text = HEADER.read_text()
    body = re.search(rf"#define {macro}\(X\)((?:[^\n]*\\\n)*[^\n]*)", text)
    assert body is not None, f"{macro} not found in {HEADER}"
    return [
        tuple(a.strip() for a in row.split(",")) for row in re.findall(r"X\(([^)]*)\)", body[1])
    ]


def python_name(cpp_name: str) -> str:
    """kNormalizedEntropy -> NORMALIZED_ENTROPY."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", cpp_name.removeprefix("k")).upper()


def test_policy_table_matches_header() -> None:
    rows = macro_rows("EEENGINE_EXIT_POLICIES")
    header = {python_name(n): (int(c), int(p), int(s)) for n, c, p, s in rows}
    python = {code.name: (int(code), *POLICY_LAYOUTS[code]) for code in PolicyCode}
    assert header == python


def test_window_tests_match_header() -> None:
    header = {python_name(n): int(c) for n, c in macro_rows("EEENGINE_WINDOW_TESTS")}
    assert header == {test.name: int(test) for test in WindowTest}
    assert WINDOW_TESTS == tuple(name.lower() for name in header)


# One instance of every registered policy, with the parameters that pick each layout.
INSTANCES = [
    ("entropy", {"threshold": 0.3}, 3),
    ("normalized_entropy", {"threshold": 0.3}, 3),
    ("max_prob", {"threshold": 0.9}, 3),
    ("patience", {"patience": 2}, 3),
    ("patience", {"threshold": 0.2, "patience": 2}, 1),
    ("pcee", {"threshold": 0.3, "patience": 2}, 3),
    ("elbert", {"threshold": 0.3, "window": 3}, 4),
    ("elbert", {"threshold": 0.3, "window_test": "stable"}, 2),
    ("elbert", {"threshold": 0.3, "window_test": "range", "window_range": 0.1}, 5),
    ("lte", {"threshold": 0.3}, 2),
    ("lte", {"threshold": 0.3}, 1),
    ("mpee", {"threshold": 0.3}, 3),
    ("budget", {"layer": 2}, 3),
    ("none", {}, 1),
]


def test_every_policy_is_covered() -> None:
    assert {name for name, _, _ in INSTANCES} == set(POLICIES)


@pytest.mark.parametrize(("name", "params", "num_labels"), INSTANCES)
def test_policy_state_matches_the_op_layout(name: str, params: dict, num_labels: int) -> None:
    """op_params decode, and init_state allocates exactly the op's state tensors."""
    policy = make_policy(name, **params)
    assert policy.op_code is not None, f"{name} is not fused"
    code = PolicyCode(policy.op_code)
    op_params = policy.op_params(2)
    decoded = decode_params(code, op_params, num_labels)
    state = policy.init_state(5, torch.device("cpu"), num_labels)
    specs = state_specs(decoded, 5, num_labels)
    assert len(policy.op_state_keys) == code.num_state == len(specs)
    assert set(state) == set(policy.op_state_keys)
    for key, (_, dtype, shape) in zip(policy.op_state_keys, specs, strict=True):
        assert state[key].dtype == dtype and tuple(state[key].shape) == shape
        assert state[key].is_contiguous()
    if name == "elbert":
        assert decoded.window_test == WindowTest[policy.window_test.upper()]
        assert decoded.window == policy.window


@pytest.mark.skipif(not HAS_C, reason=f"C++ extension not available: {LOAD_ERROR}")
@pytest.mark.parametrize("code", list(PolicyCode))
def test_compiled_op_takes_the_layout(code: PolicyCode) -> None:
    """The compiled op reads the same number of params and state tensors per policy code."""
    args = [torch.randn(2, 4), None, torch.randn(3, 4), torch.randn(3), int(code)]
    tail = [2, 6, [], torch.arange(2), torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)]
    message = rf"policy code {int(code)} takes {code.num_params} parameter\(s\)"
    with pytest.raises(RuntimeError, match=message):
        exit_head_step(*args, [1.0] * (code.num_params + 1), *tail)
    message = rf"policy code {int(code)} takes {code.num_state} state tensor\(s\)"
    wrong_state = [torch.zeros(2, dtype=torch.long)] * (code.num_state + 1)
    with pytest.raises(RuntimeError, match=message):  # checked before the params' values
        exit_head_step(*args, [1.0] * code.num_params, 2, 6, wrong_state, *tail[3:])
