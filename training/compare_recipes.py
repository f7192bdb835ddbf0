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

from eeengine.evaluation import choose_for_speedup
from eeengine.training.recipes import RECIPES

SPEEDUPS = (1.5, 2.0, 3.0)
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
    args = parser.parse_args(argv)
    if args.command == "run":
        train_args = [a for a in args.train_args if a != "--"]
        results = run_grid(args.tasks, args.recipes, args.seeds, args.workdir, train_args, args.jobs)
        return int(any(status for _, status in results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
