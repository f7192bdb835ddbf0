"""Fused token_prune (provider "eeengine", the C++ CPU op; "triton", the Triton op on a CUDA
GPU, skipped without one) vs the plain-torch reference (provider "torch",
:func:`eeengine.token_pruning.token_prune_reference`, on the CPU), and the whole early-exit loop
on a MiniLM-sized model with and without the default pruning schedule, for scale.

Run: ``pytest benchmarks/benchmark_token_prune.py --benchmark-only`` (one group per shape,
providers side by side; add ``--benchmark-json=PATH`` for the raw numbers).
"""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig

from eeengine._custom_ops import HAS_C, LOAD_ERROR, prune_op, token_prune
from eeengine.modeling_multiexit import MultiExitBert
from eeengine.policies.none import NoExitPolicy
from eeengine.runtime import early_exit_forward
from eeengine.token_pruning import DEFAULT_TOKEN_PRUNING, TokenPruning, token_prune_reference
from tests.test_token_prune import make_inputs

HEADS, HEAD_SIZE = 12, 32  # all-MiniLM-L6-v2: hidden 384 = 12 heads of 32


@pytest.mark.parametrize("provider", ["eeengine", "triton", "torch"])
@pytest.mark.parametrize("seq_len", [64, 128])
@pytest.mark.parametrize("batch_size", [1, 32])
def test_token_prune(benchmark, provider: str, batch_size: int, seq_len: int) -> None:
    if provider == "eeengine" and not HAS_C:
        pytest.skip(f"C++ extension not available: {LOAD_ERROR}")
    if provider == "triton" and not torch.cuda.is_available():
        pytest.skip("the Triton op needs a CUDA GPU")
    inputs = make_inputs(batch_size, seq_len, HEADS * HEAD_SIZE, HEADS, HEAD_SIZE)
    benchmark.group = f"token_prune H=384 B={batch_size} N={seq_len} r=0.7"
    benchmark.extra_info.update(provider=provider)
    if provider == "triton":
        inputs = tuple(t.cuda() for t in inputs)

        def prune(*args: object) -> object:  # time the kernel, not its asynchronous launch
            out = prune_op("triton")(*args)
            torch.cuda.synchronize()
            return out

    else:
        prune = token_prune if provider == "eeengine" else token_prune_reference
    with torch.inference_mode():
        benchmark(prune, *inputs, 0.7, 0.5)


@pytest.mark.parametrize("pruning", ["none", "default"])
@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_early_exit_forward(benchmark, backend: str, pruning: str) -> None:
    """The whole loop on a random MiniLM-sized model, batch 1, seq 128, full depth (policy
    "none"), without pruning and with the default schedule (layers 2 and 4, r = 0.7)."""
    if backend == "cpp" and not HAS_C:
        pytest.skip(f"C++ extension not available: {LOAD_ERROR}")
    torch.manual_seed(0)
    config = BertConfig(
        num_hidden_layers=6, hidden_size=384, num_attention_heads=12, intermediate_size=1536
    )
    model = MultiExitBert(config, num_labels=2).eval()
    input_ids = torch.randint(1000, 2000, (1, 128))
    ones = torch.ones_like(input_ids)
    schedule = TokenPruning.from_json(DEFAULT_TOKEN_PRUNING, 6) if pruning == "default" else None
    benchmark.group = "early_exit_forward MiniLM-sized B=1 N=128 full depth"
    benchmark.extra_info.update(provider=f"{backend}, pruning {pruning}")
    benchmark(
        early_exit_forward, model, NoExitPolicy(), input_ids, ones, ones * 0,
        backend=backend, token_pruning=schedule,
    )  # fmt: skip
