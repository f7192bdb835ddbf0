"""The GPU loop: the sync-free static loop (eeengine.static_loop) and its CUDA graph capture
(eeengine.cuda_graph), against the compaction loop (eeengine.runtime.early_exit_forward on CPU).

On CPU, everything the captured graph computes runs eagerly (no IF nodes): no compaction,
exited rows latched through the sink row, the batch padded up to a bucket, every policy, token
pruning and ``tokens_kept``; it must give the compaction loop's results. The GPU tests (skipped
without CUDA) replay the graphs under ``torch.cuda.set_sync_debug_mode("error")``, so any host
sync raises; ``benchmarks/gpu_check.sh`` runs them on a lent GPU.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor
from transformers import PretrainedConfig

from eeengine._custom_ops import HAS_C, LOAD_ERROR, _unavailable
from eeengine.batching import collate, encode
from eeengine.cuda_graph import GraphRunner, bucket
from eeengine.device_loop import DeviceLoop
from eeengine.executors import TorchExecutor
from eeengine.exit_step import latch
from eeengine.heads import LteHead
from eeengine.modeling_bert import attention_bias
from eeengine.modeling_multiexit import MultiExitBert
from eeengine.policies import ExitPolicy, make_policy
from eeengine.policies.budget import BudgetPolicy
from eeengine.policies.elbert import ElbertPolicy
from eeengine.policies.entropy import EntropyPolicy
from eeengine.policies.lte import LtePolicy
from eeengine.policies.max_prob import MaxProbPolicy
from eeengine.policies.mpee import MpeePolicy
from eeengine.policies.none import NoExitPolicy
from eeengine.policies.patience import PatiencePolicy
from eeengine.policies.pcee import PceePolicy
from eeengine.runtime import early_exit_forward
from eeengine.static_loop import (
    allocate_static_loop,
    read_outputs,
    run_static_loop,
    static_early_exit_forward,
    write_inputs,
)
from eeengine.token_pruning import TokenPruning
from tests.conftest import SENTENCES, make_tiny_model, tiny_albert_config, tiny_roberta_config
from tests.exit_step_cases import SEED, TOLERANCES, tiny_model

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
requires_c = pytest.mark.skipif(not HAS_C, reason=f"C++ extension not available: {LOAD_ERROR}")

POLICIES = [
    EntropyPolicy(0.6),
    PceePolicy(0.6, 2),
    PatiencePolicy(patience=1),
    MaxProbPolicy(0.7),
    BudgetPolicy(layer=2),
    NoExitPolicy(),
    ElbertPolicy(0.3, window=2),
    ElbertPolicy(0.3, window=2, window_test="stable"),
    MpeePolicy(0.6),
]
FUSED = [p for p in POLICIES if p.op_code is not None]
SCHEDULE = TokenPruning(layers=(1, 3), keep_ratio=0.6, beta=(1.0, 0.5))


def test_bucket() -> None:
    assert bucket(1, (1, 2, 4), "batch size") == 1
    assert bucket(3, (1, 2, 4), "batch size") == 4
    with pytest.raises(ValueError, match="batch size 5 exceeds the largest graph bucket 4"):
        bucket(5, (1, 2, 4), "batch size")


def test_refuses_cpu_model() -> None:
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        GraphRunner(tiny_model("mean"), EntropyPolicy(0.5), "reference")


def batch(batch_size: int, seq_len: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Random right-padded inputs for :func:`tests.test_exit_head_step.tiny_model`."""
    gen = torch.Generator().manual_seed(SEED + batch_size)
    input_ids = torch.randint(1, 50, (batch_size, seq_len), generator=gen)
    lengths = torch.randint(3, seq_len + 1, (batch_size,), generator=gen)
    lengths[0] = seq_len
    attention_mask = (torch.arange(seq_len) < lengths[:, None]).long()
    inputs = (input_ids * attention_mask, attention_mask, torch.zeros_like(input_ids))
    return tuple(t.to(device) for t in inputs)


def assert_same(got, ref, n: int | None = None) -> None:
    """Exit layers and tokens kept equal, logits to fp32 tolerance."""
    n = ref.exit_layer.shape[0] if n is None else n
    assert torch.equal(got.exit_layer[:n].cpu(), ref.exit_layer.cpu())
    torch.testing.assert_close(got.logits[:n].cpu(), ref.logits.cpu(), **TOLERANCES[torch.float32])
    if ref.tokens_kept is not None:
        assert torch.equal(got.tokens_kept[:n].cpu(), ref.tokens_kept.cpu())


def backends(policy: ExitPolicy) -> list[str]:
    return ["reference"] + (["cpp"] if HAS_C and policy.op_code is not None else [])


