"""Batch-1 latency on a GPU: graph mode (eeengine.cuda_graph.GraphRunner, one CUDA graph replay,
no host sync) against the same loop run eagerly (eeengine.runtime.early_exit_forward on a GPU:
eeengine.static_loop, no host sync, every layer runs) with the fused Triton op and with the
plain-torch reference.

Random MiniLM-sized model (6 layers, hidden 384, 12 heads; the shape of
benchmark_exit_head_step.py), batch 1. Policy ``budget`` at k = 1, 3, 6 makes every row exit at
layer k, so the graph's IF nodes skip L - k layers; the eager loop runs every layer.
Providers run interleaved (each repetition runs each once, in turn); each call is timed
end to end with a device synchronize after it (the measurement's, not the engine's).

Run from the repository root on a GPU machine:
    python benchmarks/benchmark_graph_mode.py [--seq-len 64] [--reps 300] [--out PATH]
Writes PATH.json and PATH.csv (median, p20, p80 in ms per provider and exit layer) and prints a
table with the device name.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from benchmark_exit_head_step import minilm_config

from eeengine.cuda_graph import GraphRunner
from eeengine.modeling_multiexit import MultiExitBert
from eeengine.policies.budget import BudgetPolicy
from eeengine.runtime import early_exit_forward

EXIT_LAYERS = (1, 3, 6)
QUANTILES = {"median": 50, "p20": 20, "p80": 80}


def providers(
    model: MultiExitBert, policy: BudgetPolicy, inputs: tuple
) -> dict[str, Callable[[], object]]:
    """The calls to time, by provider name, each on the same batch."""
    runner = GraphRunner(model, policy, "triton")
    return {
        "graph": lambda: runner(*inputs),
        "plain-triton": lambda: early_exit_forward(model, policy, *inputs, backend="triton"),
        "plain-reference": lambda: early_exit_forward(model, policy, *inputs, backend="reference"),
    }


def measure(calls: dict[str, Callable[[], object]], reps: int, warmup: int) -> dict[str, dict]:
    """Interleaved latencies in ms: quantiles per provider."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for rep in range(warmup + reps):
        for name, call in calls.items():
            torch.cuda.synchronize()
            start = time.perf_counter()
            call()
            torch.cuda.synchronize()
            if rep >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {
        name: {q: statistics.quantiles(t, n=100)[p - 1] for q, p in QUANTILES.items()}
        for name, t in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--reps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmark_graph_mode"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmark_graph_mode needs a CUDA GPU")
    torch.manual_seed(0)
    model = MultiExitBert(minilm_config(), num_labels=2).eval().cuda()
    input_ids = torch.randint(1000, 2000, (1, args.seq_len), device="cuda")
    ones = torch.ones_like(input_ids)
    inputs = (input_ids, ones, ones * 0)
    device = torch.cuda.get_device_name()
    rows = []
    with torch.inference_mode():
        for exit_layer in EXIT_LAYERS:
            policy = BudgetPolicy(layer=exit_layer)
            results = measure(providers(model, policy, inputs), args.reps, args.warmup)
            for provider, quantiles in results.items():
                rows.append({"exit_layer": exit_layer, "provider": provider, **quantiles})
    report = {"device": device, "seq_len": args.seq_len, "batch_size": 1, "results": rows}
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    with args.out.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"{device}, batch 1, seq {args.seq_len}, ms (median [p20, p80])")
    for row in rows:
        print(
            f"exit at layer {row['exit_layer']}  {row['provider']:<16} "
            f"{row['median']:.3f} [{row['p20']:.3f}, {row['p80']:.3f}]"
        )


if __name__ == "__main__":
    main()
