"""Bulk scoring (``eeengine score``): run an :class:`~eeengine.engine.Engine` over a CSV, TSV,
JSONL or Parquet file and write one output row per input row, in input order.

Memory stays bounded whatever the file size: the input is read as a stream (pyarrow's
streaming CSV reader, Parquet row batches, JSONL line by line) in chunks of ``chunk_rows``
rows; each chunk is scored and written as its own part file (:mod:`eeengine.score_parts`),
which makes the run resumable: rerunning the same command after an interruption (even
``kill -9``) continues after the last complete part, and no row is lost or written twice.

Output columns: ``row`` (the 0-based index of the input row, the header not counted), the
``id_column`` as read (when one is given), then ``label`` (the predicted label name),
``score`` (its probability) and ``exit_layer`` (1-based layer whose exit answered); a
regression checkpoint writes ``value`` in place of ``label`` and ``score``. The Ray Data
version of the same job is :mod:`eeengine.ray_scoring`.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from eeengine.data import json_record
from eeengine.engine import Engine
from eeengine.score_parts import ROW_COLUMN, Parts

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".parquet": "parquet"}
RESULT_COLUMNS = ("label", "score", "value", "exit_layer")
DEFAULT_CHUNK_ROWS = 4096


def file_format(path: Path) -> str:
    """ "csv", "tsv", "jsonl" or "parquet", from the suffix of ``path``.

    Raises:
        ValueError: another suffix.
    """
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: unknown file type {path.suffix!r}; use {', '.join(FORMATS)}")
    return kind


@dataclass(frozen=True)
class ScoreJob:
    """What to score and where to write it.

    Attributes:
        input: the file to score (.csv, .tsv, .jsonl or .parquet; CSV quoted as RFC 4180,
            TSV unquoted, both with a header row; JSONL one object per line, blank lines
            skipped).
        output: the file to write, in the format of its suffix.
        text_column: the column holding the text (first segment).
        text_pair_column: the column holding the second segment of sentence-pair inputs.
        id_column: a column copied to the output (as a string, or its Parquet type).
        chunk_rows: rows read, scored and written at a time, one part file each: bounds the
            memory of the run and the work an interruption loses.

    Raises:
        ValueError: an unknown file type, a chunk size below 1, an id column named like an
            output column.
        FileNotFoundError: the input file does not exist.
    """

    input: Path
    output: Path
    text_column: str
    text_pair_column: str | None = None
    id_column: str | None = None
    chunk_rows: int = DEFAULT_CHUNK_ROWS

    def __post_init__(self) -> None:
        object.__setattr__(self, "input", Path(self.input))
        object.__setattr__(self, "output", Path(self.output))
        file_format(self.input)
        file_format(self.output)
        if not self.input.is_file():
            raise FileNotFoundError(f"{self.input} not found")
        if not isinstance(self.chunk_rows, int) or self.chunk_rows < 1:
            raise ValueError(f"chunk_rows must be a positive integer, got {self.chunk_rows!r}")
        if self.id_column in (ROW_COLUMN, *RESULT_COLUMNS):
            raise ValueError(f"id column {self.id_column!r} clashes with an output column")

    @property
    def text_columns(self) -> list[str]:
        return [c for c in (self.text_column, self.text_pair_column) if c is not None]

    @property
    def columns(self) -> list[str]:
        """The input columns the job reads, each once."""
        return list(dict.fromkeys([*self.text_columns, *filter(None, [self.id_column])]))


def csv_options(
    kind: str, columns: list[str]
) -> tuple[pacsv.ReadOptions, pacsv.ParseOptions, pacsv.ConvertOptions]:
    """pyarrow options that read ``columns`` of a CSV file (RFC 4180 quoting, newlines allowed
    inside quotes) or a TSV file (no quoting: a ``"`` is a plain character, as in GLUE and
    :mod:`eeengine.data`), every value as a string, blank lines skipped."""
    parse = pacsv.ParseOptions(
        delimiter="," if kind == "csv" else "\t",
        quote_char='"' if kind == "csv" else False,
        newlines_in_values=kind == "csv",
    )
    convert = pacsv.ConvertOptions(
        include_columns=columns, column_types={c: pa.string() for c in columns}
    )
    return pacsv.ReadOptions(block_size=1 << 20), parse, convert


def check_columns(job: ScoreJob) -> None:
    """Check that the input has the job's columns (JSONL: checked on every line as read).

    Raises:
        ValueError: a missing column (the columns present are named), an empty CSV/TSV file.
    """
    kind = file_format(job.input)
    if kind == "jsonl":
        return
    if kind == "parquet":
        names = pq.read_schema(job.input).names
    else:
        with open(job.input, encoding="utf-8-sig", newline="") as f:
            quoting = csv.QUOTE_MINIMAL if kind == "csv" else csv.QUOTE_NONE
            names = next(csv.reader(f, delimiter=_DELIMITERS[kind], quoting=quoting), None)
        if names is None:
            raise ValueError(f"{job.input}: the file is empty (a header row is needed)")
    _check_present(job.columns, names, str(job.input))


_DELIMITERS = {"csv": ",", "tsv": "\t"}


def _check_present(columns: list[str], names: list[str], where: str) -> None:
    for column in columns:
        if column not in names:
            raise ValueError(
                f"{where}: column {column!r} is missing; the columns are "
                f"{', '.join(map(repr, names))}"
            )


def id_type(job: ScoreJob) -> pa.DataType:
    """The output type of the id column: its Parquet type, else string."""
    if job.id_column is not None and file_format(job.input) == "parquet":
        return pq.read_schema(job.input).field(job.id_column).type
    return pa.string()


def parse_jsonl(lines: list[str], job: ScoreJob, where: list[str]) -> pa.Table:
    """The job's columns of JSONL ``lines`` (blank ones skipped) as a string table: text
    columns must hold strings; an id that is a JSON number (or any non-string) is kept as its
    JSON text, null as null. ``where[i]`` names the location of ``lines[i]`` in errors.

    Raises:
        ValueError: invalid JSON, not an object, a missing column, a non-string text.
    """
    values: dict[str, list] = {c: [] for c in job.columns}
    for line, location in zip(lines, where, strict=True):
        if not line.strip():
            continue
        record = json_record(line, location)
        _check_present(job.columns, list(record), location)
        for column in job.columns:
            value = record[column]
            if column in job.text_columns and not isinstance(value, str):
                raise ValueError(f"{location}: column {column!r} is not a string: {value!r}")
            if value is not None and not isinstance(value, str):
                value = json.dumps(value)
            values[column].append(value)
    return pa.table({c: pa.array(v, pa.string()) for c, v in values.items()})


def count_rows(job: ScoreJob) -> int:
    """Rows of the input: from the Parquet metadata, else one streaming pass.

    Raises:
        ValueError: a malformed CSV/TSV file.
    """
    kind = file_format(job.input)
    if kind == "parquet":
        return pq.ParquetFile(job.input).metadata.num_rows
    if kind == "jsonl":
        with open(job.input, encoding="utf-8-sig") as f:
            return sum(1 for line in f if line.strip())
    return sum(table.num_rows for table in _csv_tables(job, [job.text_column]))


def read_chunks(job: ScoreJob, skip: int = 0) -> Iterator[pa.Table]:
    """The job's columns as tables of ``job.chunk_rows`` rows (the last may be shorter),
    starting at row ``skip``, read as a stream.

    Raises:
        ValueError: a malformed file (the file and what is wrong are named).
    """
    kind = file_format(job.input)
    if kind == "parquet":
        parquet = pq.ParquetFile(job.input)
        groups, before = [], 0
        for group in range(parquet.metadata.num_row_groups):
            rows = parquet.metadata.row_group(group).num_rows
            if before + rows <= skip and not groups:
                before += rows
            else:
                groups.append(group)
        batches = parquet.iter_batches(job.chunk_rows, row_groups=groups, columns=job.columns)
        tables = (pa.Table.from_batches([batch]) for batch in batches)
        yield from rechunk(tables, job.chunk_rows, skip - before)
    elif kind == "jsonl":
        yield from rechunk(_jsonl_tables(job), job.chunk_rows, skip)
    else:
        yield from rechunk(_csv_tables(job, job.columns), job.chunk_rows, skip)


def _csv_tables(job: ScoreJob, columns: list[str]) -> Iterator[pa.Table]:
    try:
        reader = pacsv.open_csv(job.input, *csv_options(file_format(job.input), columns))
        for batch in reader:
            yield pa.Table.from_batches([batch])
    except pa.ArrowInvalid as e:
        raise ValueError(f"{job.input}: {e}") from None


def _jsonl_tables(job: ScoreJob) -> Iterator[pa.Table]:
    with open(job.input, encoding="utf-8-sig") as f:
        lines, where = [], []
        for number, line in enumerate(f, start=1):
            if line.strip():
                lines.append(line)
                where.append(f"{job.input}:{number}")
            if len(lines) == job.chunk_rows:
                yield parse_jsonl(lines, job, where)
                lines, where = [], []
        if lines:
            yield parse_jsonl(lines, job, where)


def rechunk(tables: Iterable[pa.Table], size: int, skip: int = 0) -> Iterator[pa.Table]:
    """Tables of exactly ``size`` rows (the last may be shorter) from a stream of tables of
    any size, after dropping the stream's first ``skip`` rows. Holds at most one chunk plus one
    input table."""
    pending: list[pa.Table] = []
    count = 0
    for table in tables:
        if skip:
            dropped = min(skip, table.num_rows)
            table, skip = table.slice(dropped), skip - dropped
        if table.num_rows == 0:
            continue
        pending.append(table)
        count += table.num_rows
        while count >= size:
            whole = pa.concat_tables(pending)
            yield whole.slice(0, size)
            rest = whole.slice(size)
            pending, count = ([rest] if rest.num_rows else []), rest.num_rows
    if count:
        yield pa.concat_tables(pending)


def score_table(
    engine: Engine, table: pa.Table, job: ScoreJob, batch_size: int, first_row: int | None
) -> pa.Table:
    """Predict the rows of ``table`` (the job's columns) with ``engine``.

    Args:
        first_row: index of the table's first row in the input, to name a bad row; None when
            unknown (the row is then named by its index in ``table``).

    Returns:
        The id column (when the job has one), ``label`` (str) and ``score`` (float64), or
        ``value`` (float64) for regression, and ``exit_layer`` (int64), one row per input row.

    Raises:
        ValueError: a null, empty or whitespace-only text (its row and column are named).
    """
    texts = {c: table.column(c).to_pylist() for c in job.text_columns}
    for column, values in texts.items():
        for i, text in enumerate(values):
            if text is None or not text.strip():
                row = f"row {first_row + i}" if first_row is not None else f"row {i} of a batch"
                raise ValueError(f"{job.input}: {row}: column {column!r} is empty")
    inputs = (
        texts[job.text_column]
        if job.text_pair_column is None
        else list(zip(texts[job.text_column], texts[job.text_pair_column], strict=True))
    )
    predictions = engine.predict(inputs, batch_size=batch_size)
    columns: dict[str, pa.Array | pa.ChunkedArray] = {}
    if job.id_column is not None:
        columns[job.id_column] = table.column(job.id_column)
    if engine.label_names is None:
        columns["value"] = pa.array([p.value for p in predictions], pa.float64())
    else:
        columns["label"] = pa.array([p.label for p in predictions], pa.string())
        columns["score"] = pa.array([p.score for p in predictions], pa.float64())
    columns["exit_layer"] = pa.array([p.exit_layer for p in predictions], pa.int64())
    return pa.table(columns)


@dataclass
class ScoreSummary:
    """What a run did.

    Attributes:
        rows: rows in the output.
        resumed_rows: of them, rows written by an earlier, interrupted run of the same job.
        seconds: wall-clock time of this run.
        avg_exit_layer: mean exit layer of the rows scored by this run (None if none were).
    """

    rows: int
    resumed_rows: int
    seconds: float
    avg_exit_layer: float | None


def job_identity(job: ScoreJob, engine_settings: dict) -> dict:
    """What must not change between an interrupted run and its resumption: the input file
    (path, size, modification time), the columns, the chunk size, the output format and the
    engine settings (checkpoint path resolved)."""
    stat = job.input.stat()
    return {
        "input": str(job.input.resolve()),
        "input_size": stat.st_size,
        "input_mtime_ns": stat.st_mtime_ns,
        "text_column": job.text_column,
        "text_pair_column": job.text_pair_column,
        "id_column": job.id_column,
        "chunk_rows": job.chunk_rows,
        "output_format": file_format(job.output),
        "engine": {
            **engine_settings,
            "checkpoint": str(Path(engine_settings["checkpoint"]).expanduser().resolve()),
        },
    }


def run_job(
    job: ScoreJob,
    engine_settings: dict,
    results: Callable[[int], Iterable[pa.Table]],
    overwrite: bool = False,
    progress: bool = True,
) -> ScoreSummary:
    """Drive a scoring job: open (or resume) its parts, write the tables ``results(skip)``
    yields, in input order from row ``skip`` on, then assemble the output.

    Raises:
        ValueError: see :meth:`eeengine.score_parts.Parts.open`; an input without rows.
    """
    started = time.perf_counter()
    check_columns(job)
    total = count_rows(job)
    if total == 0:
        raise ValueError(f"{job.input}: no rows to score")
    parts = Parts.open(job, job_identity(job, engine_settings), id_type(job), overwrite)
    resumed = min(parts.rows_done, total)
    scored = exit_layers = 0
    with tqdm(
        total=total,
        initial=resumed,
        unit="rows",
        desc=f"scoring {job.input.name}",
        disable=not progress,
    ) as bar:
        for table in rechunk(results(parts.rows_done), job.chunk_rows):
            parts.write(table)
            scored += table.num_rows
            exit_layers += pc.sum(table.column("exit_layer")).as_py()
            bar.update(table.num_rows)
    parts.finish()
    return ScoreSummary(
        rows=total,
        resumed_rows=resumed,
        seconds=time.perf_counter() - started,
        avg_exit_layer=exit_layers / scored if scored else None,
    )


def score_file(
    job: ScoreJob,
    engine_settings: dict,
    batch_size: int = 32,
    overwrite: bool = False,
    progress: bool = True,
) -> ScoreSummary:
    """Score ``job.input`` into ``job.output`` in this process (resuming an interrupted run of
    the same job).

    Args:
        engine_settings: keyword arguments of :class:`Engine` (``checkpoint``, ``policy``, ...).
        batch_size: rows per forward pass (results do not depend on it).
        overwrite: replace an existing output file (never needed to resume).
        progress: show a progress bar (rows).

    Raises:
        ValueError: a bad file or column, a bad row (named), an existing output without
            ``overwrite``, unfinished parts of a different job; Engine's errors.
    """

    def results(skip: int) -> Iterator[pa.Table]:
        engine = Engine(**engine_settings)
        for i, chunk in enumerate(read_chunks(job, skip)):
            yield score_table(engine, chunk, job, batch_size, skip + i * job.chunk_rows)

    return run_job(job, engine_settings, results, overwrite, progress)
