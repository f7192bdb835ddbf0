"""Compare training recipes on real tasks: train a grid, then tabulate it.

Every (task, recipe, seed) cell is one ``eeengine train`` run with the same budget (the shared
arguments after ``--``), written to ``WORKDIR/TASK-RECIPE-sSEED``. A cell whose checkpoint
exists is skipped and an interrupted one resumes, so the command can be rerun until the grid
is complete. ``--jobs N`` trains N cells at once, each with ``cores / N`` torch threads (on a
small CPU two one-thread runs get more done than one two-thread run).

``report`` reads the checkpoints' ``eeengine.json`` (per-exit dev metric) and
``calibration.json`` (every policy swept over its grid on the dev set, see
:func:`eeengine.evaluation.sweep`) and writes, per task, the mean and standard deviation over
seeds of:

- the dev metric of each exit (points);
- under the ``pcee`` and ``elbert`` policies, the best metric among swept points whose layer
  speed-up L / average exit layer is at least 1.5x, 2x and 3x (a fixed speed budget, so the
  recipes are compared on the same footing).

The claims checked with it (RESULTS.md): ELBERT (Xie et al. 2021) learnable loss weights beat
equal weights; BERxiT (Xin et al. 2021) alternating fine-tuning beats joint training on the
trade-off; PCEE-BERT (Zhang et al. 2022) weighting the loss by depth helps the deep exits.

Usage::

    python -m eeengine.training.compare_recipes run --tasks mrpc rte --seeds 1 2 3 \\
        --workdir /tmp/recipes --jobs 2 -- --epochs 1 --max-seq-length 128
    python -m eeengine.training.compare_recipes report --workdir /tmp/recipes \\
        --out results/recipes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from matplotlib.figure import Figure

from eeengine.selection import choose_for_speedup
from eeengine.training.recipes import RECIPES

SPEEDUPS = (1.5, 2.0, 3.0)
# Layer speed-ups of the curves in the figure.
CURVE_SPEEDUPS = tuple(1 + 0.25 * i for i in range(13))
TRADE_OFF_POLICIES = ("pcee", "elbert")


def cell_dir(workdir: Path, task: str, recipe: str, seed: int) -> Path:
    return workdir / f"{task}-{recipe}-s{seed}"


def run_grid(
    tasks: list[str],
    recipes: list[str],
    seeds: list[int],
    workdir: Path,
    train_args: list[str],
    jobs: int = 1,
) -> list[tuple[Path, int]]:
    """Train every missing (task, recipe, seed) checkpoint under ``workdir``.

    Cells run in the order task, seed, recipe, so a grid stopped early holds whole seeds.
    Each run's output goes to ``workdir/logs/CELL.log``.

    Returns:
        (checkpoint dir, exit status) of each cell trained by this call (0: success).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "logs").mkdir(exist_ok=True)
    cells = [
        (task, recipe, seed)
        for task in tasks
        for seed in seeds
        for recipe in recipes
        if not (cell_dir(workdir, task, recipe, seed) / "eeengine.json").exists()
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // jobs)))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")

    def train_cell(cell: tuple[str, str, int]) -> tuple[Path, int]:
        task, recipe, seed = cell
        out = cell_dir(workdir, task, recipe, seed)
        command = [sys.executable, "-m", "eeengine.cli", "train", "--task", task]
        command += ["--recipe", recipe, "--seed", str(seed), "--out", str(out), *train_args]
        started = time.time()
        with open(workdir / "logs" / f"{out.name}.log", "w") as log:
            status = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        print(f"{out.name}: exit {status} after {time.time() - started:.0f} s", flush=True)
        return out, status

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(train_cell, cells))


