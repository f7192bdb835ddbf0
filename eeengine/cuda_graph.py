"""The early-exit loop on a GPU with no host synchronization: ``graph`` mode, the CUDA default.

The whole loop of :mod:`eeengine.static_loop` (embeddings, every encoder layer, token pruning,
every exit step) for one bucketed input shape (batch, seq_len) is captured once in a CUDA
graph and replayed for every batch that fits the bucket. The host never learns which rows
exited: the exit flags stay on the device (rows move to the sink row), and layers 2 ... L each
sit in a CUDA graph conditional IF node on the one-element device tensor ``any(rows < B)``, so
once every row has exited the rest of the graph is skipped on the GPU. torch builds the nodes
during capture (``CUDAGraph.get_currently_capturing_graph().begin_capture_to_if_node(pred)`` ...
``end_capture_to_conditional_node()``, torch >= 2.5 built with CUDA >= 12.4).

Three details make the same capture work on torch 2.11 and 2.13 without growing memory:

- The IF nodes are siblings, not nested: "a row is live" can only turn false, so the node of
  layer l + 1 is skipped whenever the node of layer l was. Only one node is open at a time.
- torch captures each IF body on a stream from its low-priority stream pool. Before torch 2.13
  that stream can be the capture stream itself (the pool is round robin, and
  ``torch.cuda.Stream()`` takes from it too), and capture fails. The capture stream here is
  taken from the high-priority pool, so it never comes back from the low-priority one.
- The caching allocator keeps blocks (and cuBLAS its workspace) per stream: bodies captured
  on up to 32 pool streams would each hold their own. :class:`_PinnedBodyStream` advances the
  pool so that every IF body of every graph is captured on one stream, and the loop is warmed
  up on that stream and on the capture stream before capture; all graphs share one pool.

Thresholds and the other policy parameters are captured as kernel arguments: a runner belongs
to one policy, and :class:`eeengine.device_loop.DeviceLoop` makes a new runner (recapturing)
when the policy changes, so a graph never replays stale thresholds.

Where conditional nodes do not work (CUDA < 12.4, a torch without them, a probe that fails),
:func:`conditional_nodes_unavailable` says why, and the runner captures every layer
unconditionally (still no host sync; a batch whose rows all exited early still runs every
layer), with one warning naming the reason. Nothing here touches CUDA at import.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from eeengine import _custom_ops
from eeengine.compaction import run_compacting_loop
from eeengine.modeling_multiexit import MultiExitBert
from eeengine.policies import ExitPolicy
from eeengine.runtime import ExitOutput
from eeengine.static_loop import (
    StaticLoop,
    allocate_static_loop,
    read_outputs,
    run_static_loop,
    write_inputs,
)
from eeengine.token_pruning import TokenPruning

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
SEQ_BUCKETS = (16, 32, 64, 128, 256, 512)
# Streams torch.cuda.Stream() may cycle through before the pool is taken as not round robin.
_MAX_POOL = 256


def bucket(size: int, buckets: Sequence[int], what: str) -> int:
    """The smallest bucket >= ``size``.

    Raises:
        ValueError: ``size`` exceeds the largest bucket (the message names ``what``).
    """
    index = bisect.bisect_left(buckets, size)
    if index == len(buckets):
        raise ValueError(f"{what} {size} exceeds the largest graph bucket {buckets[-1]}")
    return buckets[index]


class _PinnedBodyStream:
    """Makes every IF body capture on one stream of torch's low-priority stream pool.

    torch's ``begin_capture_to_if_node`` takes the next stream of the pool (round robin, shared
    with ``torch.cuda.Stream()``). The cycle is learnt once; before each IF node the pool is
    advanced (by taking streams) until the next one it hands out is ``self.stream``.
    """

    def __init__(self, device: torch.device) -> None:
        first = torch.cuda.Stream(device)
        cycle = [first]
        while len(cycle) < _MAX_POOL:
            stream = torch.cuda.Stream(device)
            if stream.cuda_stream == first.cuda_stream:
                break
            cycle.append(stream)
        self.device = device
        self.round_robin = 1 < len(cycle) < _MAX_POOL
        self.stream = cycle[1 % len(cycle)]
        self._before = cycle[0].cuda_stream  # the stream the pool hands out just before
        self._cycle_length = len(cycle)

    def advance(self) -> None:
        """Take streams until the pool's next one is :attr:`stream`."""
        if not self.round_robin:
            return
        for _ in range(self._cycle_length):
            if torch.cuda.Stream(self.device).cuda_stream == self._before:
                return


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


