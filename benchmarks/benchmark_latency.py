"""Batch-1 latency of ``Engine.predict`` (tokenization to Prediction) on the default SST-2
checkpoint, at 16, 64 and 128 tokens, for full depth and for each exit policy at its
calibrated operating point (the fastest within 0.5 accuracy points of full depth), with each
layer executor; provider ``huggingface`` is transformers' BertModel at full depth.

Inputs are SST-2 dev sentences joined into texts of exactly that many tokens
(:func:`scale.texts_of_length`); early exit on such joined texts differs from single
sentences, so the suite reports the exit layer in ``extra_info``.

Run: ``pytest benchmarks/benchmark_latency.py --benchmark-only --benchmark-group-by=group``
(add ``--benchmark-json=PATH`` for the raw numbers).
"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
from compare import FullDepth, torch_provider
from scale import texts_of_length

from eeengine import Engine
from eeengine.data import get_task, load_split
from eeengine.defaults import default_checkpoint
from eeengine.evaluation import choose_operating_point, policy_params
from eeengine.executors import EXECUTORS

SEQ_LENS = [16, 64, 128]
POLICIES = ["none", "entropy", "normalized_entropy", "pcee"]


@functools.cache
def engine(policy: str, executor: str) -> Engine:
    """The default checkpoint with ``policy`` at its calibrated point (within 0.5 points)."""
    params = {}
    if policy != "none":
        base = engine("none", "torch")
        chosen = choose_operating_point(base.calibration, max_drop=0.5, policy=policy)
        if chosen is None:
            pytest.skip(f"the checkpoint has no {policy} point within 0.5 points")
        params = policy_params(chosen[1])
    return Engine(default_checkpoint(), policy=policy, executor=executor, max_length=128, **params)


@functools.cache
def texts(seq_len: int) -> list[str]:
    sentences = load_split(get_task("sst2"), "dev").texts
    return texts_of_length(engine("none", "torch"), sentences, seq_len, 16)


@pytest.mark.parametrize("seq_len", SEQ_LENS)
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("executor", EXECUTORS)
def test_eeengine(benchmark, seq_len: int, policy: str, executor: str) -> None:
    if executor == "onnxruntime":
        pytest.importorskip("onnxruntime")
    served = engine(policy, executor)
    inputs = itertools.cycle(texts(seq_len))
    benchmark.group = f"batch 1, seq {seq_len}"
    result = benchmark(lambda: served.predict(next(inputs)))
    benchmark.extra_info.update(
        provider="eeengine",
        executor=executor,
        policy=repr(served.policy),
        exit_layer=result.exit_layer,
        threads=torch.get_num_threads(),
    )


@pytest.mark.parametrize("seq_len", SEQ_LENS)
def test_huggingface(benchmark, seq_len: int) -> None:
    predict = torch_provider(engine("none", "torch"), FullDepth(engine("none", "torch")))
    inputs = itertools.cycle(texts(seq_len))
    benchmark.group = f"batch 1, seq {seq_len}"
    benchmark(lambda: predict([next(inputs)]))
    benchmark.extra_info.update(provider="huggingface", threads=torch.get_num_threads())
