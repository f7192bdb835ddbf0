"""The CUDA C++ kernel of exit_head_step (csrc/exit_head_cuda.cu, the CUDA dispatch key of
``eeengine::exit_head_step``) against its plain-torch twin, with the helpers of
test_exit_head_step.py: every policy and scenario, fp32 / fp16 / bf16, odd shapes, padding,
the last layer, pooled inputs.

Runs only where the extension was built with CUDA kernels (a CUDA torch and nvcc: the GPU
machine of ``benchmarks/gpu_check.sh``); the skip condition is checked explicitly, so an error
from the kernel is a failure, never a skip.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from eeengine._custom_ops import HAS_C, exit_head_step
from tests.exit_step_cases import (
    HIDDEN_SIZES,
    NUM_LAYERS,
    SCENARIOS,
    assert_same,
    make_inputs,
    make_policy,
    run_both,
)
from tests.test_triton_exit_head_step import run  # the scenario runner, any op

HAS_CUDA_KERNEL = (
    HAS_C
    and torch.cuda.is_available()
    and torch._C._dispatch_has_kernel_for_dispatch_key("eeengine::exit_head_step", "CUDA")
)
pytestmark = pytest.mark.skipif(
    not HAS_CUDA_KERNEL, reason="eeengine._C has no CUDA kernels (needs a CUDA torch and nvcc)"
)

POLICIES = ["none", "entropy", "normalized_entropy", "max_prob", "patience", "pcee", "budget"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def on_cuda(*args: object) -> tuple[Tensor, Tensor]:
    """The op on CUDA copies of the arguments; the in-place updates (state, out_logits,
    out_layer) are copied back into the caller's CPU tensors."""

    def move(a: object) -> object:
        if isinstance(a, list):
            return [move(x) for x in a]
        return a.cuda() if torch.is_tensor(a) else a

    moved = [move(a) for a in args]
    logits, exit_mask = exit_head_step(*moved)
    updated = [*zip(args[8], moved[8], strict=True), (args[10], moved[10]), (args[11], moved[11])]
    for cpu_tensor, cuda_tensor in updated:
        cpu_tensor.copy_(cuda_tensor.cpu())
    return logits.cpu(), exit_mask.cpu()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("name", POLICIES)
@torch.inference_mode()
def test_policies_match_reference(name: str, scenario: str, dtype: torch.dtype) -> None:
    ref, got = run(name, scenario, dtype, op=on_cuda)
    assert_same(ref, got, dtype)


@pytest.mark.parametrize("hidden_size", HIDDEN_SIZES)
@pytest.mark.parametrize(("batch_size", "num_labels"), [(1, 2), (7, 3), (33, 5)])
@torch.inference_mode()
def test_shapes_match_reference(batch_size: int, num_labels: int, hidden_size: int) -> None:
    ref, got = run(
        "pcee", "some", torch.float32, batch_size, 11, hidden_size, num_labels, op=on_cuda
    )
    assert_same(ref, got, torch.float32)


@pytest.mark.parametrize("name", ["none", "patience"])
@torch.inference_mode()
def test_last_layer_every_row_exits(name: str) -> None:
    ref, got = run(name, "none", torch.float32, layer=NUM_LAYERS, op=on_cuda)
    assert bool(got[1].all())
    assert_same(ref, got, torch.float32)


@torch.inference_mode()
def test_pooled_input_matches_reference() -> None:
    head, hidden, mask, gen = make_inputs(6, 5, 19, 3, torch.float32)
    pooled = head.pool(hidden, mask)
    policy, state = make_policy("entropy", "some", head(hidden, mask), 2, gen)
    ref, got = run_both(head, policy, pooled, None, 2, state, gen, on_cuda)
    assert_same(ref, got, torch.float32)
