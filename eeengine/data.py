"""Training data: the GLUE task files in ``data/`` by name, or the user's CSV / TSV / JSONL files.

GLUE files are copied from the GLUE release (see ``data/README.md``) and read with quoting
disabled (several hold unbalanced ``"``), MRPC with its UTF-8 BOM stripped, CoLA without a
header. User files: see :func:`file_dataset`.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


def _data_dir() -> Path:
    """``$EEENGINE_DATA``; else the copy of ``data/`` an installed wheel carries
    (``eeengine/_data``); else ``data/`` beside the source tree (editable installs)."""
    if os.environ.get("EEENGINE_DATA"):
        return Path(os.environ["EEENGINE_DATA"])
    packaged = Path(__file__).resolve().parent / "_data"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "data"


DATA_DIR = _data_dir()


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


@dataclass(frozen=True)
class Dataset:
    """A task ready for training: name, labels, metric and both splits.

    Attributes:
        name: the GLUE task name, or the training file's stem for user files.
        label_names: class names in index order (None: regression).
        metric: key of :data:`eeengine.metrics.METRICS` used on dev.
        extra_metrics: the task's other official metrics, reported in the calibration sweep.
    """

    name: str
    label_names: tuple[str, ...] | None
    metric: str
    train: Split
    dev: Split
    extra_metrics: tuple[str, ...] = ()


def glue_dataset(name: str, data_dir: Path = DATA_DIR) -> Dataset:
    """A GLUE task of ``data/`` by name (see :func:`get_task`), train and dev splits."""
    task = get_task(name)
    return Dataset(
        task.name,
        task.label_names,
        task.metric,
        load_split(task, "train", data_dir),
        load_split(task, "dev", data_dir),
        task.extra_metrics,
    )


FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl"}


def _rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, {column: value}) of every record of a CSV, TSV or JSONL file.

    CSV follows RFC 4180 quoting; TSV is read without quoting (a ``"`` is a plain character,
    as in GLUE); both need a header row. JSONL holds one JSON object per line (blank lines
    skipped). Values are kept as read (JSON numbers stay numbers).
    """
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: unknown file type {path.suffix!r}; use .csv, .tsv or .jsonl")
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    rows = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        if kind == "jsonl":
            for line, text in enumerate(f, start=1):
                if text.strip():
                    rows.append((line, json_record(text, f"{path}:{line}")))
            return rows
        quoting = csv.QUOTE_MINIMAL if kind == "csv" else csv.QUOTE_NONE
        reader = csv.reader(f, delimiter="," if kind == "csv" else "\t", quoting=quoting)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: the file is empty (a header row is needed)")
        for record in reader:
            if not record:
                continue
            if len(record) != len(header):
                raise ValueError(
                    f"{path}:{reader.line_num}: {len(record)} fields, the header has {len(header)}"
                )
            rows.append((reader.line_num, dict(zip(header, record, strict=True))))
    return rows


def json_record(text: str, where: str) -> dict:
    """One line of a JSONL file as a JSON object.

    Raises:
        ValueError: invalid JSON or not an object (``where`` names the file and line).
    """
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object")
    return record


def _read_file(
    path: Path,
    columns: dict[str, str],
    labels: Callable[[object, str], int | float] | None,
) -> Split:
    """Texts and labels of a user file; ``columns`` maps "text", optionally "label" and "pair"
    to column names, ``labels(value, where)`` converts a label cell (``where`` names file, line
    and column for errors); without a "label" column the split's labels are empty."""
    rows = _rows(path)
    if not rows:
        raise ValueError(f"{path}: no examples")
    texts, pairs, values = [], [] if "pair" in columns else None, []
    for line, row in rows:
        for role, column in columns.items():
            if column not in row:
                raise ValueError(
                    f"{path}:{line}: column {column!r} ({role}) is missing; "
                    f"the columns are {', '.join(map(repr, row))}"
                )
        for role in ("text", "pair"):
            if role not in columns:
                continue
            value = row[columns[role]]
            if not isinstance(value, str) or not value.strip():
                raise ValueError(
                    f"{path}:{line}: column {columns[role]!r}: empty or non-text {role} {value!r}"
                )
        texts.append(row[columns["text"]].strip())
        if pairs is not None:
            pairs.append(row[columns["pair"]].strip())
        if labels is not None:
            where = f"{path}:{line}: column {columns['label']!r}"
            values.append(labels(row[columns["label"]], where))
    return Split(texts, pairs, values)


def _columns(text_column: str, label_column: str, text_pair_column: str | None) -> dict[str, str]:
    """Role ("text", "label", "pair") -> column name."""
    columns = {"text": text_column, "label": label_column}
    if text_pair_column:
        columns["pair"] = text_pair_column
    return columns


def _label_text(value: object) -> str:
    """A label cell as a name: strings stripped, JSON numbers and booleans as written."""
    if isinstance(value, bool):
        return str(value).lower()
    return value.strip() if isinstance(value, str) else str(value)


