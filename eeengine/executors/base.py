"""The interface every layer executor implements (:class:`LayerExecutor`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Protocol

from torch import Tensor

from eeengine.policies import ExitPolicy
from eeengine.token_pruning import TokenPruneOutput


class RowRunner(Protocol):
    """The whole early-exit loop of one row (:meth:`LayerExecutor.row_loop`)."""

    def __call__(
        self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(1, seq_len) int64 each (mask 1 = real token) -> logits (1, num_labels) float32, the
        policy's output logits at the exit, and exit_layer (1,) int64, 1-based."""
        ...

    def run_tokens(
        self, input_ids: Sequence[int], token_type_ids: Sequence[int]
    ) -> tuple[list[float], int]:
        """One unpadded row as token lists -> its logits at the exit (float32 values) and its
        1-based exit layer, with no torch op."""
        ...


class LayerExecutor(Protocol):
    """Runs the encoder of a :class:`eeengine.modeling_multiexit.MultiExitBert` piece by piece.

    ``mask(attention_mask)`` turns the (batch_size, seq_len) 1/0 mask (1 = real token) into
    whatever ``layer`` takes; the loop calls it again after every batch compaction.
    ``release_scratch()`` is called after each chunk of :meth:`eeengine.Engine.predict` and
    each evaluation pass. The loops, the exit heads and the results around the executor's
    layers run inside :meth:`host_ops`. Executors subclass this protocol for :meth:`layers`
    and :meth:`host_ops`.
    """

    name: str
    # What one more forward pass costs, in padded tokens: Engine.predict cuts a batch where that
    # removes more padding (eeengine.batching.length_sorted_batches); inf never cuts.
    split_cost: float = math.inf

    def embed(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor: ...

    def mask(self, attention_mask: Tensor) -> object: ...

    def layer(self, index: int, hidden_states: Tensor, mask: object) -> Tensor: ...

    def pruned_layer(
        self,
        index: int,
        hidden_states: Tensor,
        mask: object,
        attention_mask: Tensor,
        memory: Tensor,
        keep_ratio: float,
        beta: float,
        prune: Callable[..., TokenPruneOutput],
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Layer ``index`` with MPEE token pruning between its attention and feed-forward
        sublayers: :meth:`eeengine.modeling_bert.PrunableLayer.pruned_forward`'s arguments
        (``mask`` in this executor's form, ``attention_mask`` 1/0) and returns (hidden states,
        attention mask, memory, all with the pruned width)."""
        ...

    def layers(self, start: int, stop: int, hidden_states: Tensor, mask: object) -> Tensor:
        """Layers ``start`` .. ``stop - 1`` (0-based) back to back on the same rows: what the
        loop runs between two layers where the policy decides (no exit head, no compaction in
        between). (batch_size, seq_len, hidden_size) in, the same shape out."""
        for index in range(start, stop):
            hidden_states = self.layer(index, hidden_states, mask)
        return hidden_states

    def row_loop(self, policy: ExitPolicy) -> RowRunner | None:
        """A runner of the whole early-exit loop for a batch of one row under ``policy``, as
        the loop would compute it; None (the default): the loop runs layer by layer."""
        return None

    def row_loop_unavailable(self, policy: ExitPolicy) -> str | None:
        """Why :meth:`row_loop` gives no runner for ``policy`` (a sentence), or None where it
        gives one. Builds nothing."""
        return f"the {self.name} executor runs every batch layer by layer"

    def host_ops(self) -> AbstractContextManager[None]:
        """A context for the torch operations between this executor's layers (exit heads,
        policy steps, batch compaction, results) and the layers themselves: nothing to set by
        default."""
        return nullcontext()

    def release_scratch(self) -> None:
        """Give back the scratch memory kept for reuse across layers, if large (end of a call)."""
