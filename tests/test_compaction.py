"""On-device compaction (eeengine.compaction): the stable partition against boolean-mask
indexing, the size predicates, and the compacting loop against the compaction loop on CPU
(sizes chosen on the host there; on a GPU the IF nodes choose them, tests/test_cuda_graph.py)."""

from __future__ import annotations

import pytest
import torch

from eeengine._custom_ops import HAS_C
from eeengine.compaction import (
    halvings,
    live_partition,
    permute_rows,
    run_compacting_loop,
    size_predicates,
)
from eeengine.policies import ExitPolicy
from eeengine.runtime import early_exit_forward
from eeengine.static_loop import allocate_static_loop, read_outputs, write_inputs
from tests.exit_step_cases import tiny_model
from tests.test_cuda_graph import POLICIES, assert_same, batch


@pytest.mark.parametrize("batch_size", [1, 2, 7, 32, 128])
def test_live_partition_matches_boolean_mask_indexing(batch_size: int) -> None:
    gen = torch.Generator().manual_seed(batch_size)
    for p in (0.0, 0.3, 0.9, 1.0):
        live = torch.rand(batch_size, generator=gen) < p
        values = torch.randn(batch_size, 3, generator=gen)
        dest = live_partition(live)
        assert torch.equal(dest.sort().values, torch.arange(batch_size)), "not a permutation"
        moved = permute_rows(values, dest)
        num_live = int(live.sum())
        assert torch.equal(moved[:num_live], values[live])  # live rows first, in order
        assert torch.equal(moved[num_live:], values[~live])  # then the rest, in order


def test_sizes_and_predicates() -> None:
    assert halvings(128) == (128, 64, 32, 16, 8, 4, 2, 1)
    assert halvings(5) == (5, 3, 2, 1)
    assert halvings(1) == (1,)
    sizes = halvings(32)
    for num_live in range(33):
        chosen = [s for s, p in zip(sizes, size_predicates(torch.tensor(num_live), sizes),
                                    strict=True) if bool(p)]  # fmt: skip
        if num_live == 0:
            assert chosen == []
        else:  # the smallest size that holds every live row
            assert chosen == [min(s for s in sizes if s >= num_live)]


@pytest.mark.parametrize("pooling", ["mean", "cls"])
@pytest.mark.parametrize("policy", POLICIES, ids=repr)
@torch.inference_mode()
def test_compacting_loop_matches_compaction_loop(policy: ExitPolicy, pooling: str) -> None:
    model = tiny_model(pooling)
    backends = ["reference"] + (["cpp"] if HAS_C and policy.op_code is not None else [])
    for backend in backends:
        s = allocate_static_loop(model, 8, 16, torch.device("cpu"))
        for batch_size, seq_len in ((8, 10), (5, 16), (1, 7)):
            inputs = batch(batch_size, seq_len, torch.device("cpu"))
            write_inputs(s, *inputs)
            run_compacting_loop(model, policy, backend, s)
            assert_same(read_outputs(s, batch_size), early_exit_forward(model, policy, *inputs))


@torch.inference_mode()
def test_every_size_warm_up_runs() -> None:
    """The warm-up before capture runs every size's body at every layer (shapes only)."""
    model = tiny_model("mean")
    s = allocate_static_loop(model, 8, 16, torch.device("cpu"))
    write_inputs(s, *batch(8, 10, torch.device("cpu")))
    run_compacting_loop(model, POLICIES[0], "reference", s, every_size=True)
    assert s.out_layer[:8].min() >= 1
