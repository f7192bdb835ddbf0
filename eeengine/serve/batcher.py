"""The model's worker thread, and the static batcher.

HTTP handlers tokenize a request into a :class:`Job` and :meth:`Batcher.submit` it; one worker
thread owns the model, forms batches from the queued inputs and fills in each input's logits
and exit layer; the job's future resolves when its last input has exited (the handler awaits
it). A handler whose client disconnects sets :attr:`Job.cancelled`, and the worker drops that
job's inputs wherever they wait.

Batch limits have text-embeddings-inference's meaning: a model call takes at most
``max_batch_requests`` inputs (each input of a client's batch counts) and at most
``max_batch_tokens`` padded tokens (inputs x longest input), and always at least one input.

:class:`StaticBatcher` is TEI's scheme: a batch runs to completion (here, through eeengine's
whole early-exit loop, :meth:`eeengine.runtime.ExitLoop.run`, or any ``run_batch`` such as a
full-depth model) before the next batch starts. The layer-wise continuous batcher is
:class:`eeengine.serve.layerwise.LayerwiseBatcher`.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor

from eeengine.batching import Encoded, check_split_cost, collate, length_sorted_batches
from eeengine.serve.metrics import ServeMetrics

# run_batch(input_ids, attention_mask, token_type_ids) -> (logits (n, C) float32, exit_layer (n,))
RunBatch = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


@dataclass(eq=False)
class JobResult:
    """What a job's future resolves to.

    Attributes:
        logits: one row of num_labels float32 values per input, in the request's order.
        exit_layer: the 1-based layer each input exited at.
        queue_seconds: submitted to the first model call that ran one of its inputs.
        inference_seconds: that call to the exit of its last input.
    """

    logits: list[list[float]]
    exit_layer: list[int]
    queue_seconds: float
    inference_seconds: float


@dataclass(eq=False)
class Job:
    """One request's inputs, tokenized (unpadded token ids, one list per input), and its
    results as the worker fills them in."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]]
    future: Future = field(default_factory=Future)
    arrival: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    started: float | None = None
    logits: list[list[float] | None] = field(init=False)
    exit_layer: list[int] = field(init=False)
    remaining: int = field(init=False)

    def __post_init__(self) -> None:
        self.logits = [None] * len(self.input_ids)
        self.exit_layer = [0] * len(self.input_ids)
        self.remaining = len(self.input_ids)


# One input: a job and the input's index in it.
Row = tuple[Job, int]