def read_cell(path: Path) -> dict:
    """One trained cell: its task, recipe, seed, per-exit dev metric and trade-off.

    Returns:
        ``{"task", "recipe", "seed", "metric", "seconds", "per_exit": [L floats], "learned"
        (the recipe's learned parameters, e.g. ELBERT's loss weights),
        "trade_off": {policy: {"1.5": metric or None, ...}}, "curve": {policy: [metric or
        None per CURVE_SPEEDUPS]}}``; metrics in points.
    """
    manifest = json.loads((path / "eeengine.json").read_text())
    calibration = json.loads((path / "calibration.json").read_text())
    training = manifest["training"]

    def best_at(policy: str, target: float) -> float | None:
        chosen = choose_for_speedup(calibration, target, policy)
        return None if chosen is None else chosen[1]["metric"]

    policies = [p for p in TRADE_OFF_POLICIES if p in calibration["policies"]]
    return {
        "task": manifest["task"]["name"],
        "recipe": training["recipe"],
        "seed": training["config"]["seed"],
        "metric": training["dev_metric"],
        "seconds": training["seconds"],
        "per_exit": training["dev_exit_metrics"],
        "learned": training.get("recipe_learned") or {},
        "trade_off": {p: {f"{s:g}": best_at(p, s) for s in SPEEDUPS} for p in policies},
        "curve": {p: [best_at(p, s) for s in CURVE_SPEEDUPS] for p in policies},
    }


