"""Batch compaction on the device: live rows partitioned into smaller static buffers, no sync.

The padded loop (:mod:`eeengine.static_loop`) keeps computing exited rows until the whole
batch is done. The compaction loop of :func:`eeengine.runtime.early_exit_forward` drops them,
but needs the host to know how many rows are left. This loop drops them without asking:

1. after each layer, a stable partition moves the live rows (``rows[b] < B``) to the front of
   every per-row tensor (hidden states, mask, policy state, ``rows``), in their order:
   ``dest[b] = cumsum(live)[b] - 1`` for a live row, ``num_live + cumsum(~live)[b] - 1`` for
   an exited one (:func:`live_partition`), one ``index_copy_`` per tensor;
2. the next layer runs on the first k rows only, k the smallest of the sizes B, B/2, B/4, ...,
   1 that holds ``num_live``: in a CUDA graph, one sibling IF node per size on
   ``size_k >= num_live > size_{k+1}`` (:func:`size_predicates`; exactly one is true while a
   row is live, none once every row exited), each body captured for its static size
   (``hidden_states[:k]`` is a view of the static buffer). Rows between ``num_live`` and k
   have exited: they compute into the sink row, as in the padded loop.

So a batch of 128 whose rows mostly exit at layer 2 runs layers 3..L at 64, 32 or fewer rows
(the cost of a layer falls with its rows once they fill less than the GPU). The price: L x
log2(B) captured bodies per bucket (memory, capture time) and the partition's copies per layer.
``benchmarks/benchmark_compaction.py`` measures it against padding at batch 32 and 128.

Without conditional nodes (``if_node`` None: eager, CPU tests) the size is chosen on the host,
a sync per layer. Token pruning is not supported here (its widths change per layer).
"""

from __future__ import annotations

import torch
from torch import Tensor

from eeengine import _custom_ops
from eeengine.exit_step import exit_head_step_fused, exit_head_step_reference
from eeengine.modeling_multiexit import MultiExitBert
from eeengine.policies import ExitPolicy
from eeengine.policies.base import State
from eeengine.static_loop import IfNode, StaticLoop


def live_partition(live: Tensor) -> Tensor:
    """The stable partition that moves the live rows to the front, on the device.

    Args:
        live: (batch_size,) bool.

    Returns:
        dest: (batch_size,) int64, a permutation: row b goes to ``dest[b]``; live rows to
        0 .. num_live - 1 and exited rows to num_live .. batch_size - 1, each in their order.
    """
    is_live = live.long()
    num_live = is_live.sum()
    return torch.where(live, is_live.cumsum(0) - 1, num_live + (1 - is_live).cumsum(0) - 1)


def permute_rows(tensor: Tensor, dest: Tensor) -> Tensor:
    """``out[dest[b]] = tensor[b]`` along the first dimension (``dest`` a permutation)."""
    return torch.empty_like(tensor).index_copy_(0, dest, tensor)


def halvings(batch_size: int) -> tuple[int, ...]:
    """The buffer sizes B, ceil(B / 2), ... , 1, descending."""
    sizes = [batch_size]
    while sizes[-1] > 1:
        sizes.append((sizes[-1] + 1) // 2)
    return tuple(sizes)


def size_predicates(num_live: Tensor, sizes: tuple[int, ...]) -> list[Tensor]:
    """One bool tensor per size (descending): ``sizes[i] >= num_live > sizes[i + 1]`` (0 after
    the last). Exactly one is true when ``1 <= num_live <= sizes[0]``, none when 0."""
    bounds = (*sizes[1:], 0)
    return [
        (num_live <= size) & (num_live > smaller)
        for size, smaller in zip(sizes, bounds, strict=True)
    ]


def run_compacting_loop(
    model: MultiExitBert,
    policy: ExitPolicy,
    backend: str,
    s: StaticLoop,
    if_node: IfNode | None = None,
    every_size: bool = False,
) -> None:
    """The early-exit loop on the buffers of ``s`` (inputs written by
    :func:`eeengine.static_loop.write_inputs`), live rows compacted into the first k rows
    before every layer; same outputs as :func:`eeengine.static_loop.run_static_loop`.

    Args:
        model: the multi-exit model, in eval mode, on the buffers' device.
        policy: the exit policy.
        backend: "reference" or a fused op (see :func:`eeengine._custom_ops.resolve_backend`).
        s: the buffers.
        if_node: the conditional-node context of :mod:`eeengine.cuda_graph` while capturing;
            None chooses each layer's size on the host (a sync per layer: for CPU and tests).
        every_size: with ``if_node`` None, run every size's body at every layer instead (the
            warm-up before capture: every kernel shape compiled and chosen; outputs garbage).
    """
    batch_size, num_layers = s.batch_size, model.num_layers
    device = s.rows.device
    op = None if backend == "reference" else _custom_ops.fused_op(backend)
    sizes = halvings(batch_size)
    rows = s.rows.clone()
    mask = s.attention_mask.clone()
    state: State = policy.init_state(batch_size, device, model.num_labels)
    s.tokens_kept.zero_()
    hidden_states = model.backbone.embed(s.input_ids, s.token_type_ids)

    def run_layer(layer: int, size: int) -> None:
        """Layer ``layer`` and its exit step on the first ``size`` rows, in place."""
        nonlocal state
        part_mask, part_rows = mask[:size], rows[:size]
        bias = part_mask.bool()[:, None, None, :]
        output = model.backbone.layers[layer - 1](hidden_states[:size], bias)
        hidden_states[:size].copy_(output)
        s.tokens_kept[:, layer - 1].index_copy_(0, part_rows, part_mask.sum(1))
        part_state = {name: value[:size] for name, value in state.items()}  # views
        args = (output, part_mask, layer, num_layers, part_state, part_rows)
        head = model.exit_head(layer - 1)
        if op is not None:
            exit_mask = exit_head_step_fused(
                op, head, policy, *args, s.out_logits, s.out_layer, model.lte
            )
        else:
            _, exit_mask, new_state = exit_head_step_reference(
                head, policy, *args, s.out_logits, s.out_layer, model.lte
            )
            for name, value in new_state.items():
                if name in state and size < batch_size:
                    state[name][:size].copy_(value)
                else:  # layer 1 (every row): the state tensors are made here
                    state[name] = value
        part_rows.masked_fill_(exit_mask, batch_size)

    run_layer(1, batch_size)
    for layer in range(2, num_layers + 1):
        live = rows < batch_size
        dest = live_partition(live)
        for tensor in (hidden_states, mask, rows, *state.values()):
            tensor.copy_(permute_rows(tensor, dest))
        for size, pred in zip(sizes, size_predicates(live.sum(), sizes), strict=True):
            if if_node is not None:
                with if_node(pred):
                    run_layer(layer, size)
            elif every_size or bool(pred):  # the size chosen on the host: eager only
                run_layer(layer, size)
