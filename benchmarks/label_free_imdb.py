"""Label-free calibration under a domain shift: an SST-2 checkpoint on long movie reviews.

The checkpoint's thresholds were calibrated on SST-2 sentences; on 512-token IMDB reviews they
lose points. This script calibrates without labels on the first half of the reviews (the
fastest point that agrees with full depth on at least ``--agreement`` of them,
:meth:`eeengine.Engine.calibrate`) and reports on the second half, which calibration never saw:
full depth, the checkpoint's own default policy, and the label-free point.

    python benchmarks/label_free_imdb.py --out results/label_free_imdb
"""

from __future__ import annotations

import argparse

from results_io import markdown_table, write_results

from eeengine import Engine
from eeengine.data import DATA_DIR, file_split
from eeengine.defaults import default_checkpoint
from eeengine.evaluation import evaluate

REVIEWS = DATA_DIR / "IMDB-long" / "reviews.tsv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", help="an SST-2 checkpoint (default: the built-in one)")
    parser.add_argument("--agreement", type=float, default=0.99)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--limit", type=int, help="use only the first N reviews (a smoke run)")
    parser.add_argument("--out", default="results/label_free_imdb")
    args = parser.parse_args()

    reviews = file_split(REVIEWS, "sentence", "label", None, ("0", "1"))
    n = args.limit or len(reviews.texts)
    half = n // 2
    calibration_texts = reviews.texts[:half]
    report = type(reviews)(reviews.texts[half:n], None, reviews.labels[half:n])
    ckpt = args.ckpt or default_checkpoint()

    def on_report(engine: Engine) -> dict:
        return evaluate(engine, report, "accuracy", batch_size=16)

    rows = {
        "full depth": on_report(Engine(ckpt, policy="none", max_length=args.max_length)),
        "checkpoint default (calibrated on SST-2)": on_report(
            Engine(ckpt, max_length=args.max_length)
        ),
    }
    engine = Engine(ckpt, max_length=args.max_length)
    point = engine.calibrate(calibration_texts, agreement=args.agreement, progress=True)
    rows[f"label-free, agreement >= {args.agreement:g} on the first half"] = on_report(engine)
    full = rows["full depth"]["value"]
    lines = [
        f"SST-2 checkpoint {ckpt} on IMDB reviews at {args.max_length} tokens: calibrated "
        f"without labels on reviews 1-{half}, reported on reviews {half + 1}-{n}.",
        "",
        markdown_table(
            ["policy", "accuracy", "vs full depth", "avg exit layer", "layer speed-up"],
            [
                [name, f"{r['value']:.2f}", f"{r['value'] - full:+.2f}",
                 f"{r['avg_exit_layer']:.2f}", f"{r['speedup']:.2f}x"]
                for name, r in rows.items()
            ],
        ),  # ends with a newline: the join's next one makes a blank line
        f"Label-free point: {point.describe()} (agreement on the first half).",
    ]  # fmt: skip
    result = {"point": {"name": point.name, **point.params, "agreement": point.metric}, **rows}
    write_results(args.out, result, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
