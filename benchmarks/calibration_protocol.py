"""Promised against measured: operating points chosen on a checkpoint's calibration slice
(``calibration.json``: rows held out of the training data), measured on the dev set that
played no part in choosing them.

For each checkpoint and target (the default policy, the fastest point within 0.5 / 1.0 points,
the most accurate at 2x layer speed-up): the drop below full depth promised on the slice, the
drop measured on dev, and the layer speed-up on both.

    python benchmarks/calibration_protocol.py sst2=~/.cache/eeengine/sst2-minilm-l6-v1 \\
        mrpc=/work/ckpt/v2/mrpc --out results/calibration_protocol
"""

from __future__ import annotations

import argparse
from pathlib import Path

from results_io import markdown_table, write_results

from eeengine import Engine
from eeengine.calibration import OperatingPoint, select_operating_point
from eeengine.data import get_task, load_split
from eeengine.evaluation import evaluate

TARGETS = {"max_drop 0.5": {"max_drop": 0.5}, "max_drop 1.0": {"max_drop": 1.0}}
TARGETS["target_speedup 2"] = {"target_speedup": 2.0}


def measure(task: str, ckpt: Path) -> list[dict]:
    """One row per target: promised (calibration slice) and measured (dev) metric and drop."""
    glue = get_task(task)
    dev = load_split(glue, "dev")
    base = Engine(ckpt, policy="none")
    full = evaluate(base, dev, glue.metric)["value"]
    calibration, manifest = base.calibration, base.manifest
    points: dict[str, OperatingPoint | None] = {}
    default = manifest["policy"]
    for name, target in TARGETS.items():
        try:
            points[name] = select_operating_point(calibration, **target)
        except ValueError:
            points[name] = None
    rows = []
    promised_default = manifest["training"]["default_policy"]["calibration"]
    engine = Engine(ckpt)
    measured = evaluate(engine, dev, glue.metric)
    rows.append(
        _row(
            task,
            "default policy",
            engine.policy,
            promised_default["drop"],
            promised_default["avg_exit_layer"],
            full,
            measured,
            default,
            calibration,
        )
    )
    for name, point in points.items():
        if point is None:
            rows.append({"task": task, "target": name, "point": "none reachable"})
            continue
        engine = Engine(ckpt, policy=point.name, **point.params)
        measured = evaluate(engine, dev, glue.metric)
        promised = calibration["full_depth"] - point.metric
        rows.append(
            _row(
                task,
                name,
                engine.policy,
                promised,
                point.avg_exit_layer,
                full,
                measured,
                point.to_json(),
                calibration,
            )
        )
    return rows


def _row(task, target, policy, promised_drop, promised_layer, full, measured, params, calib):
    return {
        "task": task,
        "target": target,
        "point": repr(policy),
        "calibration_full_depth": calib["full_depth"],
        "promised_drop": promised_drop,
        "promised_avg_exit_layer": promised_layer,
        "dev_full_depth": full,
        "dev_metric": measured["value"],
        "measured_drop": full - measured["value"],
        "dev_avg_exit_layer": measured["avg_exit_layer"],
        "dev_speedup": measured["speedup"],
        "params": params,
    }


def markdown(rows: list[dict]) -> str:
    header = [
        "task", "target (chosen on the calibration slice)", "point", "promised drop (slice)",
        "measured drop (dev)", "dev metric (full depth)", "avg exit layer: slice / dev",
        "dev layer speed-up",
    ]  # fmt: skip
    cells = []
    for r in rows:
        if "dev_metric" not in r:
            cells.append([r["task"], r["target"], r["point"], "", "", "", "", ""])
            continue
        cells.append([
            r["task"], r["target"], f"`{r['point']}`", f"{r['promised_drop']:+.2f}",
            f"{r['measured_drop']:+.2f}", f"{r['dev_metric']:.2f} ({r['dev_full_depth']:.2f})",
            f"{r['promised_avg_exit_layer']:.2f} / {r['dev_avg_exit_layer']:.2f}",
            f"{r['dev_speedup']:.2f}x",
        ])  # fmt: skip
    return markdown_table(header, cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="+", metavar="TASK=DIR")
    parser.add_argument("--out", default="results/calibration_protocol")
    args = parser.parse_args()
    rows = []
    for spec in args.checkpoints:
        task, _, path = spec.partition("=")
        rows += measure(task, Path(path).expanduser())
    write_results(args.out, rows, markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
