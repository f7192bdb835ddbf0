"""Does a point chosen on few calibration rows keep its promise? With and without a confidence
margin (``choose_operating_point(..., confidence=...)``).

The logits of every exit are computed once, on the checkpoint's calibration slice (rows held
out of its training data) and on dev. Then, for each slice size n, ``--draws`` seeded subsets
of n slice rows each calibrate (:func:`eeengine.evaluation.sweep`); the fastest point within
``max_drop`` is chosen as measured and at each confidence, and its drop is measured on the
slice rows the subset left out (same distribution: the winner's curse alone) and on dev (also
the shift from training phrases to dev sentences, for SST-2).

    python benchmarks/calibration_confidence.py --sizes 200 500 1000 --draws 20 \\
        --out results/calibration_confidence
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from results_io import markdown_table, write_results

from eeengine import Engine
from eeengine.data import get_task, load_split
from eeengine.defaults import default_checkpoint
from eeengine.evaluation import all_exit_logits, policy_params, sweep
from eeengine.metrics import METRICS
from eeengine.policies import make_policy, run_policy
from eeengine.selection import choose_operating_point
from eeengine.training.calibration_slice import calibration_slice


def _logits(engine: Engine, split) -> torch.Tensor:
    return all_exit_logits(
        engine.model, engine.tokenizer, split.texts, split.text_pairs, engine.max_length
    )


def _measure(logits: torch.Tensor, labels: list, metric: str, name: str, point: dict) -> tuple:
    """(drop below full depth, average exit layer) of a swept point on other data."""
    exit_layer, chosen = run_policy(make_policy(name, **policy_params(point)), logits, {})
    score = METRICS[metric](chosen.argmax(-1).tolist(), labels)
    full = METRICS[metric](logits[-1].argmax(-1).tolist(), labels)
    return full - score, exit_layer.double().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", type=Path, help="checkpoint (default: the cached SST-2 one)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 500, 1000])
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--max-drops", type=float, nargs="+", default=[0.5, 1.0])
    parser.add_argument("--confidences", type=float, nargs="+", default=[0.8, 0.9])
    parser.add_argument("--out", type=Path, default=Path("results/calibration_confidence"))
    args = parser.parse_args()
    ckpt = args.ckpt or default_checkpoint()
    engine = Engine(ckpt, policy="none", executor="torch")
    task = get_task(engine.manifest["task"]["name"])
    metric = engine.manifest["task"]["metric"]
    slice_split, _ = calibration_slice(engine.manifest, ckpt)
    dev = load_split(task, "dev")
    slice_logits, dev_logits = _logits(engine, slice_split), _logits(engine, dev)
    slice_labels = list(slice_split.labels)
    rows = []
    for size in args.sizes:
        for draw in range(args.draws):
            order = torch.randperm(len(slice_labels), generator=torch.Generator().manual_seed(draw))
            chosen, rest = order[:size], order[size:]
            calibration = sweep(slice_logits[:, chosen], [slice_labels[i] for i in chosen], metric)
            rest_labels = [slice_labels[i] for i in rest]
            for max_drop in args.max_drops:
                for confidence in [None, *args.confidences]:
                    picked = choose_operating_point(calibration, max_drop, confidence=confidence)
                    if picked is None:
                        continue
                    name, point = picked
                    held_out = _measure(slice_logits[:, rest], rest_labels, metric, name, point)
                    on_dev = _measure(dev_logits, list(dev.labels), metric, name, point)
                    rows.append({
                        "size": size, "draw": draw, "max_drop": max_drop,
                        "confidence": confidence, "policy": name, **policy_params(point),
                        "promised_drop": calibration["full_depth"] - point["metric"],
                        "drop_std": point["drop_std"],
                        "held_out_drop": held_out[0], "held_out_avg_exit_layer": held_out[1],
                        "dev_drop": on_dev[0], "dev_avg_exit_layer": on_dev[1],
                    })  # fmt: skip
    summary = []
    for size in args.sizes:
        for max_drop in args.max_drops:
            for confidence in [None, *args.confidences]:
                group = [
                    r for r in rows
                    if (r["size"], r["max_drop"], r["confidence"]) == (size, max_drop, confidence)
                ]  # fmt: skip
                if not group:
                    continue
                summary.append({
                    "size": size, "max_drop": max_drop, "confidence": confidence,
                    "draws": len(group),
                    "promised_drop": statistics.mean(r["promised_drop"] for r in group),
                    "held_out_drop": statistics.mean(r["held_out_drop"] for r in group),
                    "held_out_over": sum(r["held_out_drop"] > max_drop for r in group) / len(group),
                    "dev_drop": statistics.mean(r["dev_drop"] for r in group),
                    "dev_over": sum(r["dev_drop"] > max_drop for r in group) / len(group),
                    "dev_avg_exit_layer": statistics.mean(r["dev_avg_exit_layer"] for r in group),
                })  # fmt: skip
    report = {"checkpoint": str(ckpt), "task": task.name, "metric": metric,
              "slice_rows": len(slice_labels), "dev_rows": len(dev.labels),
              "summary": summary, "rows": rows}  # fmt: skip
    table = markdown_table(
        ["calibration rows", "max_drop", "confidence", "draws", "promised drop",
         "held-out slice: drop (share over max_drop)", "dev: drop (share over)",
         "dev avg exit layer"],
        [
            [s["size"], f"{s['max_drop']:g}", s["confidence"] or "none", s["draws"],
             f"{s['promised_drop']:+.2f}", f"{s['held_out_drop']:+.2f} ({s['held_out_over']:.0%})",
             f"{s['dev_drop']:+.2f} ({s['dev_over']:.0%})", f"{s['dev_avg_exit_layer']:.2f}"]
            for s in summary
        ],
    )  # fmt: skip
    write_results(args.out, report, table)
    print(table)


if __name__ == "__main__":
    main()
