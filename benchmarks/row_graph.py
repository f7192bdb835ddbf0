"""The row graph against the layer-by-layer loop, at batch 1, in one process, interleaved.

For each precision of the ONNX Runtime executor and each policy (the checkpoint's default
and full depth), SST-2 dev sentences one at a time through:

- ``loop``: :meth:`eeengine.runtime.ExitLoop.run` on pre-collated inputs (no tokenization, no
  results), with the row graph (:mod:`eeengine.executors.row_graph`) and without it
  (``ExitLoop.row_loop`` answering None: the layer-by-layer loop);
- ``serve``: the continuous batcher of ``eeengine serve`` (submit, iterate until answered;
  no HTTP, no tokenization) for a lone input, with and without the one-call path.

Passes alternate between the two in each pair; medians in ms, and whether the exit layers
agree.

    EEENGINE_HOME=/work/eehome OMP_WAIT_POLICY=PASSIVE python benchmarks/row_graph.py \\
        --threads 2 --out benchmarks/results/row_graph
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from environment import environment

from eeengine import Engine
from eeengine.batching import collate, encode_truncating
from eeengine.data import get_task, load_split
from eeengine.defaults import default_checkpoint
from eeengine.runtime import ExitLoop
from eeengine.serve.batcher import Job
from eeengine.serve.layerwise import LayerwiseBatcher
from eeengine.serve.metrics import ServeMetrics
from eeengine.serve.protocol import tokenize

ROW_LOOP = ExitLoop.row_loop


def _layer_by_layer(self: ExitLoop, batch_size: int) -> None:
    return None


def interleaved(one_pass: Callable[[], list[float]], passes: int) -> dict[str, float]:
    """Median ms per input of ``one_pass`` (a pass over the inputs, returning each one's
    seconds) with the row graph and layer by layer, ``passes`` times each, alternating."""
    modes = {"row graph": ROW_LOOP, "layers": _layer_by_layer}
    times: dict[str, list[float]] = {name: [] for name in modes}
    names = list(modes)
    for index in range(passes):
        for name in names if index % 2 == 0 else names[::-1]:
            ExitLoop.row_loop = modes[name]
            times[name] += one_pass()
    ExitLoop.row_loop = ROW_LOOP
    return {name: 1000 * statistics.median(values) for name, values in times.items()}


def loop_pass(loop: ExitLoop, batches: list) -> list[float]:
    times = []
    for batch in batches:
        began = time.perf_counter()
        loop.run(*batch)
        times.append(time.perf_counter() - began)
    return times


def serve_pass(batcher: LayerwiseBatcher, inputs: list) -> list[float]:
    times = []
    for tokens in inputs:
        job = Job(*tokens)
        began = time.perf_counter()
        batcher.submit(job)
        batcher._admit(block=False)
        while batcher._has_work():
            batcher._iteration()
        job.future.result(timeout=0)
        times.append(time.perf_counter() - began)
    return times


def measure(ckpt: str, precision: str, policy: str | None, texts: list[str], passes: int) -> dict:
    engine = Engine(ckpt, executor="onnxruntime", precision=precision, policy=policy)
    encoded = encode_truncating(engine.tokenizer, texts, None, engine.max_length, 0)
    pad = engine.tokenizer.pad_token_id
    batches = [collate(encoded, [i], pad, engine.device) for i in range(len(texts))]
    loop = engine.exit_loop()
    with torch.inference_mode(), engine._executor.host_ops():
        row = [int(loop.run(*b).exit_layer) for b in batches]
        ExitLoop.row_loop = _layer_by_layer
        layered = [int(loop.run(*b).exit_layer) for b in batches]
        ExitLoop.row_loop = ROW_LOOP
        result = {"loop_ms": interleaved(lambda: loop_pass(loop, batches), passes)}
        batcher = LayerwiseBatcher(
            loop, num_layers=engine.num_layers, pad_token_id=pad, device=engine.device,
            max_batch_tokens=16384, max_batch_requests=None,
            metrics=ServeMetrics(engine.num_layers), split_cost=engine.split_cost,
        )  # fmt: skip
        inputs = [tokenize(engine.tokenizer, [(t, None)], engine.max_length, True) for t in texts]
        result["serve_ms"] = interleaved(lambda: serve_pass(batcher, inputs), passes)
    result["policy"] = repr(engine.policy)
    result["exits_equal"] = sum(a == b for a, b in zip(row, layered, strict=True))
    result["inputs"] = len(texts)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", help="checkpoint (default: the cached SST-2 one)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--inputs", type=int, default=300)
    parser.add_argument("--passes", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/results/row_graph")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ckpt = str(args.ckpt or default_checkpoint())
    texts = load_split(get_task("sst2"), "dev").texts[: args.inputs]
    report = {"environment": environment(), "command": " ".join(sys.argv), "results": {}}
    for precision in ("int8", "fp32"):
        for policy in (None, "none"):
            key = f"{precision}, {'default policy' if policy is None else 'full depth'}"
            report["results"][key] = measure(ckpt, precision, policy, texts, args.passes)
            print(key, report["results"][key], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
