"""The resumable output of a scoring job (:mod:`eeengine.scoring`): one part file per chunk,
then the output assembled from them.

The parts of output ``NAME`` live in ``.NAME.parts/`` beside it: ``job.json`` (what the job
is, :func:`eeengine.scoring.job_identity`) and ``part-00000000.EXT``, ``part-00000001.EXT``,
... Each part holds ``chunk_rows`` rows (the last may hold fewer) and is written to a
temporary file, flushed to disk (fsync) and renamed (:func:`eeengine.checkpoint.write_atomic`),
so however the run ends, every part on disk is complete and the rows done are the parts
present. A rerun with the same job resumes after them; a rerun with different settings or a
changed input is refused rather than mixing two jobs' rows. When the input is done the parts
are concatenated into the output (atomically again) and the directory is removed.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from eeengine.checkpoint import write_atomic, write_json_atomic

if TYPE_CHECKING:
    from eeengine.scoring import ScoreJob

JOB_FILE = "job.json"
ROW_COLUMN = "row"  # the 0-based index of the input row


def parts_dir(output: Path) -> Path:
    """The directory of the parts of ``output``."""
    return output.parent / f".{output.name}.parts"


@dataclass
class Parts:
    """The parts directory of a running job; make one with :meth:`open`.

    Attributes:
        directory: ``.NAME.parts`` beside the output.
        output: the output file.
        kind: the output format ("csv", "tsv", "jsonl", "parquet").
        chunk_rows: rows per part.
        id_column / id_type: the id column copied from the input and its output type.
        count: complete parts so far.
    """

    directory: Path
    output: Path
    kind: str
    chunk_rows: int
    id_column: str | None
    id_type: pa.DataType
    count: int

    @classmethod
    def open(cls, job: ScoreJob, identity: dict, id_type: pa.DataType, overwrite: bool) -> Parts:
        """Resume the parts of ``job`` (a :class:`eeengine.scoring.ScoreJob`), or start them.

        Args:
            identity: what must match to resume (stored in ``job.json``).
            id_type: the output type of the id column.
            overwrite: allow replacing an existing output file.

        Raises:
            ValueError: the parts present belong to another job (the differing settings are
                named); the output exists and ``overwrite`` is false.
        """
        directory = parts_dir(job.output)
        kind = identity["output_format"]
        if directory.exists():
            stored = _read_identity(directory)
            if stored != identity:
                changed = sorted(
                    k for k in {*identity, *stored} if identity.get(k) != stored.get(k)
                )
                raise ValueError(
                    f"{directory} holds the parts of an unfinished job with other settings "
                    f"({', '.join(changed)} differ); rerun that job to finish it, or delete "
                    "the directory to start over"
                )
            for leftover in directory.glob(".*.tmp-*"):
                leftover.unlink()
            count = 0
            while (directory / _part_name(count, kind)).is_file():
                count += 1
        else:
            if job.output.exists() and not overwrite:
                raise ValueError(f"{job.output} exists; pass --overwrite to replace it")
            job.output.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f"{directory.name}.tmp-", dir=job.output.parent))
            write_json_atomic(tmp / JOB_FILE, identity)
            tmp.rename(directory)
            count = 0
        return cls(directory, job.output, kind, job.chunk_rows, job.id_column, id_type, count)

    @property
    def rows_done(self) -> int:
        """Input rows already written (at most: the last part may be short, at the end)."""
        return self.count * self.chunk_rows

    def write(self, results: pa.Table) -> None:
        """Write the next part: ``results`` (:func:`eeengine.scoring.score_table`'s columns)
        of the next ``chunk_rows`` input rows, with their ``row`` index prepended."""
        first = self.count * self.chunk_rows
        rows = pa.array(range(first, first + results.num_rows), pa.int64())
        table = results.add_column(0, ROW_COLUMN, rows)
        if self.id_column is not None:
            index = table.schema.get_field_index(self.id_column)
            table = table.set_column(index, self.id_column, table.column(index).cast(self.id_type))
        header = self.count == 0
        write_atomic(
            self.directory / _part_name(self.count, self.kind),
            lambda f: _write_table(table, self.kind, f, header),
        )
        self.count += 1

    def finish(self) -> None:
        """Assemble the output from the parts (atomically), then remove the parts."""
        parts = [self.directory / _part_name(i, self.kind) for i in range(self.count)]
        write_atomic(self.output, lambda f: _concatenate(parts, self.kind, f))
        shutil.rmtree(self.directory)


def _read_identity(directory: Path) -> dict:
    try:
        return json.loads((directory / JOB_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _part_name(index: int, kind: str) -> str:
    return f"part-{index:08d}.{kind}"


def _write_table(table: pa.Table, kind: str, f: BinaryIO, header: bool) -> None:
    """``table`` in format ``kind``; CSV/TSV with a header row when ``header`` (the first
    part), so that the text formats' parts concatenate into the output byte for byte."""
    if kind == "parquet":
        pq.write_table(table, f)
        return
    text = io.TextIOWrapper(f, encoding="utf-8", newline="")
    if kind == "jsonl":
        for row in table.to_pylist():
            text.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    else:
        writer = csv.writer(text, delimiter="," if kind == "csv" else "\t", lineterminator="\n")
        if header:
            writer.writerow(table.column_names)
        writer.writerows(zip(*(column.to_pylist() for column in table.columns), strict=True))
    text.flush()
    text.detach()


def _concatenate(parts: list[Path], kind: str, f: BinaryIO) -> None:
    if kind != "parquet":
        for part in parts:
            with open(part, "rb") as source:
                shutil.copyfileobj(source, f)
        return
    with pq.ParquetWriter(f, pq.read_schema(parts[0])) as writer:
        for part in parts:
            writer.write_table(pq.read_table(part))
