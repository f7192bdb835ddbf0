"""Do predictions depend on what else is in the batch? SST-2 dev at full depth, each precision:
every sentence alone (batch 1) against batch 32 (the engine's length-sorted batches), and batch
32 against batch 32 over a shuffled order (other batch mates).

int8 quantizes each layer's activations per call with one scale per tensor (ONNX Runtime's
dynamic quantization, as the ORT int8 peer), so a row's result depends on the rows beside it.

    python benchmarks/int8_batch_dependence.py --out benchmarks/results/int8_batch_dependence
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from results_io import markdown_table, write_results

from eeengine import Engine
from eeengine.data import get_task, load_split
from eeengine.defaults import default_checkpoint

PRECISIONS = {"fp32": {}, "int8": {}, "bf16": {"executor": "torch"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", type=Path, help="checkpoint (default: the cached SST-2 one)")
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/int8_batch_dependence")
    )
    args = parser.parse_args()
    ckpt = args.ckpt or default_checkpoint()
    texts = load_split(get_task("sst2"), "dev").texts
    order = list(range(len(texts)))
    random.Random(0).shuffle(order)
    rows = []
    for precision, kwargs in PRECISIONS.items():
        engine = Engine(ckpt, precision=precision, policy="none", **kwargs)
        alone = [engine.predict(text) for text in texts]
        batched = engine.predict(texts, batch_size=32)
        shuffled = engine.predict([texts[i] for i in order], batch_size=32)
        other = [None] * len(texts)
        for position, i in enumerate(order):
            other[i] = shuffled[position]
        pairs = list(zip(alone, batched, strict=True))
        rows.append({
            "precision": precision,
            "inputs": len(texts),
            "label_changes_alone_vs_b32": sum(a.label != b.label for a, b in pairs),
            "label_changes_b32_vs_shuffled": sum(
                a.label != b.label for a, b in zip(batched, other, strict=True)
            ),
            "max_prob_change_alone_vs_b32": max(
                abs(a.probs[k] - b.probs[k]) for a, b in pairs for k in a.probs
            ),
        })  # fmt: skip
    header = [
        "precision", "labels changed, alone vs batch 32",
        "labels changed, batch 32 vs shuffled batch 32",
        "largest probability change, alone vs batch 32",
    ]  # fmt: skip
    table = markdown_table(header, [
        [r["precision"], f"{r['label_changes_alone_vs_b32']} / {r['inputs']}",
         f"{r['label_changes_b32_vs_shuffled']} / {r['inputs']}",
         f"{r['max_prob_change_alone_vs_b32']:.4f}"]
        for r in rows
    ])  # fmt: skip
    write_results(args.out, {"checkpoint": str(ckpt), "rows": rows}, table)
    print(table)


if __name__ == "__main__":
    main()
