"""What the padding cut buys the full-depth pass of ``eeengine eval`` and ``calibrate``.

Every exit's logits at full depth through an engine's executor
(:func:`eeengine.evaluation.all_exit_logits`, what :meth:`eeengine.Engine.calibrate`, ``eeengine
eval`` and ``eeengine calibrate`` run, in batches of 64 over the inputs sorted by length),
with ``Engine.split_cost`` at its default (the executor's) and at ``inf`` (never cut, as
before), interleaved in one process, the order reversing from repeat to repeat; the first
repeat is warm-up. SST-2 dev, or (``--data imdb``) the reported half of the long movie
reviews at 512 tokens (``--rows``: the first N).

    EEENGINE_HOME=/work/eehome OMP_WAIT_POLICY=PASSIVE python benchmarks/eval_split.py \\
        --threads 2 --out benchmarks/results/eval_split
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from compare import load_workload
from interleave import interleaved
from results_io import markdown_table, write_results

from eeengine import Engine
from eeengine.defaults import default_checkpoint
from eeengine.evaluation import all_exit_logits

# (executor, precision)
ENGINES = [("onnxruntime", "int8"), ("onnxruntime", "fp32"), ("torch", "fp32"), ("torch", "bf16")]


def full_depth_pass(engine: Engine, texts: list[str], max_length: int) -> list[int]:
    """The last exit's class of every text, from the engine's every-exit pass."""
    logits = all_exit_logits(
        engine.model, engine.tokenizer, texts, None, max_length,
        executor=engine.exit_loop().executor,
    )  # fmt: skip
    return logits[-1].argmax(-1).tolist()


def measure(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    ckpt = Path(args.ckpt) if args.ckpt else default_checkpoint()
    workload = load_workload(args.data)
    texts, labels = workload.inputs[: args.rows], workload.labels[: args.rows]
    rows = []
    for executor, precision in ENGINES:
        engine = Engine(ckpt, policy="none", executor=executor, precision=precision)
        max_length = workload.max_length or engine.max_length
        costs = [engine.split_cost, math.inf]

        def run(cost: float, engine: Engine = engine, max_length: int = max_length) -> list[int]:
            engine.split_cost = cost
            return full_depth_pass(engine, texts, max_length)

        seconds, predicted = interleaved(costs, run, args.repeats)
        cut, uncut = (seconds[cost] for cost in costs)
        correct = {
            cost: sum(p == y for p, y in zip(predicted[cost], labels, strict=True))
            for cost in costs
        }
        rows.append({
            "engine": f"{executor} {precision}", "split_cost": costs[0], "cut_s": cut,
            "uncut_s": uncut, "speedup": uncut / cut,
            "accuracy_cut": 100 * correct[costs[0]] / len(texts),
            "accuracy_uncut": 100 * correct[math.inf] / len(texts),
        })  # fmt: skip
        print(f"{rows[-1]['engine']}: {rows[-1]['speedup']:.2f}x")
        del engine
    return {"checkpoint": str(ckpt), "data": args.data, "inputs": len(texts),
            "threads": args.threads, "repeats": args.repeats, "rows": rows}  # fmt: skip


def markdown(report: dict) -> str:
    header = [
        "engine", "split_cost (tokens)", "cut s", "uncut s", "speed-up", "accuracy cut",
        "accuracy uncut",
    ]  # fmt: skip
    cells = [
        [r["engine"], f"{r['split_cost']:g}", f"{r['cut_s']:.2f}", f"{r['uncut_s']:.2f}",
         f"{r['speedup']:.2f}x", f"{r['accuracy_cut']:.2f}", f"{r['accuracy_uncut']:.2f}"]
        for r in report["rows"]
    ]  # fmt: skip
    return (
        f"{report['data']}, {report['inputs']} inputs, every exit at full depth in batches of "
        f"64, {report['threads']} threads, median of {report['repeats']}, "
        f"{report['checkpoint']}\n\n" + markdown_table(header, cells)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", help="checkpoint (default: the cached default checkpoint)")
    parser.add_argument("--data", choices=["sst2", "imdb"], default="sst2")
    parser.add_argument("--rows", type=int, help="the first N inputs (default: all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/eval_split")
    args = parser.parse_args()
    report = measure(args)
    write_results(args.out, report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
