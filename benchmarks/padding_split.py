"""What cutting a batch where padding costs more than a pass buys on CPU
(:func:`eeengine.batching.length_sorted_batches` with the executor's ``split_cost``), and
what the same cut buys one ONNX Runtime session over the whole model.

SST-2 dev in calls of ``--batch-size`` consecutive sentences (a server's batches: mixed
lengths, each call padded to its longest input), or (``--data imdb``) the long movie reviews
that ``compare.py --task imdb`` reports on, at 512 tokens (``--rows``: the first N of them;
``--providers``: only those whose name contains one of the words). Every provider runs every
cost (in padded tokens, set on the engine's executor; ``inf`` never cuts) over the same
calls, in an order that reverses from repeat to repeat; the first repeat is warm-up. Reported:
sentences/s (median of the repeats), the ratio to the same provider uncut, padded tokens per
real token, passes per call, and accuracy (int8 answers depend on the rows of a pass). As in
``compare.py``, oneDNN's primitive cache is raised to 16,384 (the engines of one process
otherwise evict each other's bf16 primitives; a deployed engine is alone).

    EEENGINE_HOME=/work/eehome OMP_WAIT_POLICY=PASSIVE python benchmarks/padding_split.py \\
        --threads 2 --out benchmarks/results/padding_split
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path

os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16384")  # before torch loads oneDNN

import torch
from compare import load_workload
from interleave import interleaved
from peers import onnxruntime_provider
from results_io import markdown_table, write_results
from transformers import AutoTokenizer

from eeengine import Engine
from eeengine.batching import encode, length_sorted_batches
from eeengine.defaults import default_checkpoint

# (executor, precision, policy); policy None: the checkpoint's default (early exit).
ENGINES = [
    ("torch", "fp32", "none"),
    ("torch", "bf16", "none"),
    ("onnxruntime", "fp32", "none"),
    ("onnxruntime", "int8", "none"),
    ("torch", "fp32", None),
    ("onnxruntime", "int8", None),
]


def providers(ckpt: Path, workdir: Path, max_length: int | None, wanted: list[str]) -> dict:
    """name -> a function of (texts, cost) returning predicted class indices, for the names
    that contain a word of ``wanted`` (all if it is empty). The peers come first: ONNX
    Runtime's optimizer opens sessions of its own, which it refuses once an executor has made
    the process-wide thread pool."""

    def chosen(name: str) -> bool:
        return not wanted or any(word in name for word in wanted)

    built = {}
    base = Engine(ckpt, policy="none", executor="torch", max_length=max_length)
    for int8 in (False, True):
        name = f"one ORT session {'int8' if int8 else 'fp32'}"
        if not chosen(name):
            continue
        path = workdir / f"ort{int(int8)}"
        path.mkdir()
        peer = onnxruntime_provider(base, path, int8)[0]
        built[name] = lambda texts, cost, peer=peer: peer(texts, split_cost=cost)
    for executor, precision, policy in ENGINES:
        name = f"eeengine {executor} {precision} {policy or 'default policy'}"
        if not chosen(name):
            continue
        kwargs = {} if policy is None else {"policy": policy}
        engine = Engine(
            ckpt, executor=executor, precision=precision, max_length=max_length, **kwargs
        )

        def run(texts, cost, engine=engine):
            engine.split_cost = cost  # the cost under test, not the executor's own
            return [engine.label_names.index(p.label) for p in engine.predict(texts, len(texts))]

        built[name] = run
    return built


def measure(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    ckpt = Path(args.ckpt) if args.ckpt else default_checkpoint()
    workload = load_workload(args.data)
    texts, labels = workload.inputs[: args.rows], workload.labels[: args.rows]
    calls = [texts[i : i + args.batch_size] for i in range(0, len(texts), args.batch_size)]
    tokenizer = AutoTokenizer.from_pretrained(ckpt)  # no executor yet: see providers()
    max_length = workload.max_length or 128  # the checkpoint's own otherwise
    call_lengths = [encode(tokenizer, texts, None, max_length).lengths for texts in calls]
    real = sum(map(sum, call_lengths))
    padding, passes = {}, {}
    for cost in args.costs:
        groups = [length_sorted_batches(n, len(n), cost) for n in call_lengths]
        padded = sum(
            len(g) * n[g[0]] for n, gs in zip(call_lengths, groups, strict=True) for g in gs
        )
        padding[cost], passes[cost] = padded / real, sum(map(len, groups)) / len(calls)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, run in providers(ckpt, Path(tmp), workload.max_length, args.providers).items():
            seconds_of, predicted = interleaved(
                args.costs, lambda cost, run=run: [y for t in calls for y in run(t, cost)],
                args.repeats,
            )  # fmt: skip
            uncut = seconds_of[math.inf]
            for cost in args.costs:
                seconds = seconds_of[cost]
                correct = sum(p == y for p, y in zip(predicted[cost], labels, strict=True))
                rows.append({
                    "provider": name, "split_cost": str(cost),
                    "per_s": len(texts) / seconds, "vs_uncut": uncut / seconds,
                    "padded_per_real": padding[cost], "passes_per_call": passes[cost],
                    "accuracy": 100 * correct / len(texts),
                })  # fmt: skip
            print(*(f"{r['split_cost']}: {r['vs_uncut']:.2f}x" for r in rows[-len(args.costs) :]))
    return {"checkpoint": str(ckpt), "data": args.data, "inputs": len(texts),
            "batch_size": args.batch_size, "threads": args.threads, "rows": rows}  # fmt: skip


def markdown(report: dict) -> str:
    header = [
        "provider", "split_cost (tokens)", "sentences/s", "vs uncut", "padded / real tokens",
        "passes per call", "accuracy",
    ]  # fmt: skip
    cells = [
        [r["provider"], r["split_cost"], f"{r['per_s']:.0f}", f"{r['vs_uncut']:.2f}x",
         f"{r['padded_per_real']:.2f}", f"{r['passes_per_call']:.2f}", f"{r['accuracy']:.2f}"]
        for r in report["rows"]
    ]  # fmt: skip
    return (
        f"Batch {report['batch_size']}, {report['threads']} threads, {report['checkpoint']}\n\n"
        + markdown_table(header, cells)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", help="checkpoint (default: the cached default checkpoint)")
    parser.add_argument("--data", choices=["sst2", "imdb"], default="sst2")
    parser.add_argument("--rows", type=int, help="the first N inputs (default: all)")
    parser.add_argument("--providers", nargs="+", default=[], help="words of provider names")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--costs", type=float, nargs="+", default=[math.inf, 32, 64, 128, 256, 512])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/padding_split")
    args = parser.parse_args()
    if math.inf not in args.costs:
        args.costs.insert(0, math.inf)
    report = measure(args)
    write_results(args.out, report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
