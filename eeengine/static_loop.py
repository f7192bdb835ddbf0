"""The early-exit loop without host synchronization: static shapes, exited rows padded, not dropped.

This is the GPU loop. The compaction loop of :func:`eeengine.runtime.early_exit_forward` needs
the host to know how many rows are left after every layer (a sync per layer on a GPU); this
loop never asks. Every tensor keeps the shape of the batch it started with:

- ``rows[b]`` is where row b latches its result: b while the row is live, the sink row ``B``
  (one extra row of every output buffer) once it has exited, so the (ignored) exits it keeps
  taking land in the sink and its latched result stays;
- the exit step (fused op, or its plain-torch twin
  :func:`eeengine.exit_step.exit_head_step_reference`, whose latch is an ``index_copy_``) runs on
  all B rows at every layer;
- token pruning (MPEE) runs on all B rows: its output width depends only on the input width
  (:func:`eeengine.token_pruning.pruned_length`), so shapes stay static;
- ``tokens_kept[rows, l]`` is written with the same sink trick.

So the loop can be captured in a CUDA graph as it is (:mod:`eeengine.cuda_graph` puts layers
2 ... L in conditional nodes on "a row is still live"), and run eagerly on any device with
the same results as the compaction loop (tested on CPU). Its cost: exited rows keep costing
compute until the whole batch is done; :mod:`eeengine.compaction` partitions live rows into
smaller static buffers instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import Tensor

from eeengine import _custom_ops
from eeengine.exit_step import exit_head_step_fused, exit_head_step_reference
from eeengine.modeling_multiexit import MultiExitBert
from eeengine.policies import ExitPolicy
from eeengine.runtime import ExitOutput
from eeengine.token_pruning import TokenPruning

# A context manager factory that puts the ops of a block into a conditional node on a
# one-element bool tensor (:func:`eeengine.cuda_graph.if_node`), or None to run them always.
IfNode = Callable[[Tensor], AbstractContextManager[None]]


@dataclass
class StaticLoop:
    """The static buffers of one (batch, seq_len) shape: the inputs the loop reads, the outputs
    it writes (replaying a CUDA graph reads and writes exactly these).

    Attributes:
        input_ids, attention_mask, token_type_ids: (batch, seq_len) int64, right-padded, mask
            1 = real token; written by :func:`write_inputs`.
        rows: (batch,) int64, each row's output row: b for real rows, the sink ``batch`` for the
            rows :func:`write_inputs` pads (the loop works on a copy).
        out_logits: (batch + 1, num_labels) float32; the last row is the sink.
        out_layer: (batch + 1,) int64, 1-based exit layers; the last entry is the sink.
        tokens_kept: (batch + 1, num_layers) int64, real tokens of each row after each layer it
            ran, 0 after its exit layer; the last row is the sink.
        graph: the captured loop (:mod:`eeengine.cuda_graph`), None when not captured.
    """

    input_ids: Tensor
    attention_mask: Tensor
    token_type_ids: Tensor
    rows: Tensor
    out_logits: Tensor
    out_layer: Tensor
    tokens_kept: Tensor
    graph: object | None = None

    @property
    def batch_size(self) -> int:
        return self.rows.shape[0]


def allocate_static_loop(
    model: MultiExitBert, batch_size: int, seq_len: int, device: torch.device
) -> StaticLoop:
    """Zeroed buffers of a (batch_size, seq_len) loop on ``device``."""
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
    return StaticLoop(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        token_type_ids=torch.zeros_like(ids),
        rows=torch.arange(batch_size, device=device),
        out_logits=torch.zeros(batch_size + 1, model.num_labels, device=device),
        out_layer=torch.zeros(batch_size + 1, dtype=torch.long, device=device),
        tokens_kept=torch.zeros(batch_size + 1, model.num_layers, dtype=torch.long, device=device),
    )


def write_inputs(
    s: StaticLoop, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor
) -> None:
    """Copy a batch into the buffers, padded up to their shape, with device ops only (no host
    sync when the batch is on the buffers' device).

    Args:
        s: the buffers; the batch must fit (n <= batch, seq_len <= the buffers' seq_len).
        input_ids, attention_mask, token_type_ids: (n, seq_len) int64, right-padded; mask 1 =
            real token.
    """
    n, seq_len = input_ids.shape
    for static, given in (
        (s.input_ids, input_ids),
        (s.attention_mask, attention_mask),
        (s.token_type_ids, token_type_ids),
    ):
        static.zero_()
        static[:n, :seq_len].copy_(given)
    s.attention_mask[n:, 0] = 1  # padding rows get one token: no all-masked attention row
    arange = torch.arange(s.batch_size, device=s.rows.device)
    s.rows.copy_(arange).masked_fill_(arange >= n, s.batch_size)  # padding rows start in the sink


def run_static_loop(
    model: MultiExitBert,
    policy: ExitPolicy,
    backend: str,
    s: StaticLoop,
    token_pruning: TokenPruning | None = None,
    if_node: IfNode | None = None,
) -> None:
    """The early-exit loop on the buffers of ``s``, inputs written (:func:`write_inputs`);
    writes ``s.out_logits``, ``s.out_layer`` and ``s.tokens_kept``. No host sync, no
    data-dependent shape.

    Args:
        model: the multi-exit model, in eval mode, on the buffers' device (QKV fused once
            beforehand, see :meth:`eeengine.modeling_bert.LayerwiseEncoder.fuse_qkv`).
        policy: the exit policy.
        backend: the exit step: "reference" (plain torch) or a fused op (see
            :func:`eeengine._custom_ops.resolve_backend`); token pruning runs the backend's op
            (:func:`eeengine._custom_ops.prune_op`).
        s: the buffers.
        token_pruning: the MPEE token-pruning schedule, or None.
        if_node: puts layers 2 ... L, each, in a conditional node on "a row is still live"
            (while capturing a CUDA graph); None runs every layer.
    """
    batch_size, num_layers = s.batch_size, model.num_layers
    op = None if backend == "reference" else _custom_ops.fused_op(backend)
    prune = _custom_ops.prune_op(backend) if token_pruning is not None else None
    rows = s.rows.clone()  # the sink index ``batch_size`` marks rows that are done
    state = policy.init_state(batch_size, s.rows.device, model.num_labels)
    s.tokens_kept.zero_()
    attention_mask = s.attention_mask
    # Always a mask (attention_bias would check on the host whether one is needed).
    bias = attention_mask.bool()[:, None, None, :]
    # Class-attention memory of the non-[CLS] tokens (MPEE eq. 6), updated at pruning layers.
    memory = torch.zeros(batch_size, attention_mask.shape[1] - 1, device=s.rows.device)
    hidden_states = model.backbone.embed(s.input_ids, s.token_type_ids)
    for layer in range(1, num_layers + 1):
        block = contextlib.nullcontext()
        if if_node is not None and layer > 1:
            block = if_node(torch.any(rows < batch_size))
        with block:
            beta = token_pruning.beta_at(layer) if token_pruning is not None else None
            if beta is None:
                hidden_states = model.backbone.layers[layer - 1](hidden_states, bias)
            else:
                hidden_states, attention_mask, memory = model.backbone.layers[
                    layer - 1
                ].pruned_forward(
                    hidden_states, bias, attention_mask, memory, token_pruning.keep_ratio,
                    beta, prune,
                )  # fmt: skip
                bias = attention_mask.bool()[:, None, None, :]
            s.tokens_kept[:, layer - 1].index_copy_(0, rows, attention_mask.sum(1))
            step_args = (hidden_states, attention_mask, layer, num_layers, state, rows)
            head = model.exit_head(layer - 1)
            if op is not None:
                exit_mask = exit_head_step_fused(
                    op, head, policy, *step_args, s.out_logits, s.out_layer, model.lte
                )
            else:
                # A new state tensor made in the conditional node of layer l is read only by
                # the nodes of later layers, which are skipped whenever that one is.
                _, exit_mask, state = exit_head_step_reference(
                    head, policy, *step_args, s.out_logits, s.out_layer, model.lte
                )
            rows.masked_fill_(exit_mask, batch_size)


def read_outputs(s: StaticLoop, n: int) -> ExitOutput:
    """The first ``n`` rows' results, copied out of the buffers (device ops, no sync)."""
    return ExitOutput(s.out_logits[:n].clone(), s.out_layer[:n].clone(), s.tokens_kept[:n].clone())


def static_early_exit_forward(
    model: MultiExitBert,
    policy: ExitPolicy,
    input_ids: Tensor,
    attention_mask: Tensor,
    token_type_ids: Tensor,
    backend: str,
    token_pruning: TokenPruning | None = None,
) -> ExitOutput:
    """The loop run eagerly on one batch, with buffers of its own shape: the eager GPU loop
    (``Engine(..., graph=False)``), no host sync. Every layer runs (the host never learns that
    all rows exited). Same results as :func:`eeengine.runtime.early_exit_forward` on CPU.

    Args:
        model, policy, backend, token_pruning: as in :func:`run_static_loop`.
        input_ids, attention_mask, token_type_ids: (batch_size, seq_len) int64, right-padded;
            mask 1 = real token.

    Returns:
        :class:`eeengine.runtime.ExitOutput`, rows in the caller's order, ``tokens_kept`` set.
    """
    n, seq_len = input_ids.shape
    s = allocate_static_loop(model, n, seq_len, input_ids.device)
    write_inputs(s, input_ids, attention_mask, token_type_ids)
    run_static_loop(model, policy, backend, s, token_pruning)
    return read_outputs(s, n)