@pytest.mark.parametrize("pooling", ["mean", "cls"])
@pytest.mark.parametrize("policy", POLICIES, ids=repr)
@torch.inference_mode()
def test_static_loop_matches_compaction_loop_on_cpu(policy: ExitPolicy, pooling: str) -> None:
    """One set of buffers reused for several batches padded up to it (as a graph bucket)."""
    model = tiny_model(pooling)
    for backend in backends(policy):
        s = allocate_static_loop(model, 8, 16, torch.device("cpu"))
        for batch_size, seq_len in ((8, 10), (5, 16), (1, 7)):
            inputs = batch(batch_size, seq_len, torch.device("cpu"))
            write_inputs(s, *inputs)
            run_static_loop(model, policy, backend, s)
            ref = early_exit_forward(model, policy, *inputs, backend="reference")
            assert_same(read_outputs(s, batch_size), ref)
            if policy.name not in ("none", "budget") and batch_size > 1:
                assert int(ref.exit_layer.min()) < model.num_layers, "no row exits early"


@pytest.fixture(scope="module")
def pruning_model(tiny_bert_dir):
    """The tiny BERT with sharper attention (clear token ranks), as in
    tests/test_runtime_token_pruning.py."""
    model = make_tiny_model(tiny_bert_dir)
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            layer.attention.self.query.weight.mul_(8)
    return model


@pytest.mark.parametrize(
    ("name", "params"),
    [("entropy", {"threshold": 0.45}), ("pcee", {"threshold": 0.75, "patience": 2}),
     ("mpee", {"threshold": 0.5}), ("none", {}),
     ("elbert", {"threshold": 0.3, "window": 3, "window_test": "stable"})],
)  # fmt: skip
@torch.inference_mode()
def test_static_loop_with_token_pruning(pruning_model, tokenizer, name: str, params: dict) -> None:
    """Token pruning at layers 1 and 3 on real sentences, buffers wider than the batch: the
    same exits, logits and tokens kept per layer as the compaction loop."""
    policy = make_policy(name, **params)
    encoded = encode(tokenizer, SENTENCES, None, 64)
    inputs = collate(encoded, range(len(SENTENCES)), 0)
    ref = early_exit_forward(pruning_model, policy, *inputs, token_pruning=SCHEDULE)
    if name != "none":
        assert len(set(ref.exit_layer.tolist())) >= 2, "every row exits together: weak test"
    for backend in backends(policy):
        s = allocate_static_loop(pruning_model, 8, 64, torch.device("cpu"))
        write_inputs(s, *inputs)
        run_static_loop(pruning_model, policy, backend, s, SCHEDULE)
        assert_same(read_outputs(s, len(SENTENCES)), ref)


@torch.inference_mode()
def test_static_loop_with_lte(tiny_bert_dir) -> None:
    """The LTE policy reads the model's LTE score inside the loop."""
    model = make_tiny_model(tiny_bert_dir)
    torch.manual_seed(2)
    model.lte = LteHead(model.config.hidden_size).eval()
    policy = LtePolicy(0.5)
    inputs = batch(6, 12, torch.device("cpu"))
    ref = early_exit_forward(model, policy, *inputs)
    assert len(set(ref.exit_layer.tolist())) >= 2, "every row exits together: weak test"
    assert_same(static_early_exit_forward(model, policy, *inputs, "reference"), ref)


@requires_c
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
    inputs = batch(6, 12, torch.device("cpu"))
    ref = early_exit_forward(model, policy, *inputs, backend="reference")
    assert int(ref.exit_layer.min()) < model.num_layers, "no row exits early: weak test"
    for backend in ("reference", "cpp"):
        assert_same(static_early_exit_forward(model, policy, *inputs, backend), ref)


@pytest.mark.parametrize("policy", [PceePolicy(0.6, 2), PatiencePolicy(patience=1)], ids=repr)
@torch.inference_mode()
def test_static_loop_with_triton_op(policy: ExitPolicy) -> None:
    """The same loop with the Triton kernels (interpreted on CPU, compiled on a GPU)."""
    pytest.importorskip("triton", reason="triton is not installed")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = tiny_model("mean").to(device)
    s = allocate_static_loop(model, 4, 16, device)
    inputs = batch(4, 10, device)
    write_inputs(s, *inputs)
    run_static_loop(model, policy, "triton", s)
    assert_same(read_outputs(s, 4), early_exit_forward(model, policy, *inputs))


def test_latch_matches_boolean_mask_indexing() -> None:
    gen = torch.Generator().manual_seed(SEED)
    outputs = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    exit_mask = torch.tensor([True, False, True, True, False, False])
    rows = torch.tensor([4, 0, 7, 2, 5, 1])
    out_logits, out_layer = torch.randn(8, 3, generator=gen), torch.arange(8)
    expected_logits, expected_layer = out_logits.clone(), out_layer.clone()
    expected_logits[rows[exit_mask]] = outputs[exit_mask].float()
    expected_layer[rows[exit_mask]] = 3
    latch(outputs, exit_mask, 3, rows, out_logits, out_layer)
    assert torch.equal(out_logits, expected_logits)
    assert torch.equal(out_layer, expected_layer)


