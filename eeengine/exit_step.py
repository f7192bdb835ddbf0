"""The exit step of one layer: exit head, policy step, and the latch of exiting rows' logits and
exit layers into the caller's buffers.

:func:`exit_head_step_reference` is the plain-torch twin of the fused op
(:func:`eeengine._custom_ops.exit_head_step`: C++ on CPU, Triton or CUDA on a GPU) and the ground
truth it is tested against; :func:`exit_head_step_fused` runs the same step through that op.
Both early-exit loops use them: the compacting one (:mod:`eeengine.runtime`,
:mod:`eeengine.compaction`) and the sync-free static one (:mod:`eeengine.static_loop`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from eeengine.heads import ExitHead, LteHead
from eeengine.policies import ExitPolicy
from eeengine.policies.base import State


def exit_head_step_reference(
    head: ExitHead,
    policy: ExitPolicy,
    hidden_states: Tensor,
    attention_mask: Tensor,
    layer: int,
    num_layers: int,
    state: State,
    rows: Tensor,
    out_logits: Tensor,
    out_layer: Tensor,
    lte: LteHead | None = None,
) -> tuple[Tensor, Tensor, State]:
    """Exit head, policy step and latch in plain torch: the twin of the fused op
    :func:`eeengine._custom_ops.exit_head_step`, and the ground truth it is tested against.

    Args:
        head: the exit head of ``layer``, in eval mode.
        policy: the exit policy.
        hidden_states: (batch_size, seq_len, hidden_size), the live rows after ``layer``.
        attention_mask: (batch_size, seq_len), 1 for real tokens.
        layer: 1-based layer index; every row exits at ``layer == num_layers``.
        num_layers: depth of the model.
        state: the policy's state, rows aligned with ``hidden_states``.
        rows: (batch_size,) int64, each live row's index into ``out_logits`` / ``out_layer``.
        out_logits: (batch_size_0, num_labels) float32; exiting rows are written in place.
        out_layer: (batch_size_0,) int64; exiting rows get ``layer``, in place.
        lte: the model's learning-to-exit module; its score s_l of the head's pooled vector is
            passed to policies that need ``lte_score``.

    Returns:
        logits: (batch_size, num_labels), the dtype of the head.
        exit_mask: (batch_size,) bool, True for rows that exit at this layer.
        state: the updated state.
    """
    pooled = head.pool(hidden_states, attention_mask)
    logits = head.classify(pooled)
    signals = {"lte_score": lte(pooled)} if "lte_score" in policy.needs else {}
    exit_mask, state = policy.step(logits, layer, state, **signals)
    if layer == num_layers:
        exit_mask = torch.ones_like(exit_mask)
    outputs = policy.output_logits(logits, state)  # the logits, or MPEE's memory
    latch(outputs, exit_mask, layer, rows, out_logits, out_layer)
    return logits, exit_mask, state


def latch(
    outputs: Tensor,
    exit_mask: Tensor,
    layer: int,
    rows: Tensor,
    out_logits: Tensor,
    out_layer: Tensor,
) -> None:
    """``out_logits[rows[i]] = outputs[i]`` and ``out_layer[rows[i]] = layer`` for the rows i
    that exit, without a host sync (no boolean-mask indexing): every row writes its output row,
    non-exiting rows write back what is there. Rows may share an output row only if it is a
    sink nobody reads (:mod:`eeengine.static_loop`).

    Args:
        outputs: (batch_size, num_labels), any float dtype.
        exit_mask: (batch_size,) bool.
        layer: 1-based layer.
        rows: (batch_size,) int64 indices into ``out_logits`` / ``out_layer``.
        out_logits: (batch_size_0, num_labels) float32, written in place.
        out_layer: (batch_size_0,) int64, written in place.
    """
    current = out_logits.index_select(0, rows)
    out_logits.index_copy_(0, rows, torch.where(exit_mask[:, None], outputs.float(), current))
    out_layer.index_copy_(0, rows, out_layer.index_select(0, rows).masked_fill_(exit_mask, layer))


def exit_head_step_fused(
    op: Callable[..., tuple[Tensor, Tensor]],
    head: ExitHead,
    policy: ExitPolicy,
    hidden_states: Tensor,
    attention_mask: Tensor,
    layer: int,
    num_layers: int,
    state: State,
    rows: Tensor,
    out_logits: Tensor,
    out_layer: Tensor,
    lte: LteHead | None = None,
) -> Tensor:
    """:func:`exit_head_step_reference` through a fused op (``op``, of
    :func:`eeengine._custom_ops.fused_op`); updates ``state`` in place.

    Returns:
        exit_mask: (batch_size,) bool.
    """
    needs_score = "lte_score" in policy.needs
    if head.pooling == "mean" and not needs_score:  # fused into the op
        pooled, mask = hidden_states, attention_mask
    else:  # the LTE module reads the pooled vector too
        pooled, mask = head.pool(hidden_states, attention_mask), None
    _, exit_mask = op(
        pooled,
        mask,
        head.classifier.weight,
        head.classifier.bias,
        policy.op_code,
        policy.op_params(layer),
        layer,
        num_layers,
        [state[key] for key in policy.op_state_keys],
        rows,
        out_logits,
        out_layer,
        lte(pooled) if needs_score else None,
    )
    return exit_mask
