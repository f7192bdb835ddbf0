"""The early-exit loop: layer by layer, each row stops on its own, the batch shrinks.

Per layer l: encoder layer on the live rows -> exit head -> policy step -> latch the logits and
exit layer of rows that exit -> drop them from the working batch (hidden states, mask, policy
state, and the index map back to the caller's rows). Later layers compute only on live rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from eeengine.modeling_bert import attention_bias
from eeengine.modeling_multiexit import MultiExitBert
from eeengine.policies import ExitPolicy


@dataclass
class ExitOutput:
    """Result of :func:`early_exit_forward` for a batch, rows in the caller's order.

    Attributes:
        logits: (batch_size, num_labels) float32, the logits of the exit each row took.
        exit_layer: (batch_size,) int64, 1-based layer at which each row exited.
    """

    logits: Tensor
    exit_layer: Tensor


@torch.inference_mode()
def early_exit_forward(
    model: MultiExitBert,
    policy: ExitPolicy,
    input_ids: Tensor,
    attention_mask: Tensor,
    token_type_ids: Tensor,
) -> ExitOutput:
    """Run the multi-exit model with per-sample early exit and batch compaction.

    Args:
        model: the multi-exit model, in eval mode.
        policy: decides after each layer which rows exit.
        input_ids, attention_mask, token_type_ids: (batch_size, seq_len); the mask is 1 for
            real tokens.

    Returns:
        :class:`ExitOutput`. Equal, row by row, to running each row alone, and to
        :func:`eeengine.policies.run_policy` on the full-depth logits.
    """
    batch_size = input_ids.shape[0]
    device = input_ids.device
    num_layers = model.num_layers
    out_logits = torch.empty(batch_size, model.num_labels, dtype=torch.float32, device=device)
    out_layer = torch.empty(batch_size, dtype=torch.long, device=device)

    rows = torch.arange(batch_size, device=device)  # live row -> caller's row
    hidden_states = model.bert.embeddings(input_ids, token_type_ids)
    bias = attention_bias(attention_mask)
    state = policy.init_state(batch_size, device)
    for layer in range(1, num_layers + 1):
        hidden_states = model.bert.encoder.layer[layer - 1](hidden_states, bias)
        logits = model.exit_heads[layer - 1](hidden_states, attention_mask)
        exit_mask, state = policy.step(logits, layer, state)
        outputs = policy.output_logits(logits, state)  # the logits, or MPEE's memory
        if layer == num_layers:
            out_logits[rows] = outputs.float()
            out_layer[rows] = layer
            break
        if not bool(exit_mask.any()):
            continue
        out_logits[rows[exit_mask]] = outputs[exit_mask].float()
        out_layer[rows[exit_mask]] = layer
        keep = ~exit_mask
        if not bool(keep.any()):
            break
        rows = rows[keep]
        attention_mask = attention_mask[keep]
        # Right padding: trim the columns that no live row uses any more.
        seq_len = int(attention_mask.sum(1).max())
        attention_mask = attention_mask[:, :seq_len]
        hidden_states = hidden_states[keep, :seq_len]
        bias = attention_bias(attention_mask)
        state = {name: value[keep] for name, value in state.items()}
    return ExitOutput(out_logits, out_layer)
