"""The early-exit loop: layer by layer, each row stops on its own, the batch shrinks.

Per layer l: encoder layer on the live rows -> exit head -> policy step -> latch the logits and
exit layer of rows that exit -> drop them from the working batch (hidden states, mask, policy
state, and the index map back to the caller's rows). Later layers compute only on live rows.

With a token-pruning schedule (MPEE token-wise exit, :mod:`eeengine.token_pruning`), a pruning
layer runs attention, then ``token_prune`` on each row (its real tokens only; rows come out
right-padded to the batch's longest), then the feed-forward on the kept tokens.

The exit head, policy step and latch run either in plain torch (backend "reference",
:func:`exit_head_step_reference`) or as one fused op (backend "cpp" on CPU,
:func:`eeengine._custom_ops.exit_head_step`; "triton" or "cuda" on a GPU); all give the same
exits and logits. On a GPU, :mod:`eeengine.cuda_graph` runs the same loop with no host sync.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from eeengine import _custom_ops
from eeengine.executors import LayerExecutor, TorchExecutor
from eeengine.heads import ExitHead, LteHead
from eeengine.modeling_bert import attention_bias
from eeengine.modeling_multiexit import MultiExitBert
from eeengine.policies import ExitPolicy
from eeengine.policies.base import State
from eeengine.token_pruning import TokenPruning, token_prune_reference


@dataclass
class ExitOutput:
    """Result of :func:`early_exit_forward` for a batch, rows in the caller's order.

    Attributes:
        logits: (batch_size, num_labels) float32, the logits of the exit each row took.
        exit_layer: (batch_size,) int64, 1-based layer at which each row exited.
        tokens_kept: (batch_size, num_layers) int64, real tokens of each row after each layer
            (the width its feed-forward ran at), 0 after its exit layer; None from graph mode
            (:mod:`eeengine.cuda_graph`, which does not prune tokens).
    """

    logits: Tensor
    exit_layer: Tensor
    tokens_kept: Tensor | None = None


class NonFiniteLogitsError(RuntimeError):
    """The logits of the exit a row took are NaN or infinite, so no prediction can be made.

    Raised by :func:`early_exit_forward` (for batch rows) and re-raised by ``Engine.predict``
    for the caller's input indices (:meth:`for_inputs`).

    Attributes:
        rows: the bad rows (batch rows, or input indices after :meth:`for_inputs`).
        layers: the 1-based exit layer of each bad row.
    """

    def __init__(self, rows: list[int], layers: list[int], what: str = "batch row") -> None:
        self.rows, self.layers = rows, layers
        listed = ", ".join(
            f"{what} {row} at layer {layer}"
            for row, layer in list(zip(rows, layers, strict=True))[:10]
        )
        super().__init__(
            f"non-finite (NaN or infinite) logits for {len(rows)} input(s): {listed}; the "
            "model's numbers overflowed, so no prediction is returned"
        )

    def for_inputs(self, indices: list[int]) -> NonFiniteLogitsError:
        """The same error naming ``indices[row]`` (the caller's input index of each row)."""
        return NonFiniteLogitsError([indices[row] for row in self.rows], self.layers, "input")


def check_finite(out: ExitOutput) -> ExitOutput:
    """``out`` when every latched logit is finite (one reduction and one host sync per batch).

    Raises:
        NonFiniteLogitsError: names the rows and the layer each exited at.
    """
    finite = torch.isfinite(out.logits).all(1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten()
        raise NonFiniteLogitsError(bad.tolist(), out.exit_layer[bad].tolist())
    return out


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
    if bool(exit_mask.any()):
        outputs = policy.output_logits(logits, state)  # the logits, or MPEE's memory
        out_logits[rows[exit_mask]] = outputs[exit_mask].float()
        out_layer[rows[exit_mask]] = layer
    return logits, exit_mask, state


def _exit_head_step_fused(
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
) -> Tensor:
    """:func:`exit_head_step_reference` through a fused op (``op``, of
    :func:`eeengine._custom_ops.fused_op`); updates ``state`` in place.

    Returns:
        exit_mask: (batch_size,) bool.
    """
    if head.pooling == "mean":  # fused into the op
        pooled, mask = hidden_states, attention_mask
    else:
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
    )
    return exit_mask


@torch.inference_mode()
def early_exit_forward(
    model: MultiExitBert,
    policy: ExitPolicy,
    input_ids: Tensor,
    attention_mask: Tensor,
    token_type_ids: Tensor,
    backend: str = "reference",
    token_pruning: TokenPruning | None = None,
    executor: LayerExecutor | None = None,
) -> ExitOutput:
    """Run the multi-exit model with per-sample early exit and batch compaction.

    Args:
        model: the multi-exit model, in eval mode.
        policy: decides after each layer which rows exit.
        input_ids, attention_mask, token_type_ids: (batch_size, seq_len); the mask is 1 for
            real tokens.
        backend: how each layer's exit head and policy step run: "reference" (plain torch,
            :func:`exit_head_step_reference`), a fused op ("cpp" on CPU, "triton" or "cuda" on
            a GPU), or None for the fastest (see :func:`eeengine._custom_ops.resolve_backend`).
            Token pruning runs the backend's op (:func:`eeengine._custom_ops.prune_op`): the
            C++ op with "cpp", the Triton op with "triton" and "cuda", else
            :func:`eeengine.token_pruning.token_prune_reference`.
        token_pruning: the token-pruning schedule, or None for none.
        executor: runs the embeddings and each encoder layer (see :mod:`eeengine.executors`);
            None: the reference :class:`eeengine.executors.TorchExecutor`. Pruning layers run
            the torch layer's ``pruned_forward`` whatever the executor.

    Returns:
        :class:`ExitOutput`. Equal, row by row, to running each row alone, and to
        :func:`eeengine.policies.run_policy` on the full-depth logits.

    Raises:
        NonFiniteLogitsError: a row's latched logits are NaN or infinite (checked once per
            batch, whatever the backend; the row and its exit layer are named).
        ValueError: an unknown backend; a fused backend where it cannot run (see
            :func:`eeengine._custom_ops.resolve_backend`), or with the model in training mode.
    """
    backend = _custom_ops.resolve_backend(backend, policy, model.num_labels, input_ids.device)
    if backend != "reference" and model.training:
        raise ValueError(
            f"backend {backend!r} runs the exit heads without dropout: call model.eval()"
        )
    op = None if backend == "reference" else _custom_ops.fused_op(backend)
    batch_size = input_ids.shape[0]
    device = input_ids.device
    num_layers = model.num_layers
    out_logits = torch.empty(batch_size, model.num_labels, dtype=torch.float32, device=device)
    out_layer = torch.empty(batch_size, dtype=torch.long, device=device)
    tokens_kept = torch.zeros(batch_size, num_layers, dtype=torch.long, device=device)
    # Imported only for a schedule: the Triton op imports triton.
    prune = token_prune_reference if token_pruning is None else _custom_ops.prune_op(backend)

    executor = executor or TorchExecutor(model)
    rows = torch.arange(batch_size, device=device)  # live row -> caller's row
    hidden_states = executor.embed(input_ids, token_type_ids)
    mask = executor.mask(attention_mask)
    state = policy.init_state(batch_size, device)
    # Class-attention memory of the non-[CLS] tokens (MPEE eq. 6), updated at pruning layers.
    memory = torch.zeros(batch_size, input_ids.shape[1] - 1, device=device)
    for layer in range(1, num_layers + 1):
        beta = token_pruning.beta_at(layer) if token_pruning is not None else None
        if beta is None:
            hidden_states = executor.layer(layer - 1, hidden_states, mask)
        else:
            hidden_states, attention_mask, memory = model.backbone.layers[layer - 1].pruned_forward(
                hidden_states,
                attention_bias(attention_mask),
                attention_mask,
                memory,
                token_pruning.keep_ratio,
                beta,
                prune,
            )
            mask = executor.mask(attention_mask)
        tokens_kept[rows, layer - 1] = attention_mask.sum(1)
        step_args = (hidden_states, attention_mask, layer, num_layers, state, rows)
        head = model.exit_head(layer - 1)
        if op is not None:
            exit_mask = _exit_head_step_fused(op, head, policy, *step_args, out_logits, out_layer)
        else:
            _, exit_mask, state = exit_head_step_reference(
                head, policy, *step_args, out_logits, out_layer, model.lte
            )
        if not bool(exit_mask.any()):
            continue
        keep = ~exit_mask
        if not bool(keep.any()):
            break
        rows = rows[keep]
        attention_mask = attention_mask[keep]
        # Right padding: trim the columns that no live row uses any more.
        seq_len = int(attention_mask.sum(1).max())
        attention_mask = attention_mask[:, :seq_len]
        hidden_states = hidden_states[keep, :seq_len]
        memory = memory[keep, : seq_len - 1]
        mask = executor.mask(attention_mask)
        state = {name: value[keep] for name, value in state.items()}
    return check_finite(ExitOutput(out_logits, out_layer, tokens_kept))
