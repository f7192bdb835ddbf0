"""The early-exit loop: layer by layer, each row stops on its own, the batch shrinks.

Per layer l: encoder layer on the live rows -> exit head -> policy step -> latch the logits and
exit layer of rows that exit -> drop them from the working batch (hidden states, mask, policy
state, and the index map back to the caller's rows). Later layers compute only on live rows.
Layers where the policy cannot exit (``none`` before the last layer, ``budget`` before its
layer) run back to back in one executor call (:func:`layer_segments`; full depth is one call),
with no exit head and no Python between them but the executor's own.

With a token-pruning schedule (MPEE token-wise exit, :mod:`eeengine.token_pruning`), a pruning
layer runs attention, then ``token_prune`` on each row (its real tokens only; rows come out
right-padded to the batch's longest), then the feed-forward on the kept tokens, all in the
executor (:meth:`LayerExecutor.pruned_layer`).

The exit head, policy step and latch run either in plain torch (backend "reference",
:func:`eeengine.exit_step.exit_head_step_reference`) or as one fused op (backend "cpp" on CPU,
:func:`eeengine._custom_ops.exit_head_step`; "triton" or "cuda" on a GPU); all give the same
exits and logits.

The compaction asks the host how many rows are left, a sync per layer on a GPU, so this loop
runs on CPU only: on other devices :func:`early_exit_forward` runs the sync-free loop of
:mod:`eeengine.static_loop` (exited rows padded, not dropped), which :mod:`eeengine.cuda_graph`
captures in CUDA graphs; :class:`eeengine.device_loop.DeviceLoop` picks the loop for a device
once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from eeengine import _custom_ops
from eeengine.executors import LayerExecutor, TorchExecutor
from eeengine.executors.base import RowRunner
from eeengine.exit_step import exit_head_step_fused, exit_head_step_reference
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
            (the width its feed-forward ran at), 0 after its exit layer.
    """

    logits: Tensor
    exit_layer: Tensor
    tokens_kept: Tensor | None = None

    def tensors(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """The fields in order (``dataclasses.astuple`` would deep-copy them)."""
        return self.logits, self.exit_layer, self.tokens_kept


class NonFiniteLogitsError(RuntimeError):
    """The logits of the exit an input took are NaN or infinite, so no prediction can be made.

    Attributes:
        inputs: the caller's indices of the bad inputs.
        layers: the 1-based exit layer of each.
    """

    def __init__(self, inputs: list[int], layers: list[int]) -> None:
        self.inputs, self.layers = inputs, layers
        listed = ", ".join(
            f"input {i} at layer {layer}"
            for i, layer in list(zip(inputs, layers, strict=True))[:10]
        )
        super().__init__(
            f"non-finite (NaN or infinite) logits for {len(inputs)} input(s): {listed}; the "
            "model's numbers overflowed, so no prediction is returned"
        )


def check_finite(
    logits: Sequence[Sequence[float]], exit_layers: Sequence[int], inputs: Sequence[int]
) -> None:
    """Refuse a batch whose latched logits are not all finite, on the host copy the
    predictions are read from (no extra device sync), whatever loop or backend latched them.

    Args:
        logits: each row's logits at its exit, floats.
        exit_layers: each row's 1-based exit layer.
        inputs: the caller's index of each row.

    Raises:
        NonFiniteLogitsError: names the inputs and the layer each exited at.
    """
    bad = [row for row, values in enumerate(logits) if not all(map(math.isfinite, values))]
    if bad:
        raise NonFiniteLogitsError([inputs[row] for row in bad], [exit_layers[row] for row in bad])


@dataclass
class LiveRows:
    """The rows of a batch still running, between two layers of :class:`ExitLoop`.

    Attributes:
        rows: (batch_size,) int64, each live row's index into the :class:`ExitOutput` buffers.
        hidden_states: (batch_size, seq_len, hidden_size), the output of the last layer run
            (the embeddings before layer 1).
        attention_mask: (batch_size, seq_len) int64, 1 for real tokens, right-padded; seq_len
            is the longest live row.
        mask: ``attention_mask`` in the executor's form (:meth:`LayerExecutor.mask`).
        state: the policy's state, rows aligned with ``hidden_states``.
        memory: (batch_size, seq_len - 1) float32, class-attention memory of the non-[CLS]
            tokens (MPEE eq. 6), updated at token-pruning layers.
    """

    rows: Tensor
    hidden_states: Tensor
    attention_mask: Tensor
    mask: object
    state: State
    memory: Tensor


def layer_segments(
    num_layers: int, policy: ExitPolicy, token_pruning: TokenPruning | None
) -> list[tuple[int, int]]:
    """The runs of layers the loop executes without stopping: (first, last), 1-based and
    inclusive, in order. A run ends at each layer where ``policy`` decides
    (:meth:`ExitPolicy.decides_at`) and at the last layer; a token-pruning layer
    (:meth:`LayerExecutor.pruned_layer`) is a run of its own. Full depth (policy ``none``) is
    one run.
    """
    pruning = set() if token_pruning is None else set(token_pruning.layers)
    segments, first = [], 1
    for layer in range(1, num_layers + 1):
        if (
            layer == num_layers
            or policy.decides_at(layer, num_layers)
            or layer in pruning
            or layer + 1 in pruning
        ):
            segments.append((first, layer))
            first = layer + 1
    return segments


class ExitLoop:
    """The pieces of :func:`early_exit_forward`, for callers that drive the model one layer at
    a time over rows of their choosing (the server's layer-wise scheduler,
    :mod:`eeengine.serve.scheduler`): :meth:`start` (embeddings), :meth:`step` (one layer and
    its exit decision), :meth:`select` (drop exited rows).

    Args:
        model, policy, backend, token_pruning, executor: as :func:`early_exit_forward`.

    Raises:
        ValueError: as :func:`early_exit_forward`.
    """

    def __init__(
        self,
        model: MultiExitBert,
        policy: ExitPolicy,
        backend: str | None = "reference",
        token_pruning: TokenPruning | None = None,
        executor: LayerExecutor | None = None,
    ) -> None:
        device = next(model.parameters()).device
        self.backend = _custom_ops.resolve_backend(backend, policy, model.num_labels, device)
        if self.backend != "reference" and model.training:
            raise ValueError(
                f"backend {self.backend!r} runs the exit heads without dropout: call model.eval()"
            )
        self.model = model
        self.policy = policy
        self.token_pruning = token_pruning
        self.executor = executor or TorchExecutor(model)
        self._op = None if self.backend == "reference" else _custom_ops.fused_op(self.backend)
        # Imported only for a schedule: the Triton op imports triton.
        self._prune = (
            token_prune_reference if token_pruning is None else _custom_ops.prune_op(self.backend)
        )
        self.segments = layer_segments(model.num_layers, policy, token_pruning)
        self._single_rows = 0  # one-row batches asked for so far (row_loop)

    def run(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor) -> ExitOutput:
        """The whole loop on one right-padded batch (see :func:`early_exit_forward`): the
        executor's row runner for a batch of one where :meth:`row_loop` gives one, else
        :meth:`run_layers`.

        Args:
            input_ids, attention_mask, token_type_ids: (batch_size, seq_len) int64; the mask
                is 1 for real tokens.
        """
        row = self.row_loop(input_ids.shape[0])
        if row is None:
            return self.run_layers(input_ids, attention_mask, token_type_ids)
        logits, exit_layer = row(input_ids, attention_mask, token_type_ids)
        return ExitOutput(logits, exit_layer, self._tokens_kept(attention_mask, exit_layer))

    @torch.inference_mode()
    def run_layers(
        self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor
    ) -> ExitOutput:
        """The loop layer by layer on one right-padded batch (arguments as :meth:`run`): every
        layer on the rows still live, exited rows dropped after each."""
        out = self.outputs(input_ids.shape[0], input_ids.device)
        live = self.start(input_ids, attention_mask, token_type_ids)
        for first, last in self.segments:
            exit_mask = self.step(live, last, out, first)
            if not bool(exit_mask.any()):
                continue
            keep = ~exit_mask
            if not bool(keep.any()):
                break
            live = self.select(live, keep)
        if self.token_pruning is None:  # every layer a row ran had its full length
            out.tokens_kept = self._tokens_kept(attention_mask, out.exit_layer)
        return out

    def row_loop(self, batch_size: int) -> RowRunner | None:
        """The executor's one-row runner (:meth:`LayerExecutor.row_loop`), which :meth:`run`
        takes for a batch of ``batch_size`` rows: for a batch of one with a fused backend and no
        token pruning, where the executor has one, from this loop's second one-row batch on;
        else None. Each call with ``batch_size`` 1 counts as a one-row batch: a caller that
        then runs the batch itself calls :meth:`run_layers`, not :meth:`run`."""
        if batch_size != 1 or self._layer_by_layer() is not None:
            return None
        # Not for the first row: building the graph (0.2-0.5 s for MiniLM) is worth it for a
        # caller that sends rows one at a time, not for a one-off prediction (the CLI's).
        self._single_rows += 1
        if self._single_rows == 1:
            return None
        return self.executor.row_loop(self.policy)

    def row_loop_unavailable(self) -> str | None:
        """Why a batch of one row never runs through a one-row runner (:meth:`row_loop`), or
        None where it does (from the second one-row batch on). Builds nothing."""
        return self._layer_by_layer() or self.executor.row_loop_unavailable(self.policy)

    def _layer_by_layer(self) -> str | None:
        """Why this loop, whatever its executor, runs every batch layer by layer, or None."""
        if self._op is None:
            return "the reference backend runs every batch layer by layer"
        if self.token_pruning is not None:
            return "token pruning runs every batch layer by layer"
        return None

    def _tokens_kept(self, attention_mask: Tensor, exit_layer: Tensor) -> Tensor:
        """``ExitOutput.tokens_kept`` without pruning: each row's length up to its exit."""
        layers = torch.arange(1, self.model.num_layers + 1, device=attention_mask.device)
        return attention_mask.sum(1, keepdim=True) * (layers <= exit_layer[:, None])

    def outputs(self, batch_size: int, device: torch.device) -> ExitOutput:
        """Empty result buffers for ``batch_size`` rows (filled by :meth:`step`; ``tokens_kept``
        only with a token-pruning schedule, else None)."""
        return ExitOutput(
            torch.empty(batch_size, self.model.num_labels, dtype=torch.float32, device=device),
            torch.empty(batch_size, dtype=torch.long, device=device),
            None
            if self.token_pruning is None
            else torch.zeros(batch_size, self.model.num_layers, dtype=torch.long, device=device),
        )

    def start(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor) -> LiveRows:
        """Embed a right-padded batch: (batch_size, seq_len) int64 each, mask 1 = real token.
        Its rows are 0..batch_size-1 of the output buffers."""
        batch_size = input_ids.shape[0]
        device = input_ids.device
        return LiveRows(
            rows=torch.arange(batch_size, device=device),
            hidden_states=self.executor.embed(input_ids, token_type_ids),
            attention_mask=attention_mask,
            mask=self.executor.mask(attention_mask),
            state=self.policy.init_state(batch_size, device, self.model.num_labels),
            memory=torch.zeros(batch_size, input_ids.shape[1] - 1, device=device),
        )

    def step(self, live: LiveRows, layer: int, out: ExitOutput, first: int | None = None) -> Tensor:
        """Run layers ``first`` .. ``layer`` (1-based; ``first`` defaults to ``layer``, and is
        ``layer`` at a token-pruning layer) on the live rows, then the exit head and policy step
        of ``layer`` (skipped where :meth:`ExitPolicy.decides_at` is False: no row exits there);
        latch the logits and exit layer of the rows that exit into ``out``. Updates ``live`` in
        place (hidden states, and at a token-pruning layer the mask and memory; the policy
        state). With a token-pruning schedule it writes ``out.tokens_kept`` of these layers
        (:meth:`run` fills it for an unpruned batch at the end).

        Returns:
            exit_mask: (batch_size,) bool, True for rows that exit at ``layer`` (all of them at
            the last layer).
        """
        model = self.model
        num_layers = model.num_layers
        first = layer if first is None else first
        beta = self.token_pruning.beta_at(layer) if self.token_pruning is not None else None
        if beta is None:
            live.hidden_states = self.executor.layers(
                first - 1, layer, live.hidden_states, live.mask
            )
        else:
            live.hidden_states, live.attention_mask, live.memory = self.executor.pruned_layer(
                layer - 1,
                live.hidden_states,
                live.mask,
                live.attention_mask,
                live.memory,
                self.token_pruning.keep_ratio,
                beta,
                self._prune,
            )
            live.mask = self.executor.mask(live.attention_mask)
        if self.token_pruning is not None:
            out.tokens_kept[live.rows, first - 1 : layer] = live.attention_mask.sum(1, keepdim=True)
        if not self.policy.decides_at(layer, num_layers):  # no exit head needed here
            return torch.zeros(live.rows.shape[0], dtype=torch.bool, device=live.rows.device)
        step_args = (live.hidden_states, live.attention_mask, layer, num_layers, live.state)
        head = model.exit_head(layer - 1)
        if self._op is not None:
            return exit_head_step_fused(
                self._op, head, self.policy, *step_args, live.rows, out.logits, out.exit_layer,
                model.lte,
            )  # fmt: skip
        _, exit_mask, live.state = exit_head_step_reference(
            head, self.policy, *step_args, live.rows, out.logits, out.exit_layer, model.lte
        )
        return exit_mask

    def select(self, live: LiveRows, keep: Tensor) -> LiveRows:
        """The rows ``keep`` of ``live`` (a bool mask or int64 indices, non-empty), with the
        padding columns none of them uses any more trimmed (right padding)."""
        attention_mask = live.attention_mask[keep]
        seq_len = int(attention_mask.sum(1).max())
        attention_mask = attention_mask[:, :seq_len]
        return LiveRows(
            rows=live.rows[keep],
            hidden_states=live.hidden_states[keep, :seq_len],
            attention_mask=attention_mask,
            mask=self.executor.mask(attention_mask),
            state={name: value[keep] for name, value in live.state.items()},
            memory=live.memory[keep, : seq_len - 1],
        )


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
            its ``pruned_layer`` (built with the schedule, see
            :func:`eeengine.executors.make_executor`).

    Returns:
        :class:`ExitOutput`. Equal, row by row, to running each row alone, and to
        :func:`eeengine.policies.run_policy` on the full-depth logits. On a device other than
        the CPU, the result of :func:`eeengine.static_loop.static_early_exit_forward` (no host
        sync, no compaction, every layer runs; the executor is not used).

    Raises:
        ValueError: an unknown backend; a fused backend where it cannot run (see
            :func:`eeengine._custom_ops.resolve_backend`), or with the model in training mode.
    """
    loop = ExitLoop(model, policy, backend, token_pruning, executor)
    if input_ids.device.type != "cpu":
        # The compaction asks the host how many rows are left: a sync per layer on a GPU.
        from eeengine.static_loop import static_early_exit_forward  # imports this module

        return static_early_exit_forward(
            model, policy, input_ids, attention_mask, token_type_ids, loop.backend, token_pruning
        )
    return loop.run(input_ids, attention_mask, token_type_ids)
