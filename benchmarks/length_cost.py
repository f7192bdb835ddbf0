"""Cost and accuracy against input length on the long IMDB reviews: full depth, layer-wise
exit, and layer-wise + token-wise exit (MPEE token pruning), side by side in one process.

For each length (``--lengths``, default 128 / 256 / 512 tokens) the reviews are truncated at
that length, and three configurations of one SST-2 checkpoint run on them:

- ``full``: policy ``none``, every layer, every token;
- ``layer``: the fastest point of a sweep within ``--max-drop`` accuracy points of full depth,
  the sweep measured (``Engine.calibrate``) on the first half of the reviews at that length;
- ``layer+token``: the same with the token-pruning schedule (``--token-pruning``), the sweep
  measured with pruning.

Everything is reported on the second half of the reviews (never on what the points were picked
on): accuracy, average exit layer, MPEE's 1/ρ (FLOPs of the full model over FLOPs executed),
batch-1 latency (median ms, interleaved input by input) and throughput at ``--batch-size``
(reviews/s, best of interleaved repeats), with ratios to ``full`` at the same length.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/length_cost.py --threads 2 \
        --out benchmarks/results/length_cost_imdb
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from compare import (
    EngineRecorder,
    latency_batch1,
    load_workload,
    operating_points,
    prepare,
    throughput,
)
from environment import environment
from results_io import markdown_table, write_results

from eeengine import Engine
from eeengine.metrics import accuracy
from eeengine.token_pruning import DEFAULT_TOKEN_PRUNING


def configurations(
    ckpt: Path, workload, schedule: dict, max_drop: float, executor: str
) -> dict[str, tuple[EngineRecorder, dict]]:
    """``full``, ``layer`` and ``layer+token`` at ``workload.max_length``, each with its
    settings (policy, parameters, the calibration half's full-depth accuracy)."""
    point = f"drop{max_drop}"
    configs = {}
    for name, pruning in (("full", None), ("layer", None), ("layer+token", schedule)):
        calibrated = Engine(
            ckpt, policy="none", executor="torch", max_length=workload.max_length,
            token_pruning=pruning,
        )  # fmt: skip
        if name == "full":
            policy, params, sweep = "none", {}, {}
        else:
            points, sweep = operating_points(calibrated, workload, drops=(max_drop,))
            policy, params = points[point]
        engine = Engine(
            ckpt, policy=policy, executor=executor, max_length=workload.max_length,
            token_pruning=pruning, **params,
        )  # fmt: skip
        configs[name] = (
            EngineRecorder(engine),
            {
                "policy": policy,
                **params,
                "token_pruning": pruning,
                "calibration_full_depth": sweep.get("full_depth"),
            },
        )
    return configs


def measure(
    configs: dict, texts: list[str], gold: list[int], latency_inputs: int, batch_size: int,
    repeats: int,
) -> dict[str, dict]:  # fmt: skip
    providers = {name: recorder for name, (recorder, _) in configs.items()}
    for recorder in providers.values():  # warm up
        recorder(texts[-2:])
    times, _ = latency_batch1(providers, texts[:latency_inputs])
    for recorder in providers.values():
        recorder.reset()
    rates, labels = throughput(providers, texts, batch_size, repeats)
    rows = {}
    for name, (recorder, settings) in configs.items():
        rows[name] = {
            **settings,
            "accuracy": accuracy(labels[name], gold),
            "avg_exit_layer": recorder.exit_layers / recorder.count,
            "flops_speedup": recorder.full_flops / recorder.flops,
            "median_ms": statistics.median(times[name]),
            f"inputs_per_s_b{batch_size}": rates[name],
        }
    for name, row in rows.items():
        row["latency_vs_full"] = rows["full"]["median_ms"] / row["median_ms"]
        row["throughput_vs_full"] = rates[name] / rates["full"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, help="SST-2 checkpoint (default: the cached one)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--token-pruning", type=json.loads, default=DEFAULT_TOKEN_PRUNING)
    parser.add_argument("--max-drop", type=float, default=1.0, help="accuracy points")
    parser.add_argument("--executor", default="torch", choices=["torch", "onnxruntime"])
    parser.add_argument("--calibration-limit", type=int, help="calibrate on N reviews")
    parser.add_argument("--limit", type=int, help="report on the first N reviews")
    parser.add_argument("--latency-limit", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's default)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/length_cost_imdb"))
    args = parser.parse_args()
    ckpt = prepare(args.threads, args.ckpt)
    workload = load_workload("imdb", args.calibration_limit)
    texts, gold = workload.inputs[: args.limit], workload.labels[: args.limit]
    started = time.perf_counter()
    results = {}
    for length in args.lengths:
        workload.max_length = length
        configs = configurations(ckpt, workload, args.token_pruning, args.max_drop, args.executor)
        results[length] = measure(
            configs, texts, gold, args.latency_limit, args.batch_size, args.repeats
        )
        print(_markdown({length: results[length]}, args.batch_size), flush=True)
    report = {
        "inputs": len(texts),
        "latency_inputs": min(len(texts), args.latency_limit),
        "calibration_inputs": len(workload.calibration.texts),
        "executor": args.executor,
        "max_drop": args.max_drop,
        "seconds": time.perf_counter() - started,
        "environment": environment(),
        "checkpoint": str(ckpt),
        "lengths": results,
    }
    write_results(args.out, report, _markdown(results, args.batch_size))


def _markdown(results: dict, batch_size: int) -> str:
    header = [
        "tokens", "configuration", "policy", "accuracy", "avg exit layer", "1/ρ",
        "median ms (b=1)", "× full", f"reviews/s b={batch_size}", "× full",
    ]  # fmt: skip
    cells = []
    for length, rows in results.items():
        for name, r in rows.items():
            policy = r["policy"] + (f" τ={r['threshold']}" if "threshold" in r else "")
            if r.get("window"):
                policy += f" N={r['window']} {r.get('window_test', '')}"
            cells.append([
                length, name, policy, f"{r['accuracy']:.2f}", f"{r['avg_exit_layer']:.2f}",
                f"{r['flops_speedup']:.2f}×", f"{r['median_ms']:.1f}",
                f"{r['latency_vs_full']:.2f}", f"{r[f'inputs_per_s_b{batch_size}']:.1f}",
                f"{r['throughput_vs_full']:.2f}",
            ])  # fmt: skip
    return markdown_table(header, cells)


if __name__ == "__main__":
    main()