class Batcher:
    """Base of the batchers: the worker thread, its inbox, batch formation of new inputs,
    and delivery of results. Subclasses implement :meth:`_has_work` and :meth:`_iteration`.

    Args:
        num_layers: depth of the model.
        pad_token_id: the tokenizer's padding id.
        device: where batches are built.
        max_batch_tokens: padded tokens per model call (TEI ``--max-batch-tokens``).
        max_batch_requests: inputs per model call, None for no limit (TEI
            ``--max-batch-requests``).
        metrics: where to record queue, batch and exit statistics.
        host_ops: the context the worker thread runs the model in (the executor's
            :meth:`eeengine.executors.LayerExecutor.host_ops`: torch on one thread beside
            ONNX Runtime's pool).
        split_cost: what one more model call costs, in padded tokens (the engine's
            :attr:`eeengine.Engine.split_cost`): rows that would run together
            are cut into calls where a cut saves more padded tokens than this
            (:func:`eeengine.batching.split_padding`); ``math.inf`` never cuts.
    """

    name = ""

    def __init__(
        self,
        num_layers: int,
        pad_token_id: int,
        device: torch.device,
        max_batch_tokens: int,
        max_batch_requests: int | None,
        metrics: ServeMetrics,
        host_ops: Callable[[], AbstractContextManager[None]] = nullcontext,
        split_cost: float = math.inf,
    ) -> None:
        if max_batch_tokens < 1 or (max_batch_requests is not None and max_batch_requests < 1):
            raise ValueError(
                f"max_batch_tokens ({max_batch_tokens}) and max_batch_requests "
                f"({max_batch_requests}) must be positive"
            )
        self.num_layers = num_layers
        self.pad_token_id = pad_token_id
        self.device = device
        self.max_batch_tokens = max_batch_tokens
        # No request limit: the token limit bounds the inputs too (each has >= 1 token).
        self.max_batch_requests = max_batch_requests or max_batch_tokens
        self.metrics = metrics
        self._host_ops = host_ops
        self.split_cost = check_split_cost(split_cost)
        self._inbox: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._pending: deque[Row] = deque()  # inputs that have not run any layer yet
        self._stopping = False
        self._thread = threading.Thread(
            target=self._serve, name=f"eeengine-{self.name}", daemon=True
        )

    def start(self) -> None:
        """Start the worker thread."""
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job (thread-safe); its future resolves to a :class:`JobResult`."""
        self._inbox.put(job)

    def stop(self, timeout: float | None = None) -> None:
        """Finish every job submitted so far, then end the worker thread (blocks)."""
        self._inbox.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _serve(self) -> None:
        with torch.inference_mode(), self._host_ops():
            while self._admit(block=not self._has_work()):
                self._iteration()
                self.metrics.queue_size.set(self._waiting())

    def _admit(self, block: bool) -> bool:
        """Move submitted jobs into the pending inputs, waiting for one if ``block`` (never
        once stopping: the stop marker is already taken, nothing else will come).

        Returns:
            False once stopped and nothing is left to run.
        """
        try:
            item = self._inbox.get(block=block and not self._stopping)
            while True:
                if item is None:
                    self._stopping = True
                else:
                    self._pending.extend((item, i) for i in range(len(item.input_ids)))
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass
        return not (self._stopping and not self._has_work())

    def _has_work(self) -> bool:
        raise NotImplementedError

    def _waiting(self) -> int:
        """Inputs queued for a layer (the ``eeengine_queue_size`` gauge)."""
        return len(self._pending)

    def _iteration(self) -> None:
        """Run one model call (the worker loop calls it while there is work)."""
        raise NotImplementedError

    def _take_pending(self) -> list[Row]:
        """The oldest pending inputs that fit the batch limits (at least one); inputs of
        cancelled jobs are dropped."""
        rows: list[Row] = []
        longest = 0
        while self._pending:
            job, i = self._pending[0]
            if job.cancelled:
                self._pending.popleft()
                continue
            width = max(longest, len(job.input_ids[i]))
            if rows and (
                len(rows) + 1 > self.max_batch_requests
                or (len(rows) + 1) * width > self.max_batch_tokens
            ):
                break
            rows.append(self._pending.popleft())
            longest = width
        now = time.perf_counter()
        for job, _ in rows:
            if job.started is None:
                job.started = now
        return rows

    def _collate(self, rows: Sequence[Row]) -> tuple[Tensor, Tensor, Tensor]:
        """Right-padded input_ids, attention_mask, token_type_ids of ``rows``."""
        encoded = Encoded(
            [job.input_ids[i] for job, i in rows], [job.token_type_ids[i] for job, i in rows]
        )
        return collate(encoded, range(len(rows)), self.pad_token_id, self.device)

    def _finish(self, rows: Sequence[Row], logits: Tensor, layers: Sequence[int]) -> None:
        """Record the exit of ``rows`` (logits (len(rows), C), one exit layer each) and
        resolve the jobs whose last input this was."""
        now = time.perf_counter()
        for (job, i), row, layer in zip(rows, logits.tolist(), layers, strict=True):
            job.logits[i] = row
            job.exit_layer[i] = layer
            job.remaining -= 1
            self.metrics.observe_exit(layer)
            if job.remaining == 0:
                self.metrics.queue_duration.observe(job.started - job.arrival)
                self.metrics.inference_duration.observe(now - job.started)
                _resolve(
                    job,
                    JobResult(
                        job.logits, job.exit_layer, job.started - job.arrival, now - job.started
                    ),
                )

    def _run_whole(self, rows: Sequence[Row], run_batch: RunBatch) -> None:
        """One model call of the whole early-exit loop (``run_batch``, as
        :class:`StaticBatcher`'s) on ``rows``, all answered by it. Rows of jobs an earlier call
        failed (or whose client left) do not run; if the call raises, its jobs fail."""
        part = [row for row in rows if not row[0].cancelled]
        if not part:
            return
        try:
            input_ids, attention_mask, token_type_ids = self._collate(part)
            self.metrics.observe_batch(len(part), input_ids.shape[1])
            logits, exit_layer = run_batch(input_ids, attention_mask, token_type_ids)
            self._finish(part, logits, exit_layer.tolist())
        except Exception as error:  # never kill the worker: fail this call's jobs only
            self._fail([job for job, _ in part], error)

    def _fail(self, jobs: Sequence[Job], error: BaseException) -> None:
        """A model call raised: its jobs get the error, and their other inputs are dropped."""
        for job in jobs:
            job.cancelled = True
            if not job.future.done():
                try:
                    job.future.set_exception(error)
                except InvalidStateError:  # cancelled meanwhile
                    pass


def _resolve(job: Job, result: JobResult) -> None:
    try:
        job.future.set_result(result)
    except InvalidStateError:  # the handler gave up on it (client gone)
        pass


class StaticBatcher(Batcher):
    """TEI's scheme: the oldest pending inputs that fit the limits form a batch, which runs to
    completion before the next one starts. The batch runs longest input first, cut into
    model calls where a cut saves more than ``split_cost`` padded tokens
    (:func:`eeengine.batching.length_sorted_batches`, as ``Engine.predict`` does).

    Args:
        run_batch: runs one model call: (input_ids, attention_mask, token_type_ids), each
            (n, seq_len) int64, mask 1 for real tokens -> (logits (n, C) float32, exit_layer
            (n,) int64). For eeengine, :meth:`eeengine.runtime.ExitLoop.run` (rows exit inside
            the batch, the batch shrinks, and the call returns when the last row has exited).
        **limits: the arguments of :class:`Batcher`.
    """

    name = "static"

    def __init__(self, run_batch: RunBatch, **limits: object) -> None:
        super().__init__(**limits)
        self._run_batch = run_batch

    def _has_work(self) -> bool:
        return bool(self._pending)

    def _iteration(self) -> None:
        rows = self._take_pending()
        lengths = [len(job.input_ids[i]) for job, i in rows]
        for call in length_sorted_batches(lengths, max(len(rows), 1), self.split_cost):
            self._run_whole([rows[k] for k in call], self._run_batch)
