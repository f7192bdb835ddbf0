"""``eeengine score --ray``: the bulk-scoring job of :mod:`eeengine.scoring` on Ray Data, for
clusters.

The input is read with ``ray.data.read_csv`` / ``read_parquet`` / ``read_text`` (JSONL lines,
parsed by the actors with the single-process parser), scored by ``map_batches`` with a pool of
``actors`` actors, each holding one :class:`~eeengine.engine.Engine`, in batches of
``chunk_rows`` rows; the driver consumes the results in input order (Ray Data's
``preserve_order``) and writes them through the same resumable parts as the single-process
run (:mod:`eeengine.score_parts`), so both write the same output, and either can resume the
other's interrupted job. On resumption Ray re-reads the input from the start (Ray Data cannot
start a file at a row) and the driver drops the rows already written; their scoring is
repeated, not their output.

Needs ``pip install "eeengine[ray]"``. On a cluster (``address``) the checkpoint and input
paths must be readable by every node (shared storage), the output is written by the driver.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import pyarrow as pa

from eeengine.engine import Engine
from eeengine.scoring import (
    ScoreJob,
    ScoreSummary,
    check_columns,
    csv_options,
    file_format,
    parse_jsonl,
    rechunk,
    run_job,
    score_table,
)


class EngineActor:
    """A Ray Data actor: loads one Engine, then scores batches of the job's rows.

    Args:
        job: the scoring job.
        engine_settings: keyword arguments of :class:`Engine`.
        batch_size: rows per forward pass.
    """

    def __init__(self, job: ScoreJob, engine_settings: dict, batch_size: int) -> None:
        self.job = job
        self.batch_size = batch_size
        self.engine = Engine(**engine_settings)

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Score a batch of input rows (JSONL: a ``text`` column of lines, parsed here)."""
        if file_format(self.job.input) == "jsonl":
            lines = batch.column("text").to_pylist()
            batch = parse_jsonl(lines, self.job, [str(self.job.input)] * len(lines))
        return score_table(self.engine, batch, self.job, self.batch_size, first_row=None)


def read_dataset(job: ScoreJob):
    """The job's input as a Ray dataset of its columns (JSONL: of its lines, ``text``)."""
    import ray.data

    kind = file_format(job.input)
    path = str(job.input.resolve())
    if kind == "parquet":
        return ray.data.read_parquet(path, columns=job.columns, partitioning=None)
    if kind == "jsonl":
        return ray.data.read_text(path, encoding="utf-8-sig", drop_empty_lines=True)
    read, parse, convert = csv_options(kind, job.columns)
    return ray.data.read_csv(
        path,
        partitioning=None,
        read_options=read,
        parse_options=parse,
        convert_options=convert,
    )


def score_file_ray(
    job: ScoreJob,
    engine_settings: dict,
    batch_size: int = 32,
    overwrite: bool = False,
    progress: bool = True,
    actors: int = 2,
    address: str | None = None,
    cpus_per_actor: float = 1,
) -> ScoreSummary:
    """Score ``job.input`` into ``job.output`` on Ray Data; the output equals
    :func:`eeengine.scoring.score_file`'s.

    Args:
        engine_settings, batch_size, overwrite, progress: as
            :func:`eeengine.scoring.score_file`.
        actors: actors in the pool, one Engine each.
        address: the Ray cluster to join; None joins the Ray instance already started in this
            process, else starts a local one (with a CPU slot per actor and one for reading).
        cpus_per_actor: CPUs Ray reserves for each actor (its torch threads). The cluster
            needs more than ``actors * cpus_per_actor`` CPUs: the read tasks need one too.

    Raises:
        RuntimeError: Ray is not installed (the install command is named).
        ValueError: ``actors`` below 1; as :func:`eeengine.scoring.score_file`.
    """
    try:
        import ray
    except ImportError:
        raise RuntimeError('--ray needs Ray Data: pip install "eeengine[ray]"') from None
    if not isinstance(actors, int) or actors < 1:
        raise ValueError(f"actors must be a positive integer, got {actors!r}")
    check_columns(job)
    if not ray.is_initialized():
        # A local instance gets a CPU slot for the read tasks beside the actors' slots, or
        # the actors would hold every slot and the read could never be scheduled.
        local = (
            {}
            if address
            else {"num_cpus": max(os.cpu_count() or 1, math.ceil(actors * cpus_per_actor) + 1)}
        )
        ray.init(address=address, include_dashboard=False, log_to_driver=False, **local)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False

    def results(skip: int) -> Iterator[pa.Table]:
        scored = read_dataset(job).map_batches(
            EngineActor,
            fn_constructor_kwargs={
                "job": job,
                "engine_settings": engine_settings,
                "batch_size": batch_size,
            },
            batch_size=job.chunk_rows,
            batch_format="pyarrow",
            concurrency=actors,
            num_cpus=cpus_per_actor,
        )
        tables = (
            pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
            for batch in scored.iter_batches(batch_size=None, batch_format="pyarrow")
        )
        return rechunk(tables, job.chunk_rows, skip)

    return run_job(job, engine_settings, results, overwrite, progress)
