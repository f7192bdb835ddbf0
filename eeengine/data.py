"""GLUE task files in ``data/`` (copied from the GLUE release; see ``data/README.md``).

The files are read with quoting disabled (several hold unbalanced ``"``), MRPC with its UTF-8
BOM stripped, CoLA without a header.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(os.environ.get("EEENGINE_DATA", Path(__file__).resolve().parent.parent / "data"))


@dataclass(frozen=True)
class Task:
    """Where a GLUE task's files are and which columns hold the texts and the label.

    Columns are header names, or 0-based indices for files without a header. ``metric`` is the
    task's primary metric (operating points are picked by it); ``extra_metrics`` are the other
    official GLUE metrics reported beside it (keys of :data:`eeengine.metrics.METRICS`).
    """

    name: str
    folder: str
    text_column: str | int
    label_column: str | int
    text_pair_column: str | int | None = None
    label_names: tuple[str, ...] | None = None  # None: regression
    raw_labels: tuple[str, ...] | None = None  # label strings in the file, same order
    has_header: bool = True
    metric: str = "accuracy"
    extra_metrics: tuple[str, ...] = ()


TASKS = {
    task.name: task
    for task in (
        Task("sst2", "SST-2", "sentence", "label", None, ("negative", "positive"), ("0", "1")),
        Task(
            "mrpc",
            "MRPC",
            "#1 String",
            "Quality",
            "#2 String",
            ("not_equivalent", "equivalent"),
            ("0", "1"),
            metric="f1",
            extra_metrics=("accuracy",),
        ),
        Task(
            "rte",
            "RTE",
            "sentence1",
            "label",
            "sentence2",
            ("entailment", "not_entailment"),
            ("entailment", "not_entailment"),
        ),
        Task(
            "qnli",
            "QNLI",
            "question",
            "label",
            "sentence",
            ("entailment", "not_entailment"),
            ("entailment", "not_entailment"),
        ),
        Task(
            "cola",
            "CoLA",
            3,
            1,
            None,
            ("unacceptable", "acceptable"),
            ("0", "1"),
            has_header=False,
            metric="matthews",
        ),
        Task(
            "stsb",
            "STS-B",
            "sentence1",
            "score",
            "sentence2",
            metric="pearson",
            extra_metrics=("spearman",),
        ),
    )
}


@dataclass
class Split:
    """Texts and labels of one split: ``labels`` are class indices (int) or scores (float)."""

    texts: list[str]
    text_pairs: list[str] | None
    labels: list[int] | list[float]


def get_task(name: str) -> Task:
    """Look a GLUE task up by name (``sst2``, ``mrpc``, ``rte``, ``qnli``, ``cola``, ``stsb``).

    Raises:
        ValueError: unknown task name.
    """
    try:
        return TASKS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


def load_split(task: Task, split: str, data_dir: Path = DATA_DIR) -> Split:
    """Read ``data/<folder>/<split>.tsv``.

    Raises:
        FileNotFoundError: the file is missing (QNLI has no train split here).
        ValueError: a row has the wrong number of fields or an unknown label (names file/line).
    """
    path = Path(data_dir) / task.folder / f"{split}.tsv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (task {task.name}, split {split})")
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    first_line = 1
    if task.has_header:
        header, rows = rows[0], rows[1:]
        first_line = 2

        def column(c: str | int | None) -> int | None:
            return header.index(c) if isinstance(c, str) else c
    else:
        header = None

        def column(c: str | int | None) -> int | None:
            return c

    text_col, pair_col, label_col = (
        column(task.text_column),
        column(task.text_pair_column),
        column(task.label_column),
    )
    texts, pairs, labels = [], [] if pair_col is not None else None, []
    for line, row in enumerate(rows, start=first_line):
        if header is not None and len(row) != len(header):
            raise ValueError(f"{path}:{line}: {len(row)} fields, header has {len(header)}")
        texts.append(row[text_col].strip())
        if pairs is not None:
            pairs.append(row[pair_col].strip())
        raw = row[label_col]
        if task.raw_labels is None:
            labels.append(float(raw))
        elif raw in task.raw_labels:
            labels.append(task.raw_labels.index(raw))
        else:
            raise ValueError(f"{path}:{line}: label {raw!r} is not one of {task.raw_labels}")
    return Split(texts, pairs, labels)
