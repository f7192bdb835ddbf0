"""Accuracy of every exit at each precision, next to fp32, and the default policy's
operating point at each precision calibrated on the checkpoint's own held-out slice.

For each checkpoint and precision (fp32, int8, bf16):
- per-exit dev metric (the task's metric, every exit at full depth, through the engine's own
  executor at that precision: :func:`eeengine.report.per_exit_metrics`);
- the default policy (the checkpoint's policy name) with parameters picked on the calibration
  slice the trainer held out (:func:`training.plan.split_calibration`, same seed; never on
  dev), fastest within ``--max-drop`` points of full depth on that slice, then run on dev:
  dev metric and average exit layer.

    python benchmarks/precision_accuracy.py --ckpt ~/.cache/eeengine/sst2-minilm-l6-v1 \
        [--ckpt DIR ...] --out benchmarks/results/precision_accuracy [--write]

``--write`` stores each non-fp32 sweep in the checkpoint (``calibration-<precision>.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch
from results_io import markdown_table, write_results

from eeengine import Engine
from eeengine.data import get_task, load_split
from eeengine.evaluation import evaluate
from eeengine.precision import write_calibration
from eeengine.report import per_exit_metrics
from eeengine.training import TrainConfig
from eeengine.training.plan import load_dataset, split_calibration

PRECISIONS = ("fp32", "int8", "bf16")


def measure(ckpt: str, precision: str, max_drop: float, write: bool) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no calibration-<precision>.json yet
        engine = Engine(ckpt, precision=precision)
    manifest = engine.manifest
    task = get_task(manifest["task"]["name"])
    metric = manifest["task"]["metric"]
    config = TrainConfig(**{**manifest["training"]["config"], "task": task.name})
    _, calib, _ = split_calibration(config, load_dataset(config))
    dev = load_split(task, "dev")
    per_exit = per_exit_metrics(engine, dev, metric)
    name = manifest["policy"]["name"]
    point = engine.calibrate(
        calib.texts, calib.labels, calib.text_pairs, max_drop=max_drop, policy=name
    )
    if write and precision != "fp32":
        write_calibration(engine.path, precision, engine.calibration)
    result = evaluate(engine, dev, metric)
    return {
        "precision": precision,
        "executor": engine.executor,
        "per_exit": per_exit,
        "policy": point.describe(),
        "calibration_slice_full_depth": engine.calibration["full_depth"],
        "dev_metric": result["value"],
        "avg_exit_layer": result["avg_exit_layer"],
    }


def markdown(task: str, rows: list[dict]) -> str:
    layers = len(rows[0]["per_exit"])
    header = ["precision", *(f"exit {i + 1}" for i in range(layers))]
    header += ["policy", "dev", "avg exit layer"]
    cells = [
        [f"{r['precision']} ({r['executor']})", *(f"{m:.2f}" for m in r["per_exit"])]
        + [r["policy"], f"{r['dev_metric']:.2f}", f"{r['avg_exit_layer']:.2f}"]
        for r in rows
    ]
    table = markdown_table(header, cells).removesuffix("\n")  # main() joins the tables
    return (
        f"**{task}** (dev; per exit, then the default policy calibrated on the held-out slice)\n\n"
        + table
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", action="append", required=True)
    parser.add_argument("--precision", action="append", choices=PRECISIONS)
    parser.add_argument("--max-drop", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/precision_accuracy")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = {"command": " ".join(sys.argv), "tasks": {}}
    tables = []
    for ckpt in args.ckpt:
        rows = [measure(ckpt, p, args.max_drop, args.write) for p in args.precision or PRECISIONS]
        task = json.loads((Path(ckpt) / "eeengine.json").read_text())["task"]["name"]
        report["tasks"][task] = {"checkpoint": ckpt, "rows": rows}
        tables.append(markdown(task, rows))
        print(tables[-1], flush=True)
    write_results(args.out, report, "\n\n".join(tables) + "\n")


if __name__ == "__main__":
    main()
