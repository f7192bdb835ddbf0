"""The early-exit loop on a GPU with no host synchronization: ``graph`` mode.

The whole loop (embeddings, every encoder layer, every fused exit step) for one bucketed input
shape (batch, seq_len) is captured once in a CUDA graph and replayed for every batch that fits
the bucket. The host never learns which rows exited:

- the exit flags stay on the device in ``rows``: row b latches into ``out_logits[rows[b]]`` and
  ``out_layer[rows[b]]``; when it exits, ``rows[b]`` is set to the sink row B, so its later
  (ignored) exits land in the sink and its result stays latched;
- "is any row still live" is a one-element bool tensor on the device, ``any(rows < B)``, and
  layers l + 1 ... L are captured inside a CUDA graph conditional IF node on it, one node per
  layer, nested (torch 2.13 builds them during capture:
  ``CUDAGraph.get_currently_capturing_graph().begin_capture_to_if_node(pred)`` ...
  ``end_capture_to_conditional_node()``; see
  torch/_higher_order_ops/cudagraph_conditional_nodes.py). Once every row has exited, the
  rest of the graph is skipped on the GPU.

Unlike :func:`eeengine.runtime.early_exit_forward`, rows are not compacted: exited rows keep
flowing through the layers (masked, their results latched) until the whole batch is done. Rows
and columns the bucket adds are padding: padded rows start in the sink, padded tokens are masked.
Results equal the plain loop's (same exits, logits to fp32 tolerance).

Needs a CUDA device, CUDA 12.4+ (conditional nodes) and a fused GPU exit op ("triton" or
"cuda", see :func:`eeengine._custom_ops.resolve_backend`). Nothing here touches CUDA at import.
"""

from __future__ import annotations

import bisect
import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from eeengine import _custom_ops
from eeengine.modeling_multiexit import MultiExitBert
from eeengine.policies import ExitPolicy
from eeengine.runtime import ExitOutput, _exit_head_step_fused

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
SEQ_BUCKETS = (16, 32, 64, 128, 256, 512)


def bucket(size: int, buckets: Sequence[int], what: str) -> int:
    """The smallest bucket >= ``size``.

    Raises:
        ValueError: ``size`` exceeds the largest bucket (the message names ``what``).
    """
    index = bisect.bisect_left(buckets, size)
    if index == len(buckets):
        raise ValueError(f"{what} {size} exceeds the largest graph bucket {buckets[-1]}")
    return buckets[index]


@contextlib.contextmanager
def _if_node(pred: Tensor) -> Iterator[None]:
    """Capture the block into a CUDA graph IF node that runs only while ``pred`` (a
    one-element CUDA bool tensor, read on the device at this point of the stream) is true."""
    graph = torch.cuda.CUDAGraph.get_currently_capturing_graph()
    graph.begin_capture_to_if_node(pred)
    try:
        yield
    finally:
        graph.end_capture_to_conditional_node()


@dataclass
class StaticLoop:
    """The static buffers of one bucket's loop (and its graph): replay reads the inputs and
    writes the outputs.

    Attributes:
        input_ids, attention_mask, token_type_ids: (batch, seq_len) inputs, written before replay.
        rows: (batch,) int64, each row's output row: b for real rows, the sink row ``batch``
            for padding rows; written before replay (the loop works on a copy).
        state: the policy's initial state for ``batch`` rows (the loop works on copies).
        out_logits: (batch + 1, num_labels) float32; the last row is the sink.
        out_layer: (batch + 1,) int64; the last entry is the sink.
        graph: the captured loop, None until captured.
    """

    input_ids: Tensor
    attention_mask: Tensor
    token_type_ids: Tensor
    rows: Tensor
    state: dict[str, Tensor]
    out_logits: Tensor
    out_layer: Tensor
    graph: torch.cuda.CUDAGraph | None = None


def allocate_static_loop(
    model: MultiExitBert,
    policy: ExitPolicy,
    batch_size: int,
    seq_len: int,
    device: torch.device,
) -> StaticLoop:
    """The buffers of a (batch_size, seq_len) bucket on ``device``."""
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
    return StaticLoop(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        token_type_ids=torch.zeros_like(ids),
        rows=torch.arange(batch_size, device=device),
        state=policy.init_state(batch_size, device),
        out_logits=torch.zeros(batch_size + 1, model.num_labels, device=device),
        out_layer=torch.zeros(batch_size + 1, dtype=torch.long, device=device),
    )


def write_inputs(
    s: StaticLoop, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor
) -> None:
    """Copy a batch into the bucket's buffers, padding it up to the bucket, with device ops
    only (no host sync when the batch is on the buffers' device).

    Args:
        s: the bucket's buffers; the batch must fit.
        input_ids, attention_mask, token_type_ids: (n, seq_len), right-padded; mask 1 = real.
    """
    n, seq_len = input_ids.shape
    batch_size = s.rows.shape[0]
    for static, given in (
        (s.input_ids, input_ids),
        (s.attention_mask, attention_mask),
        (s.token_type_ids, token_type_ids),
    ):
        static.zero_()
        static[:n, :seq_len].copy_(given)
    s.attention_mask[n:, 0] = 1  # padding rows get one token: no all-masked attention row
    arange = torch.arange(batch_size, device=s.rows.device)
    s.rows.copy_(arange).masked_fill_(arange >= n, batch_size)  # padding rows start in the sink


