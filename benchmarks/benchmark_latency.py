"""Batch-1 latency of ``Engine.predict`` (tokenization to Prediction) on the default SST-2
checkpoint, at 16, 64, 128 and 512 tokens, for full depth and for each exit policy at its
calibrated operating point (the fastest within 0.5 accuracy points of full depth), with each
layer executor; the peers at full depth beside it: ``huggingface`` (transformers' BertModel),
``onnxruntime`` (one ONNX Runtime session, BERT optimizer, fp32) and ``ort_int8`` (the same
after ``quantize_dynamic``), see :mod:`peers`.

Inputs at 16-128 tokens are SST-2 dev sentences joined into texts of exactly that many tokens
(:func:`scale.texts_of_length`); early exit on such joined texts differs from single
sentences, so the suite reports the exit layer in ``extra_info``. Inputs at 512 tokens are the
long IMDB reviews of ``data/IMDB-long`` (the reporting half of ``compare.py --task imdb``) of
at least 512 tokens, truncated there. The operating points come from the checkpoint's
calibration (SST-2 dev): ``compare.py --task imdb`` calibrates on reviews instead.

Run: ``pytest benchmarks/benchmark_latency.py --benchmark-only --benchmark-group-by=group``
(add ``--benchmark-json=PATH`` for the raw numbers).
"""

from __future__ import annotations

import functools
import itertools
import warnings

import pytest
import torch
from compare import load_workload
from peers import FullDepth, onnxruntime_provider, torch_provider
from scale import texts_of_length

from eeengine import Engine
from eeengine.data import get_task, load_split
from eeengine.defaults import default_checkpoint
from eeengine.evaluation import policy_params
from eeengine.executors import EXECUTORS
from eeengine.selection import choose_operating_point

SEQ_LENS = [16, 64, 128, 512]
POLICIES = ["none", "entropy", "normalized_entropy", "pcee"]
MAX_LENGTH = 512


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
    return Engine(
        default_checkpoint(), policy=policy, executor=executor, max_length=MAX_LENGTH, **params
    )


@functools.cache
def texts(seq_len: int) -> list[str]:
    if seq_len == MAX_LENGTH:
        tokenizer = engine("none", "torch").tokenizer
        reviews = load_workload("imdb").inputs
        return [r for r in reviews if len(tokenizer(r)["input_ids"]) >= seq_len][:16]
    sentences = load_split(get_task("sst2"), "dev").texts
    return texts_of_length(engine("none", "torch"), sentences, seq_len, 16)


@functools.cache
def onnxruntime_peer(int8: bool, workdir: str):
    from pathlib import Path

    predict, _ = onnxruntime_provider(engine("none", "torch"), Path(workdir), int8=int8)
    return predict


def _cycle(seq_len: int, benchmark) -> itertools.cycle:
    benchmark.group = f"batch 1, seq {seq_len}"
    warnings.filterwarnings("ignore", message=r".*longer than \d+ tokens were truncated")
    return itertools.cycle(texts(seq_len))


@pytest.mark.parametrize("seq_len", SEQ_LENS)
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("executor", EXECUTORS)
def test_eeengine(benchmark, seq_len: int, policy: str, executor: str) -> None:
    if executor == "onnxruntime":
        pytest.importorskip("onnxruntime")
    served = engine(policy, executor)
    inputs = _cycle(seq_len, benchmark)
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
    inputs = _cycle(seq_len, benchmark)
    benchmark(lambda: predict([next(inputs)]))
    benchmark.extra_info.update(provider="huggingface", threads=torch.get_num_threads())


@pytest.mark.parametrize("seq_len", SEQ_LENS)
@pytest.mark.parametrize("int8", [False, True], ids=["onnxruntime", "ort_int8"])
def test_onnxruntime(benchmark, tmp_path_factory, seq_len: int, int8: bool) -> None:
    pytest.importorskip("onnxruntime")
    workdir = tmp_path_factory.getbasetemp() / f"onnx-int8-{int8}"
    workdir.mkdir(exist_ok=True)
    predict = onnxruntime_peer(int8, str(workdir))
    inputs = _cycle(seq_len, benchmark)
    benchmark(lambda: predict([next(inputs)]))
    benchmark.extra_info.update(
        provider="ort_int8" if int8 else "onnxruntime", threads=torch.get_num_threads()
    )