def mean_std(values: list[float | None]) -> dict | None:
    """Mean and sample standard deviation (0 for one value) of the values that are not None;
    None when there are none. ``n`` counts the values used."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    std = statistics.stdev(present) if len(present) > 1 else 0.0
    return {"mean": statistics.fmean(present), "std": std, "n": len(present)}


def aggregate(cells: list[dict]) -> dict:
    """Per task and recipe, :func:`mean_std` over seeds of every per-exit metric and trade-off
    cell, and the paired claims of :data:`CLAIMS`.

    Returns:
        ``{task: {"metric", "recipes": {recipe: {"seeds", "per_exit", "trade_off", "curve",
        "seconds"}}, "claims": [...]}}``.
    """
    tasks: dict[str, dict] = {}
    for cell in sorted(cells, key=lambda c: (c["task"], c["seed"])):
        task = tasks.setdefault(cell["task"], {"metric": cell["metric"], "cells": {}})
        task["cells"].setdefault(cell["recipe"], []).append(cell)
    result = {}
    for name, task in tasks.items():
        recipes = {}
        for recipe in sorted(task["cells"], key=_recipe_order):
            runs = task["cells"][recipe]
            recipes[recipe] = {
                "seeds": [c["seed"] for c in runs],
                "seconds": mean_std([c["seconds"] for c in runs]),
                "learned": {
                    name: _columns([c["learned"][name] for c in runs])
                    for name in runs[0]["learned"]
                },
                "per_exit": _columns([c["per_exit"] for c in runs]),
                "trade_off": {
                    policy: {
                        target: mean_std([c["trade_off"][policy][target] for c in runs])
                        for target in runs[0]["trade_off"][policy]
                    }
                    for policy in runs[0]["trade_off"]
                },
                "curve": {
                    policy: _columns([c["curve"][policy] for c in runs])
                    for policy in runs[0]["curve"]
                },
            }
        result[name] = {
            "metric": task["metric"],
            "recipes": recipes,
            "claims": claims(task["cells"]),
        }
    return result


def _columns(rows: list[list[float | None]]) -> list[dict | None]:
    """:func:`mean_std` of each column of equally long rows (one row per seed)."""
    return [mean_std(list(column)) for column in zip(*rows, strict=True)]


def _recipe_order(recipe: str) -> int:
    return RECIPES.index(recipe) if recipe in RECIPES else len(RECIPES)


# (paper, claim, recipe, baseline, measure): "exits" averages the metric of the given exits
# (1-based; negative counts from the last), "policy@speed-up" the best metric at that speed.
CLAIMS = (
    ("ELBERT", "learnable loss weights beat equal weights", "elbert", "joint", "exits:all"),
    ("ELBERT", "learnable loss weights beat equal weights", "elbert", "joint", "elbert@2"),
    ("BERxiT", "alternating beats joint on the trade-off", "alternating", "joint", "pcee@2"),
    ("BERxiT", "alternating beats joint on the trade-off", "alternating", "joint", "elbert@2"),
    ("BERxiT", "alternating beats joint on the trade-off", "alternating", "joint", "pcee@3"),
    ("PCEE-BERT", "depth weighting helps the deep exits", "weighted", "joint", "exits:-2,-1"),
)


def _measure(cell: dict, measure: str) -> float | None:
    if measure.startswith("exits:"):
        spec = measure.removeprefix("exits:")
        per_exit = cell["per_exit"]
        chosen = per_exit if spec == "all" else [per_exit[int(i)] for i in spec.split(",")]
        return statistics.fmean(chosen)
    policy, target = measure.split("@")
    return cell["trade_off"].get(policy, {}).get(f"{float(target):g}")


def claims(cells: dict[str, list[dict]]) -> list[dict]:
    """Each claim of :data:`CLAIMS` as paired per-seed differences recipe − baseline (same
    seed, same data order): their :func:`mean_std` and how many seeds favour the recipe."""
    rows = []
    for paper, claim, recipe, baseline, measure in CLAIMS:
        if recipe not in cells or baseline not in cells:
            continue
        base = {c["seed"]: _measure(c, measure) for c in cells[baseline]}
        diffs = []
        for cell in cells[recipe]:
            value, reference = _measure(cell, measure), base.get(cell["seed"])
            if value is not None and reference is not None:
                diffs.append(value - reference)
        rows.append(
            {
                "paper": paper,
                "claim": claim,
                "recipe": recipe,
                "baseline": baseline,
                "measure": measure,
                "difference": mean_std(diffs),
                "seeds_favouring": sum(d > 0 for d in diffs),
                "seeds": len(diffs),
            }
        )
    return rows


def _fmt(stat: dict | None) -> str:
    if stat is None:
        return "none"
    if stat["n"] == 1:
        return f"{stat['mean']:.2f}"
    return f"{stat['mean']:.2f} ± {stat['std']:.2f}"


def _fmt_measure(measure: str, num_layers: int) -> str:
    if measure == "exits:all":
        return "mean of all exits"
    if measure.startswith("exits:"):
        layers = [num_layers + 1 + int(i) for i in measure.removeprefix("exits:").split(",")]
        return "mean of exits " + ", ".join(map(str, layers))
    policy, target = measure.split("@")
    return f"{policy} at ≥ {target}x"


def markdown(report: dict) -> str:
    """Per task: the per-exit table, the trade-off table and the claims, as GitHub markdown."""
    lines = []
    for task, result in report.items():
        recipes = result["recipes"]
        num_layers = len(next(iter(recipes.values()))["per_exit"])
        seeds = sorted({s for r in recipes.values() for s in r["seeds"]})
        lines += [
            f"### {task} (dev {result['metric']}, mean ± sample std over seeds "
            f"{', '.join(map(str, seeds))})",
            "",
            "| recipe | seeds | train s | "
            + " | ".join(f"exit {i}" for i in range(1, num_layers + 1))
            + " |",
            "|---" * (num_layers + 3) + "|",
        ]
        for recipe, row in recipes.items():
            exits = " | ".join(_fmt(s) for s in row["per_exit"])
            lines.append(
                f"| {recipe} | {len(row['seeds'])} | {row['seconds']['mean']:.0f} | {exits} |"
            )
        for recipe, row in recipes.items():
            for name, values in row["learned"].items():
                lines.append(
                    f"\n{recipe} learned {name} (layer 1 first): "
                    + ", ".join(f"{v['mean']:.3f}" for v in values)
                )
        policies = list(next(iter(recipes.values()))["trade_off"])
        headers = [f"{p} ≥ {t}x" for p in policies for t in (f"{s:g}" for s in SPEEDUPS)]
        lines += ["", "| recipe | " + " | ".join(headers) + " |", "|---" * (len(headers) + 1) + "|"]
        for recipe, row in recipes.items():
            cells = [_fmt(row["trade_off"][p][f"{s:g}"]) for p in policies for s in SPEEDUPS]
            lines.append(f"| {recipe} | " + " | ".join(cells) + " |")
        if result["claims"]:
            lines += [
                "",
                "| paper: claim | recipe − baseline | measure | difference | seeds favouring |",
                "|---|---|---|---|---|",
            ]
        for claim in result["claims"]:
            lines.append(
                f"| {claim['paper']}: {claim['claim']} | {claim['recipe']} − "
                f"{claim['baseline']} | {_fmt_measure(claim['measure'], num_layers)} | "
                f"{_fmt(claim['difference'])} | {claim['seeds_favouring']} / {claim['seeds']} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(report: dict) -> Figure:
    """One row per task: the per-exit metric of each recipe, and the best metric at each layer
    speed-up under ``pcee`` and ``elbert`` (seed means, error bars one std)."""
    figure = Figure(figsize=(18, 4.5 * len(report)), layout="constrained")
    axes_rows = figure.subplots(len(report), 3, squeeze=False)
    for axes, (task, result) in zip(axes_rows, report.items(), strict=True):
        for recipe, row in result["recipes"].items():
            _errorbar(axes[0], range(1, len(row["per_exit"]) + 1), row["per_exit"], recipe)
            for ax, policy in zip(axes[1:], TRADE_OFF_POLICIES, strict=True):
                if policy in row["curve"]:
                    _errorbar(ax, CURVE_SPEEDUPS, row["curve"][policy], recipe)
        axes[0].set_xlabel("exit layer")
        axes[0].set_title(f"{task}: dev {result['metric']} of each exit")
        for ax, policy in zip(axes[1:], TRADE_OFF_POLICIES, strict=True):
            ax.set_xlabel("layer speed-up L / average exit layer (at least)")
            ax.set_title(f"{task}: best {result['metric']} under {policy}")
        for ax in axes:
            ax.set_ylabel(result["metric"])
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    return figure


def _errorbar(axes: object, xs: object, stats: list[dict | None], label: str) -> None:
    points = [(x, s) for x, s in zip(xs, stats, strict=True) if s is not None]
    axes.errorbar(
        [x for x, _ in points],
        [s["mean"] for _, s in points],
        yerr=[s["std"] for _, s in points],
        marker=".",
        capsize=2,
        label=label,
    )


def write_report(workdir: Path, out: Path) -> list[Path]:
    """Aggregate every checkpoint under ``workdir`` and write ``OUT.json`` (every cell and the
    aggregate), ``OUT.md`` and ``OUT.png``.

    Raises:
        FileNotFoundError: no trained checkpoint under ``workdir``.
    """
    cells = [read_cell(p.parent) for p in sorted(workdir.glob("*/eeengine.json"))]
    if not cells:
        raise FileNotFoundError(f"no trained checkpoint (*/eeengine.json) under {workdir}")
    report = aggregate(cells)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out.with_name(f"{out.name}.{ext}") for ext in ("json", "md", "png")]
    paths[0].write_text(json.dumps({"cells": cells, "tasks": report}, indent=2) + "\n")
    paths[1].write_text(markdown(report))
    plot(report).savefig(paths[2], dpi=110)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="compare_recipes", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="train the missing cells of the grid")
    run.add_argument("--tasks", nargs="+", required=True)
    run.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    run.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    run.add_argument("--workdir", type=Path, required=True)
    run.add_argument("--jobs", type=int, default=1)
    run.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then eeengine train args")
    report = commands.add_parser("report", help="tabulate the trained cells")
    report.add_argument("--workdir", type=Path, required=True)
    report.add_argument("--out", type=Path, required=True, help="prefix of OUT.json/.md/.png")
    args = parser.parse_args(argv)
    if args.command == "run":
        train_args = [a for a in args.train_args if a != "--"]
        results = run_grid(
            args.tasks, args.recipes, args.seeds, args.workdir, train_args, args.jobs
        )
        return int(any(status for _, status in results))
    for path in write_report(args.workdir, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
