"""Graph mode (eeengine.cuda_graph): the early-exit loop in one CUDA graph per bucket, with no
host synchronization, against the plain loop (eeengine.runtime.early_exit_forward).

The GPU tests run the replay under ``torch.cuda.set_sync_debug_mode("error")``, so any host
sync raises; they are skipped without CUDA. On CPU the loop that the graph captures runs
eagerly (no IF nodes) with the C++ op: no compaction, exited rows latched through the sink row,
the batch padded up to a bucket, must give the plain loop's results.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor
from transformers import PretrainedConfig

from eeengine._custom_ops import HAS_C, LOAD_ERROR, exit_head_step, fused_op
from eeengine.cuda_graph import (
    GraphRunner,
    allocate_static_loop,
    bucket,
    run_static_loop,
    write_inputs,
)
from eeengine.modeling_multiexit import MultiExitBert
from eeengine.policies import ExitPolicy
from eeengine.policies.budget import BudgetPolicy
from eeengine.policies.elbert import ElbertPolicy
from eeengine.policies.entropy import EntropyPolicy
from eeengine.policies.max_prob import MaxProbPolicy
from eeengine.policies.none import NoExitPolicy
from eeengine.policies.patience import PatiencePolicy
from eeengine.policies.pcee import PceePolicy
from eeengine.runtime import early_exit_forward
from tests.conftest import tiny_albert_config, tiny_roberta_config
from tests.test_exit_head_step import SEED, TOLERANCES, tiny_model

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

POLICIES = [
    EntropyPolicy(0.6),
    PceePolicy(0.6, 2),
    PatiencePolicy(patience=1),
    MaxProbPolicy(0.7),
    BudgetPolicy(layer=2),
    NoExitPolicy(),
]


def test_bucket() -> None:
    assert bucket(1, (1, 2, 4), "batch size") == 1
    assert bucket(3, (1, 2, 4), "batch size") == 4
    with pytest.raises(ValueError, match="batch size 5 exceeds the largest graph bucket 4"):
        bucket(5, (1, 2, 4), "batch size")


def test_refuses_cpu_model() -> None:
    model = tiny_model("mean")
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        GraphRunner(model, EntropyPolicy(0.5))


@requires_cuda
def test_refuses_policy_without_fused_op() -> None:
    with pytest.raises(ValueError, match="policy the fused exit op implements, not 'elbert'"):
        GraphRunner(tiny_model("mean").cuda(), ElbertPolicy(0.5))


def batch(batch_size: int, seq_len: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Random right-padded inputs for :func:`tests.test_exit_head_step.tiny_model`."""
    gen = torch.Generator().manual_seed(SEED + batch_size)
    input_ids = torch.randint(1, 50, (batch_size, seq_len), generator=gen)
    lengths = torch.randint(3, seq_len + 1, (batch_size,), generator=gen)
    lengths[0] = seq_len
    attention_mask = (torch.arange(seq_len) < lengths[:, None]).long()
    inputs = (input_ids * attention_mask, attention_mask, torch.zeros_like(input_ids))
    return tuple(t.to(device) for t in inputs)


@pytest.mark.skipif(not HAS_C, reason=f"C++ extension not available: {LOAD_ERROR}")
@pytest.mark.parametrize("pooling", ["mean", "cls"])
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
@torch.inference_mode()
def test_static_loop_matches_plain_loop_on_cpu(policy: ExitPolicy, pooling: str) -> None:
    model = tiny_model(pooling)
    s = allocate_static_loop(model, policy, 8, 16, torch.device("cpu"))
    for batch_size, seq_len in ((8, 10), (5, 16), (1, 7)):  # the buffers are reused
        inputs = batch(batch_size, seq_len, torch.device("cpu"))
        write_inputs(s, *inputs)
        run_static_loop(model, policy, exit_head_step, s, conditional=False)
        ref = early_exit_forward(model, policy, *inputs, backend="reference")
        assert torch.equal(s.out_layer[:batch_size], ref.exit_layer)
        torch.testing.assert_close(
            s.out_logits[:batch_size], ref.logits, **TOLERANCES[torch.float32]
        )
        if policy.name not in ("none", "budget") and batch_size > 1:
            assert int(ref.exit_layer.min()) < model.num_layers, "no row exits early: weak test"


