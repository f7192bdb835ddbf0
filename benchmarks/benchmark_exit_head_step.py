"""Fused exit_head_step (provider "eeengine") vs the unfused torch head + policy + latch
(provider "torch", :func:`eeengine.exit_step.exit_head_step_reference`) for the policies pcee,
elbert (window N = 2, monotonic) and mpee (classifier memory), with one encoder layer and the
whole early-exit loop (both backends, full depth) for scale.

Run: ``pytest benchmarks/benchmark_exit_head_step.py --benchmark-only`` (one group per
shape, providers side by side; add ``--benchmark-json=PATH`` for the raw numbers).
"""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig

from eeengine._custom_ops import HAS_C, LOAD_ERROR, exit_head_step
from eeengine.exit_step import exit_head_step_reference
from eeengine.heads import ExitHead
from eeengine.modeling_bert import BertLayer, attention_bias
from eeengine.modeling_multiexit import MultiExitBert
from eeengine.policies import ExitPolicy
from eeengine.policies.elbert import ElbertPolicy
from eeengine.policies.mpee import MpeePolicy
from eeengine.policies.none import NoExitPolicy
from eeengine.policies.pcee import PceePolicy
from eeengine.runtime import early_exit_forward

SEQ_LEN = 64
NUM_LAYERS = 6
LAYER = 2
POLICIES: dict[str, ExitPolicy] = {
    "pcee": PceePolicy(0.3, patience=2),
    "elbert": ElbertPolicy(0.3, window=2),
    "mpee": MpeePolicy(0.3),
}


def inputs(batch_size: int, hidden_size: int, num_labels: int, policy: ExitPolicy) -> tuple:
    """A mean-pooling head, right-padded hidden states (lengths 16..64) and latch buffers."""
    gen = torch.Generator().manual_seed(0)
    head = ExitHead(hidden_size, num_labels, "mean", dropout=0.1).eval()
    hidden = torch.randn(batch_size, SEQ_LEN, hidden_size, generator=gen)
    lengths = torch.randint(16, SEQ_LEN + 1, (batch_size,), generator=gen)
    lengths[0] = SEQ_LEN
    mask = (torch.arange(SEQ_LEN) < lengths[:, None]).long()
    state = policy.init_state(batch_size, torch.device("cpu"), num_labels)
    rows = torch.arange(batch_size)
    out_logits = torch.zeros(batch_size, num_labels)
    out_layer = torch.zeros(batch_size, dtype=torch.long)
    return head, policy, hidden, mask, state, rows, out_logits, out_layer


@pytest.mark.parametrize("provider", ["eeengine", "torch"])
@pytest.mark.parametrize("num_labels", [2, 3])
@pytest.mark.parametrize("batch_size", [1, 32])
@pytest.mark.parametrize("hidden_size", [384, 768])
@pytest.mark.parametrize("policy_name", POLICIES)
def test_exit_head_step(
    benchmark, policy_name: str, provider: str, hidden_size: int, batch_size: int, num_labels: int
) -> None:
    if provider == "eeengine" and not HAS_C:
        pytest.skip(f"C++ extension not available: {LOAD_ERROR}")
    head, policy, hidden, mask, state, rows, out_logits, out_layer = inputs(
        batch_size, hidden_size, num_labels, POLICIES[policy_name]
    )
    benchmark.group = f"exit_head_step {policy_name} H={hidden_size} B={batch_size} C={num_labels}"
    benchmark.extra_info.update(provider=provider, seq_len=SEQ_LEN)
    with torch.inference_mode():
        if provider == "eeengine":
            weight, bias = head.classifier.weight, head.classifier.bias
            state_list = [state[key] for key in policy.op_state_keys]
            benchmark(
                exit_head_step, hidden, mask, weight, bias, policy.op_code,
                policy.op_params(LAYER), LAYER, NUM_LAYERS, state_list, rows, out_logits,
                out_layer,
            )  # fmt: skip
        else:
            benchmark(
                exit_head_step_reference, head, policy, hidden, mask, LAYER, NUM_LAYERS, state,
                rows, out_logits, out_layer,
            )  # fmt: skip


def minilm_config() -> BertConfig:
    """all-MiniLM-L6-v2's shape (6 layers, hidden 384, 12 heads, intermediate 1536)."""
    return BertConfig(
        num_hidden_layers=NUM_LAYERS,
        hidden_size=384,
        num_attention_heads=12,
        intermediate_size=1536,
        hidden_act="gelu",
    )


def test_encoder_layer(benchmark) -> None:
    """One MiniLM-sized BertLayer, random weights, batch 1, seq 64: the work one exit step sits
    between."""
    torch.manual_seed(0)
    layer = BertLayer(minilm_config()).eval()
    hidden = torch.randn(1, SEQ_LEN, 384)
    bias = attention_bias(torch.ones(1, SEQ_LEN, dtype=torch.long))
    benchmark.group = "encoder layer H=384 B=1 N=64"
    benchmark.extra_info.update(provider="torch", seq_len=SEQ_LEN)
    with torch.inference_mode():
        benchmark(layer, hidden, bias)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_early_exit_forward(benchmark, backend: str) -> None:
    """The whole loop on a random MiniLM-sized model, batch 1, seq 64, full depth (policy
    "none"): 6 encoder layers and 6 exit steps."""
    if backend == "cpp" and not HAS_C:
        pytest.skip(f"C++ extension not available: {LOAD_ERROR}")
    torch.manual_seed(0)
    model = MultiExitBert(minilm_config(), num_labels=2).eval()
    input_ids = torch.randint(1000, 2000, (1, SEQ_LEN))
    ones = torch.ones_like(input_ids)
    benchmark.group = "early_exit_forward MiniLM-sized B=1 N=64 full depth"
    benchmark.extra_info.update(provider=backend, seq_len=SEQ_LEN)
    benchmark(early_exit_forward, model, NoExitPolicy(), input_ids, ones, ones * 0, backend)