@contextlib.contextmanager
def _if_node(pred: Tensor, body: _PinnedBodyStream) -> Iterator[None]:
    """Capture the block into a CUDA graph IF node that runs only while ``pred`` (a
    one-element CUDA bool tensor, read on the device at this point of the graph) is true."""
    body.advance()
    graph = torch.cuda.CUDAGraph.get_currently_capturing_graph()
    graph.begin_capture_to_if_node(pred)
    try:
        if torch.cuda.current_stream(body.device).cuda_stream != body.stream.cuda_stream:
            _warn_once(
                "eeengine: CUDA graph IF bodies are captured on several streams (torch's "
                "stream pool is not the round robin eeengine expects); graph-pool memory may "
                "grow with every bucket"
            )
        yield
    finally:
        graph.end_capture_to_conditional_node()


@functools.cache
def conditional_nodes_unavailable(device: torch.device) -> str | None:
    """Why CUDA graph conditional IF nodes cannot be used on ``device``, or None.

    Checks that torch has them, then captures a graph with one IF node and replays it with the
    predicate true and false (a torch built with CUDA < 12.4, or a driver without conditional
    nodes, fails here). Cached per device.
    """
    if not hasattr(torch.cuda.CUDAGraph, "begin_capture_to_if_node"):
        return f"torch {torch.__version__} has no CUDA graph conditional nodes (needs >= 2.5)"
    try:
        pred = torch.zeros((), dtype=torch.bool, device=device)
        out = torch.zeros((), device=device)
        body = _PinnedBodyStream(device)
        stream = torch.cuda.Stream(device, priority=-1)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            with _if_node(pred, body):
                out.add_(1.0)
        for value in (False, True):
            pred.fill_(value)
            graph.replay()
        if float(out) != 1.0:
            return f"a CUDA graph IF node ran {float(out):g} times out of 1"
    except (RuntimeError, AttributeError) as error:
        return f"capturing a CUDA graph IF node failed: {error}"
    return None