def _number(value: object, where: str) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: regression target {value!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{where}: regression target {value!r} is not finite")
    return number


def _sort_key(name: str) -> tuple:
    """Numbers first in numeric order ("2" before "10"), then names in text order."""
    try:
        return (0, float(name), name)
    except ValueError:
        return (1, 0.0, name)


def unlabeled_file(
    path: str | Path, text_column: str, text_pair_column: str | None = None
) -> Split:
    """The texts (and text pairs) of a CSV, TSV or JSONL file without labels, for label-free
    calibration; the split's ``labels`` are empty.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unknown file type, no rows, a missing column or an empty text (file, line
            and column named).
    """
    columns = {"text": text_column, **({"pair": text_pair_column} if text_pair_column else {})}
    return _read_file(Path(path), columns, None)


def file_split(
    path: str | Path,
    text_column: str,
    label_column: str,
    text_pair_column: str | None = None,
    label_names: Sequence[str] | None = None,
    label_source: str = "the label names",
) -> Split:
    """One user file whose label names are known (a dev file, or a file to evaluate a
    checkpoint on): labels become indices into ``label_names``, or numbers when it is None
    (regression).

    Args:
        label_source: where ``label_names`` come from, for the unknown-label error.

    Raises:
        FileNotFoundError, ValueError: as :func:`file_dataset`.
    """
    columns = _columns(text_column, label_column, text_pair_column)
    if label_names is None:
        return _read_file(Path(path), columns, _number)
    index = {name: i for i, name in enumerate(label_names)}

    def label(value: object, where: str) -> int:
        name = _label_text(value)
        if name not in index:
            raise ValueError(
                f"{where}: label {name!r} does not occur in {label_source} "
                f"(labels: {', '.join(label_names)})"
            )
        return index[name]

    return _read_file(Path(path), columns, label)


def file_dataset(
    train_file: str | Path,
    dev_file: str | Path,
    text_column: str,
    label_column: str,
    text_pair_column: str | None = None,
    regression: bool = False,
) -> Dataset:
    """A task from the user's own CSV, TSV or JSONL files.

    Classification unless ``regression`` is set: labels that look numeric (0/1, 1-5 stars) are
    still classes, because guessing regression from numbers would turn every 0/1 task into
    one. Label names are the distinct labels of the training file, sorted (numerically when
    they are numbers, so "2" comes before "10"; otherwise in text order), so the class indices
    do not depend on the order of the rows. The metric is accuracy (classification) or
    Pearson correlation (regression).

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: naming file, line and column: a missing column, an empty text, a dev label
            the training file does not have, a non-numeric regression target, fewer than two
            classes, a malformed row.
    """
    train_file = Path(train_file)
    columns = (text_column, label_column, text_pair_column)
    if regression:
        train = file_split(train_file, *columns)
        return Dataset(train_file.stem, None, "pearson", train, file_split(dev_file, *columns))
    train = _read_file(train_file, _columns(*columns), lambda value, where: _label_text(value))
    label_names = tuple(sorted(set(train.labels), key=_sort_key))
    if len(label_names) < 2:
        raise ValueError(
            f"{train_file}: column {label_column!r} has {len(label_names)} distinct label(s) "
            f"{list(label_names)}; classification needs at least 2 (or pass --regression)"
        )
    train.labels = [label_names.index(name) for name in train.labels]
    dev = file_split(dev_file, *columns, label_names, f"the training file {train_file}")
    return Dataset(train_file.stem, label_names, "accuracy", train, dev)


def calibration_size(num_examples: int) -> int:
    """How many training rows a run holds out for calibration when no calibration file is
    given: 10 % of the rows, at least 100 (thresholds picked on fewer move by whole points)
    and at most 2,000 (the sweep's metric is then within about ±1 point), never more than a
    quarter of the rows."""
    return min(2000, max(100, round(0.1 * num_examples)), num_examples // 4)


def holdout_split(split: Split, size: int, seed: int, stratify: bool) -> tuple[Split, Split]:
    """Split ``split`` into (rest, held out) with ``size`` held-out rows, seeded.

    Classification (``stratify``): every class keeps its share of the rows in the held-out
    part (largest remainders decide the rounding), rows drawn at random within a class.
    Regression: rows drawn at random. Both parts keep the original row order.

    Raises:
        ValueError: ``size`` is not in [1, len(split) - 1].
    """
    n = len(split.texts)
    if not 0 < size < n:
        raise ValueError(f"cannot hold out {size} of {n} rows for calibration")
    rng = random.Random(seed)
    if stratify:
        by_class: dict[int, list[int]] = {}
        for i, label in enumerate(split.labels):
            by_class.setdefault(int(label), []).append(i)
        quotas = {c: size * len(rows) / n for c, rows in by_class.items()}
        counts = {c: math.floor(q) for c, q in quotas.items()}
        for c in sorted(quotas, key=lambda c: counts[c] - quotas[c])[: size - sum(counts.values())]:
            counts[c] += 1
        held = {i for c, rows in sorted(by_class.items()) for i in rng.sample(rows, counts[c])}
    else:
        held = set(rng.sample(range(n), size))

    def subset(keep: bool) -> Split:
        rows = [i for i in range(n) if (i in held) != keep]
        pairs = None if split.text_pairs is None else [split.text_pairs[i] for i in rows]
        return Split([split.texts[i] for i in rows], pairs, [split.labels[i] for i in rows])

    return subset(True), subset(False)