def run_static_loop(
    model: MultiExitBert,
    policy: ExitPolicy,
    op: Callable[..., tuple[Tensor, Tensor]],
    s: StaticLoop,
    conditional: bool,
) -> None:
    """The early-exit loop on the buffers of ``s``, without compaction: rows that exit move
    to the sink row, so their latched results stay. With ``conditional`` (during CUDA graph
    capture), layers 2 ... L each sit in an IF node, nested, on "a row is still live".

    Args:
        model: the multi-exit model, in eval mode, on the buffers' device.
        policy: the exit policy.
        op: the fused exit step (:func:`eeengine._custom_ops.fused_op`).
        s: the bucket's buffers, inputs written (:func:`write_inputs`).
        conditional: capture the IF nodes (only while capturing a CUDA graph).
    """
    batch_size = s.rows.shape[0]
    num_layers = model.num_layers
    rows = s.rows.clone()  # the sink index ``batch_size`` marks rows that are done
    state = {name: value.clone() for name, value in s.state.items()}
    hidden_states = model.backbone.embed(s.input_ids, s.token_type_ids)
    bias = s.attention_mask.bool()[:, None, None, :]  # always a mask: no host-side check
    with contextlib.ExitStack() as nested:
        for layer in range(1, num_layers + 1):
            if conditional and layer > 1:
                nested.enter_context(_if_node(torch.any(rows < batch_size)))
            hidden_states = model.backbone.layers[layer - 1](hidden_states, bias)
            exit_mask = _exit_head_step_fused(
                op, model.exit_head(layer - 1), policy, hidden_states, s.attention_mask,
                layer, num_layers, state, rows, s.out_logits, s.out_layer,
            )  # fmt: skip
            rows.masked_fill_(exit_mask, batch_size)


class GraphRunner:
    """Run a multi-exit model with per-row early exit, one CUDA graph replay per batch.

    Args:
        model: the multi-exit model, on a CUDA device, in eval mode.
        policy: an exit policy the fused op implements (``op_code`` is not None).
        backend: the fused GPU op, "triton" or "cuda"; None for the first available.
        batch_buckets, seq_buckets: the shapes graphs are captured for, ascending; a batch is
            padded up to the next bucket (a graph is captured on first use of a bucket).

    Raises:
        ValueError: a model not on CUDA or in training mode, a policy the fused op does not
            implement, or a backend that is not available (the message says why).
    """

    def __init__(
        self,
        model: MultiExitBert,
        policy: ExitPolicy,
        backend: str | None = None,
        batch_buckets: Sequence[int] = BATCH_BUCKETS,
        seq_buckets: Sequence[int] = SEQ_BUCKETS,
    ) -> None:
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise ValueError(f"graph mode needs the model on a CUDA device, not {device}")
        if model.training:
            raise ValueError("graph mode runs the exit heads without dropout: call model.eval()")
        if getattr(policy, "op_code", None) is None:
            raise ValueError(
                f"graph mode needs a policy the fused exit op implements, not {policy.name!r}"
            )
        if backend is None:
            backend = _custom_ops.resolve_backend(None, policy, model.num_labels, device)
            if backend == "reference":
                raise ValueError("graph mode needs a fused GPU exit op ('triton' or 'cuda')")
        else:
            backend = _custom_ops.resolve_backend(backend, policy, model.num_labels, device)
        self.model = model
        self.policy = policy
        self.backend = backend
        self.device = device
        self._op = _custom_ops.fused_op(backend)
        max_positions = model.config.max_position_embeddings
        self.batch_buckets = tuple(sorted(batch_buckets))
        self.seq_buckets = tuple(sorted(s for s in seq_buckets if s <= max_positions))
        self._loops: dict[tuple[int, int], StaticLoop] = {}
        self._pool: tuple[int, int] | None = None

    def _capture(self, batch_size: int, seq_len: int) -> StaticLoop:
        """Allocate the buffers of a bucket, warm every kernel up, capture the loop."""
        device = self.device
        s = allocate_static_loop(self.model, self.policy, batch_size, seq_len, device)
        # Warm-up outside the graph runs every layer, i.e. the body of every IF node (Triton
        # compiles, cuBLAS picks its kernels), on a side stream as torch.cuda.graphs advises;
        # the IF nodes have no else side.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            run_static_loop(self.model, self.policy, self._op, s, conditional=False)
        torch.cuda.current_stream(device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        s.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(s.graph, pool=self._pool):
            run_static_loop(self.model, self.policy, self._op, s, conditional=True)
        return s

    @torch.inference_mode()
    def __call__(
        self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor
    ) -> ExitOutput:
        """Early exit for one batch by one graph replay; no host synchronization when the inputs
        are on the model's device and the bucket's graph exists (the first batch of a bucket
        captures it, which synchronizes).

        Args:
            input_ids, attention_mask, token_type_ids: (batch_size, seq_len), right-padded;
                the mask is 1 for real tokens.

        Returns:
            :class:`eeengine.runtime.ExitOutput` for the batch's rows, in order.

        Raises:
            ValueError: the batch or sequence is larger than the largest bucket.
        """
        n, seq_len = input_ids.shape
        if n == 0:
            return ExitOutput(
                torch.empty(0, self.model.num_labels, device=self.device),
                torch.empty(0, dtype=torch.long, device=self.device),
            )
        key = (
            bucket(n, self.batch_buckets, "batch size"),
            bucket(seq_len, self.seq_buckets, "sequence length"),
        )
        if key not in self._loops:
            self._loops[key] = self._capture(*key)
        s = self._loops[key]
        write_inputs(s, input_ids, attention_mask, token_type_ids)
        s.graph.replay()
        return ExitOutput(s.out_logits[:n].clone(), s.out_layer[:n].clone())
