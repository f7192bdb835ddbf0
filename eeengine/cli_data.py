"""The labelled data ``eeengine eval`` and ``eeengine calibrate`` score on: the checkpoint's
calibration slice, a split of ``data/``, or the user's own dev file."""

from __future__ import annotations

import argparse
from pathlib import Path

from eeengine.data import Split, file_split, get_task, load_split
from eeengine.engine import Engine
from eeengine.training.calibration_slice import CALIBRATION_SPLIT, calibration_slice


def eval_data(
    args: argparse.Namespace, engine: Engine, default_split: str
) -> tuple[str, str, str, tuple[str, ...], Split]:
    """(task name, split name, metric, extra metrics, split) to evaluate on: the checkpoint's
    calibration slice (``--split calibration``, :mod:`eeengine.training.calibration_slice`),
    ``--task`` / ``--split`` of ``data/`` (extra metrics: the task's other official ones), or
    for a checkpoint trained on the user's files ``--dev-file`` (default: its own dev file),
    read with the columns and label names it was trained with (no extra metrics). Without
    ``--split``: ``default_split``, or ``dev`` when ``--dev-file`` is given.

    Raises:
        ValueError: ``--dev-file`` for a checkpoint not trained on user files or with
            ``--split calibration``; ``--task`` other than the checkpoint's with ``--split
            calibration``, or a calibration slice that cannot be rebuilt (what is missing
            named).
        FileNotFoundError: the data is missing.
    """
    split_name = args.split or ("dev" if args.dev_file else default_split)
    if split_name == CALIBRATION_SPLIT:
        return calibration_data(args, engine)
    trained = engine.manifest.get("training", {}).get("config", {})
    if args.dev_file and not trained.get("train_file"):
        raise ValueError("--dev-file needs a checkpoint trained with --train-file")
    if args.task is None and trained.get("train_file"):
        path = args.dev_file or trained["dev_file"]
        split = file_split(
            path,
            trained["text_column"],
            trained["label_column"],
            trained.get("text_pair_column"),
            engine.label_names,
            f"the labels of checkpoint {engine.path}",
        )
        task = engine.manifest["task"]
        return task["name"], Path(path).name, task["metric"], (), split
    task = get_task(args.task or engine.manifest["task"]["name"])
    return task.name, split_name, task.metric, task.extra_metrics, load_split(task, split_name)


def calibration_data(
    args: argparse.Namespace, engine: Engine
) -> tuple[str, str, str, tuple[str, ...], Split]:
    """`eval_data` of ``--split calibration``: the rows the trainer calibrated on,
    scored with the checkpoint's metrics."""
    if args.dev_file:
        raise ValueError(f"--dev-file or --split {CALIBRATION_SPLIT}: give one")
    task = engine.manifest["task"]
    if args.task is not None and get_task(args.task).name != task["name"]:
        raise ValueError(
            f"--split {CALIBRATION_SPLIT} is the slice of the checkpoint's task {task['name']}, "
            f"not {args.task}"
        )
    split, _ = calibration_slice(engine.manifest, engine.path)
    extra_metrics = tuple(task.get("metrics", [])[1:])
    return task["name"], CALIBRATION_SPLIT, task["metric"], extra_metrics, split