class GraphRunner:
    """Run a multi-exit model with per-row early exit, one CUDA graph replay per batch.

    Args:
        model: the multi-exit model, on a CUDA device, in eval mode (the query/key/value
            projections are fused here, once, if they are not yet).
        policy: any exit policy the model supports.
        backend: the exit step, as :func:`eeengine._custom_ops.resolve_backend` returns it for
            the policy on this device ("triton", "cuda", or "reference": plain torch ops, also
            captured, no host sync).
        token_pruning: the MPEE token-pruning schedule, or None.
        compact: partition live rows into smaller static buffers before every layer
            (:mod:`eeengine.compaction`) instead of padding exited rows; no token pruning.
        batch_buckets, seq_buckets: the shapes graphs are captured for, ascending; a batch is
            padded up to the next bucket (a graph is captured on first use of a bucket).

    Raises:
        ValueError: a model not on CUDA or in training mode; ``compact`` with token pruning.
    """

    def __init__(
        self,
        model: MultiExitBert,
        policy: ExitPolicy,
        backend: str,
        token_pruning: TokenPruning | None = None,
        compact: bool = False,
        batch_buckets: Sequence[int] = BATCH_BUCKETS,
        seq_buckets: Sequence[int] = SEQ_BUCKETS,
    ) -> None:
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise ValueError(f"graph mode needs the model on a CUDA device, not {device}")
        if model.training:
            raise ValueError("graph mode runs the exit heads without dropout: call model.eval()")
        self.model = model
        self.policy = policy
        self.backend = _custom_ops.resolve_backend(backend, policy, model.num_labels, device)
        if compact and token_pruning is not None:
            raise ValueError("compaction (compact=True) does not support token pruning yet")
        self.conditional_unavailable = conditional_nodes_unavailable(device)
        if compact and self.conditional_unavailable is not None:
            raise ValueError(f"compaction needs conditional nodes: {self.conditional_unavailable}")
        self.token_pruning = token_pruning
        self.compact = compact
        self.device = device
        if not model.backbone.qkv_fused:
            model.backbone.fuse_qkv()
        self.batch_buckets = tuple(sorted(batch_buckets))
        max_positions = model.backbone.max_positions
        self.seq_buckets = tuple(sorted({min(s, max_positions) for s in seq_buckets}))
        if self.conditional_unavailable is not None:
            _warn_once(
                "eeengine: CUDA graphs without conditional nodes (every layer runs even when "
                f"all rows exited): {self.conditional_unavailable}"
            )
        self._loops: dict[tuple[int, int], StaticLoop] = {}
        self._pool: tuple[int, int] | None = None
        self._capture_stream = torch.cuda.Stream(device, priority=-1)
        self._body = _PinnedBodyStream(device)

    def _run(self, s: StaticLoop, conditional: bool, warm_up: bool = False) -> None:
        """The loop on ``s``: with IF nodes (capturing), or without (every layer, and with
        ``compact`` every size, for the warm-up)."""
        if_node = functools.partial(_if_node, body=self._body) if conditional else None
        if self.compact:
            run_compacting_loop(self.model, self.policy, self.backend, s, if_node, warm_up)
        else:
            run_static_loop(self.model, self.policy, self.backend, s, self.token_pruning, if_node)

    def _capture(self, batch_size: int, seq_len: int) -> StaticLoop:
        """Allocate the buffers of a bucket, warm every kernel up, capture the loop."""
        s = allocate_static_loop(self.model, batch_size, seq_len, self.device)
        current = torch.cuda.current_stream(self.device)
        # Warm-up outside the graph on both streams the capture uses (Triton compiles, cuBLAS
        # picks its kernels and allocates its per-stream workspace): every layer runs, i.e.
        # the body of every IF node; the IF nodes have no else side.
        for stream in (self._capture_stream, self._body.stream):
            stream.wait_stream(current)
            with torch.cuda.stream(stream):
                self._run(s, conditional=False, warm_up=True)
            current.wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, stream=self._capture_stream):
            self._run(s, conditional=self.conditional_unavailable is None)
        s.graph = graph
        return s

    def __call__(
        self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor
    ) -> ExitOutput:
        """Early exit for one batch by one graph replay; no host synchronization when the inputs
        are on the model's device and the bucket's graph exists (the first batch of a bucket
        captures it, which synchronizes).

        Args:
            input_ids, attention_mask, token_type_ids: (batch_size, seq_len) int64,
                right-padded; the mask is 1 for real tokens.

        Returns:
            :class:`eeengine.runtime.ExitOutput` for the batch's rows, in order, on the device
            (``tokens_kept`` set).

        Raises:
            ValueError: the batch or sequence is larger than the largest bucket.
        """
        n, seq_len = input_ids.shape
        key = (
            bucket(n, self.batch_buckets, "batch size"),
            bucket(seq_len, self.seq_buckets, "sequence length"),
        )
        with torch.inference_mode():
            if key not in self._loops:
                self._loops[key] = self._capture(*key)
            s = self._loops[key]
            write_inputs(s, input_ids, attention_mask, token_type_ids)
            s.graph.replay()
            return read_outputs(s, n)

    @property
    def buckets(self) -> list[tuple[int, int]]:
        """The (batch, seq_len) shapes captured so far."""
        return sorted(self._loops)