def test_qkv_fused_once() -> None:
    """A second executor (every early_exit_forward without one makes one) reuses the fused
    weights: a graph captured before keeps reading live memory."""
    model = tiny_model("mean")
    TorchExecutor(model)
    fused = model.backbone.layers[0].attention.self.qkv_weight
    early_exit_forward(model, EntropyPolicy(0.6), *batch(2, 8, torch.device("cpu")))
    assert model.backbone.layers[0].attention.self.qkv_weight is fused


def test_attention_bias_skips_the_mask_only_on_cpu() -> None:
    ones = torch.ones(2, 5, dtype=torch.long)
    assert attention_bias(ones) is None
    meta = attention_bias(ones.to("meta"))  # no host read of the mask off the CPU
    assert meta is not None and meta.shape == (2, 1, 1, 5)


def test_cpu_loop_is_the_compaction_loop() -> None:
    model = tiny_model("mean")
    loop = DeviceLoop(model, TorchExecutor(model), graph=True)
    assert loop.mode == "compaction"
    inputs = batch(5, 9, torch.device("cpu"))
    policy = EntropyPolicy(0.6)
    (got,) = loop.to_host([loop(policy, "reference", None, *inputs)])
    assert_same(got, early_exit_forward(model, policy, *inputs))


def cuda_backends() -> list:
    """The GPU exit ops; "cuda" only where the extension has CUDA kernels (an explicit
    condition: a ValueError from the runner is a failure, not a skip)."""
    no_cuda_kernel = HAS_C and torch.cuda.is_available() and not _cuda_kernel_built()
    return [
        "triton",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(
                not HAS_C or no_cuda_kernel, reason="eeengine._C has no CUDA kernels"
            ),
        ),
        "reference",
    ]


def _cuda_kernel_built() -> bool:
    return _unavailable("cuda", EntropyPolicy(0.5), 3) is None


def replay_without_sync(runner: GraphRunner, inputs: tuple) -> object:
    """The first batch of a bucket captures (that syncs); the second replays under
    sync-debug "error", where any host sync raises."""
    runner(*inputs)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return runner(*inputs)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@requires_cuda
@pytest.mark.parametrize("backend", cuda_backends())
@pytest.mark.parametrize("pooling", ["mean", "cls"])
@pytest.mark.parametrize("policy", POLICIES, ids=repr)
def test_graph_mode_matches_compaction_loop_without_host_sync(
    policy: ExitPolicy, pooling: str, backend: str
) -> None:
    if backend != "reference" and policy.op_code is None:
        pytest.skip(f"the fused op does not implement {policy.name!r}")
    reference = tiny_model(pooling)  # the same seed: the same weights, on CPU
    runner = GraphRunner(tiny_model(pooling).cuda(), policy, backend)
    for batch_size, seq_len in ((8, 10), (1, 7), (5, 10)):  # a new bucket, then a reused one
        inputs = batch(batch_size, seq_len, torch.device("cpu"))
        got = replay_without_sync(runner, tuple(t.cuda() for t in inputs))
        assert_same(got, early_exit_forward(reference, policy, *inputs))


@requires_cuda
def test_graph_mode_with_token_pruning_without_host_sync(pruning_model, tokenizer) -> None:
    policy = make_policy("pcee", threshold=0.75, patience=2)
    inputs = collate(encode(tokenizer, SENTENCES, None, 64), range(len(SENTENCES)), 0)
    ref = early_exit_forward(pruning_model, policy, *inputs, token_pruning=SCHEDULE)
    runner = GraphRunner(copy.deepcopy(pruning_model).cuda(), policy, "triton", SCHEDULE)
    assert_same(replay_without_sync(runner, tuple(t.cuda() for t in inputs)), ref)


@requires_cuda
def test_every_row_exits_at_layer_1() -> None:
    """Budget k = 1: the IF nodes skip layers 2..L, and the latched results are layer 1's."""
    model = tiny_model("mean").cuda()
    runner = GraphRunner(model, BudgetPolicy(layer=1), "triton")
    inputs = batch(4, 9, torch.device("cuda"))
    got = replay_without_sync(runner, inputs)
    assert bool((got.exit_layer == 1).all())
    assert int(got.tokens_kept[:, 1:].abs().sum()) == 0


@requires_cuda
@pytest.mark.parametrize("policy", POLICIES, ids=repr)
def test_compacting_graph_matches_compaction_loop_without_host_sync(policy: ExitPolicy) -> None:
    """Live rows partitioned into smaller buffers by IF nodes (eeengine.compaction)."""
    reference = tiny_model("mean")
    backend = "triton" if policy.op_code is not None else "reference"
    runner = GraphRunner(tiny_model("mean").cuda(), policy, backend, compact=True)
    for batch_size, seq_len in ((8, 10), (5, 10), (1, 7)):
        inputs = batch(batch_size, seq_len, torch.device("cpu"))
        got = replay_without_sync(runner, tuple(t.cuda() for t in inputs))
        assert_same(got, early_exit_forward(reference, policy, *inputs))
