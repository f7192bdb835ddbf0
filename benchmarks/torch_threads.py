"""The ONNX Runtime executor with and without its torch ops on one thread (``host_ops``).

Both variants run in one process, interleaved, on the same engines: ``on`` is the executor as
shipped (:func:`eeengine.executors.ort_environment.single_threaded_torch` around each predict
call), ``off`` runs the same calls with torch's own thread count. Batch 32 throughput over SST-2
dev and batch-1 median latency, at full depth and at the fp32 drop-1.0 point of the default
checkpoint, fp32 and int8. Run it with and without ``OMP_WAIT_POLICY=PASSIVE``: with OpenMP's
default waiting, torch's workers spin after each parallel region on the cores ONNX Runtime's
workers spin on.

    python benchmarks/torch_threads.py --threads 2 --out benchmarks/results/torch_threads
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from pathlib import Path

import torch
from results_io import markdown_table, write_results

from eeengine import Engine
from eeengine.data import get_task, load_split
from eeengine.defaults import default_checkpoint
from eeengine.executors.onnxruntime import OnnxRuntimeExecutor

POLICIES = {
    "full": {"policy": "none"},
    "drop1.0": {"policy": "elbert", "threshold": 0.5, "window": 3, "window_test": "monotonic"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", type=Path, help="checkpoint (default: the cached SST-2 one)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-inputs", type=int, default=150)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/torch_threads"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ckpt = args.ckpt or default_checkpoint()
    texts = load_split(get_task("sst2"), "dev").texts
    batches = [texts[i : i + 32] for i in range(0, len(texts), 32)]
    engines = {
        f"{precision}_{name}": Engine(ckpt, precision=precision, **kwargs)
        for precision in ("fp32", "int8")
        for name, kwargs in POLICIES.items()
    }
    shipped = OnnxRuntimeExecutor.host_ops
    variants = {"on": shipped, "off": lambda self: contextlib.nullcontext()}
    rates = {(e, v): [] for e in engines for v in variants}
    latency = {(e, v): [] for e in engines for v in variants}
    for repeat in range(args.repeats):
        for variant in list(variants)[:: 1 if repeat % 2 else -1]:
            OnnxRuntimeExecutor.host_ops = variants[variant]
            for name, engine in engines.items():
                for batch in batches[:3]:  # warm up
                    engine.predict(batch, batch_size=32)
                start = time.perf_counter()
                for batch in batches:
                    engine.predict(batch, batch_size=32)
                rates[(name, variant)].append(len(texts) / (time.perf_counter() - start))
                chunk = texts[repeat * args.latency_inputs : (repeat + 1) * args.latency_inputs]
                for text in chunk:
                    began = time.perf_counter()
                    engine.predict(text)
                    latency[(name, variant)].append(1000 * (time.perf_counter() - began))
    OnnxRuntimeExecutor.host_ops = shipped
    rows = []
    for name in engines:
        on, off = max(rates[(name, "on")]), max(rates[(name, "off")])
        lat_on = statistics.median(latency[(name, "on")])
        lat_off = statistics.median(latency[(name, "off")])
        rows.append({
            "engine": name, "b32_on": on, "b32_off": off, "b32_ratio": on / off,
            "b1_ms_on": lat_on, "b1_ms_off": lat_off, "b1_ratio": lat_off / lat_on,
        })  # fmt: skip
    env = {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    report = {"threads": args.threads, "environment": env, "rows": rows}
    lines = [
        f"OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']}, {args.threads} threads",
        "",
        markdown_table(
            ["engine", "b32 /s, one torch thread", "b32 /s, torch's threads", "ratio",
             "b1 ms, one", "b1 ms, torch's", "ratio"],
            [
                [r["engine"], f"{r['b32_on']:.0f}", f"{r['b32_off']:.0f}", f"{r['b32_ratio']:.2f}x",
                 f"{r['b1_ms_on']:.2f}", f"{r['b1_ms_off']:.2f}", f"{r['b1_ratio']:.2f}x"]
                for r in rows
            ],
        ),
    ]  # fmt: skip
    table = "\n".join(lines)
    write_results(args.out, report, table)
    print(table)


if __name__ == "__main__":
    main()