@pytest.mark.skipif(not HAS_C, reason=f"C++ extension not available: {LOAD_ERROR}")
@pytest.mark.parametrize(
    ("make_config", "layout"),
    [(tiny_albert_config, "shared"), (tiny_roberta_config, "shared_pooler")],
    ids=["albert-shared", "roberta-shared_pooler"],
)
@torch.inference_mode()
def test_static_loop_on_other_backbones_and_layouts(
    make_config: Callable[[], PretrainedConfig], layout: str
) -> None:
    torch.manual_seed(SEED)
    model = MultiExitBert(make_config(), num_labels=3, pooling="cls", layout=layout).eval()
    for head in model.exit_heads:
        head.classifier.weight.mul_(20)
    policy = EntropyPolicy(0.6)
    s = allocate_static_loop(model, policy, 8, 16, torch.device("cpu"))
    inputs = batch(6, 12, torch.device("cpu"))
    write_inputs(s, *inputs)
    run_static_loop(model, policy, exit_head_step, s, conditional=False)
    ref = early_exit_forward(model, policy, *inputs, backend="reference")
    assert torch.equal(s.out_layer[:6], ref.exit_layer)
    torch.testing.assert_close(s.out_logits[:6], ref.logits, **TOLERANCES[torch.float32])
    assert int(ref.exit_layer.min()) < model.num_layers, "no row exits early: weak test"


@pytest.mark.parametrize("policy", [PceePolicy(0.6, 2), PatiencePolicy(patience=1)], ids=str)
@torch.inference_mode()
def test_static_loop_with_triton_op(policy: ExitPolicy) -> None:
    """The same loop with the Triton kernel (interpreted on CPU, compiled on a GPU)."""
    pytest.importorskip("triton", reason="triton is not installed")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = tiny_model("mean").to(device)
    s = allocate_static_loop(model, policy, 4, 16, device)
    inputs = batch(4, 10, device)
    write_inputs(s, *inputs)
    run_static_loop(model, policy, fused_op("triton"), s, conditional=False)
    ref = early_exit_forward(model, policy, *inputs, backend="reference")
    assert torch.equal(s.out_layer[:4], ref.exit_layer)
    torch.testing.assert_close(s.out_logits[:4], ref.logits, **TOLERANCES[torch.float32])


@requires_cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("pooling", ["mean", "cls"])
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
def test_graph_mode_matches_plain_loop_without_host_sync(
    policy: ExitPolicy, pooling: str, backend: str
) -> None:
    model = tiny_model(pooling).cuda()
    try:
        runner = GraphRunner(model, policy, backend=backend)
    except ValueError as error:  # "cuda" needs an extension built against a CUDA torch
        pytest.skip(str(error))
    for batch_size, seq_len in ((8, 10), (1, 7), (5, 10)):  # a new bucket, then a reused one
        inputs = batch(batch_size, seq_len, model.exit_heads[0].classifier.weight.device)
        runner(*inputs)  # the first batch of a bucket captures its graph (that syncs)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = runner(*inputs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        ref = early_exit_forward(model, policy, *inputs, backend="reference")
        assert torch.equal(got.exit_layer.cpu(), ref.exit_layer.cpu())
        torch.testing.assert_close(got.logits, ref.logits, **TOLERANCES[torch.float32])
        if policy.name not in ("none", "budget") and batch_size > 1:
            assert int(ref.exit_layer.min()) < model.num_layers, "no row exits early: weak test"


@requires_cuda
def test_every_row_exits_at_layer_1() -> None:
    """Every row exits at layer 1 (budget k = 1): the IF nodes skip layers 2..L, and the
    latched results are the layer-1 exits."""
    model = tiny_model("mean").cuda()
    runner = GraphRunner(model, BudgetPolicy(layer=1))
    inputs = batch(4, 9, model.exit_heads[0].classifier.weight.device)
    runner(*inputs)
    got = runner(*inputs)
    assert bool((got.exit_layer == 1).all())
    ref = early_exit_forward(model, BudgetPolicy(layer=1), *inputs, backend="reference")
    torch.testing.assert_close(got.logits, ref.logits, **TOLERANCES[torch.float32])
