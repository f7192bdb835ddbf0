"""The early-exit loop of one model on one device (:class:`DeviceLoop`), and a batch's exits
on the host (:class:`HostExits`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from eeengine.batching import Encoded, collate
from eeengine.executors import LayerExecutor
from eeengine.modeling_multiexit import MultiExitBert
from eeengine.policies import ExitPolicy
from eeengine.runtime import ExitLoop, ExitOutput, early_exit_forward
from eeengine.token_pruning import TokenPruning

if TYPE_CHECKING:
    from eeengine.cuda_graph import GraphRunner


@dataclass
class HostExits:
    """One batch's exits on the host, as Python lists (what predictions are made of).

    Attributes:
        logits: (batch_size, num_labels) floats, the logits of the exit each row took.
        exit_layer: (batch_size,) 1-based exit layers.
        tokens_kept: (batch_size, num_layers) real tokens of each row after each layer, where
            the loop reported them (:attr:`ExitOutput.tokens_kept`), else None.
    """

    logits: list[list[float]]
    exit_layer: list[int]
    tokens_kept: list[list[int]] | None = None

    @classmethod
    def of(cls, out: ExitOutput) -> HostExits:
        """``out`` (on the CPU) as lists; logits as float32 values."""
        kept = None if out.tokens_kept is None else out.tokens_kept.tolist()
        return cls(out.logits.float().tolist(), out.exit_layer.tolist(), kept)


class DeviceLoop:
    """The early-exit loop of one model on one device, chosen once (at engine load):

    - CPU: :func:`early_exit_forward`, the compaction loop, through ``executor``;
    - CUDA, ``graph=True`` (the default): :class:`eeengine.cuda_graph.GraphRunner`, one CUDA
      graph replay per batch, no host sync; a runner per policy (a new policy, threshold or
      schedule captures new graphs), batches above the largest bucket run in slices;
    - CUDA, ``graph=False``: :func:`eeengine.static_loop.static_early_exit_forward`, the same
      loop eagerly, no host sync.

    Args:
        model: the multi-exit model, in eval mode, on its device.
        executor: what runs the layers of the CPU loop.
        graph: on CUDA, replay CUDA graphs (True) or run eagerly (False); ignored on CPU.
    """

    def __init__(self, model: MultiExitBert, executor: LayerExecutor, graph: bool = True) -> None:
        self.model = model
        self.executor = executor
        self.device = next(model.parameters()).device
        self.graph = graph and self.device.type == "cuda"
        self._runner = None  # the GraphRunner of the last policy, and its key
        self._runner_key: tuple | None = None
        self._loop: ExitLoop | None = None  # the CPU ExitLoop of the last policy, and its key
        self._loop_key: tuple | None = None

    @property
    def mode(self) -> str:
        """ "compaction" (CPU), "graph" or "eager" (CUDA)."""
        if self.device.type == "cpu":
            return "compaction"
        return "graph" if self.graph else "eager"

    def __call__(
        self,
        policy: ExitPolicy,
        backend: str,
        token_pruning: TokenPruning | None,
        input_ids: Tensor,
        attention_mask: Tensor,
        token_type_ids: Tensor,
    ) -> ExitOutput:
        """Early exit for one batch (inputs on the model's device, right-padded, mask 1 = real
        token); the result stays on the device (see :meth:`to_host`)."""
        if self.device.type == "cpu":
            return self._exit_loop(policy, backend, token_pruning).run(
                input_ids, attention_mask, token_type_ids
            )
        if not self.graph:
            return early_exit_forward(
                self.model, policy, input_ids, attention_mask, token_type_ids, backend,
                token_pruning, self.executor,
            )  # fmt: skip
        runner = self._graph_runner(policy, backend, token_pruning)
        step = runner.batch_buckets[-1]
        outs = [
            runner(
                input_ids[i : i + step], attention_mask[i : i + step], token_type_ids[i : i + step]
            )
            for i in range(0, input_ids.shape[0], step)
        ]
        if len(outs) == 1:
            return outs[0]
        return ExitOutput(
            *(torch.cat(parts) for parts in zip(*(o.tensors() for o in outs), strict=True))
        )

    def _exit_loop(
        self, policy: ExitPolicy, backend: str, token_pruning: TokenPruning | None
    ) -> ExitLoop:
        """The CPU loop of a policy, backend and schedule, made once for them (not per batch:
        at batch 1 making it cost about as much as a layer's exit step)."""
        key = (policy.key(), backend, token_pruning)
        if key != self._loop_key:
            self._loop = ExitLoop(self.model, policy, backend, token_pruning, self.executor)
            self._loop_key = key
        return self._loop

    def _graph_runner(
        self, policy: ExitPolicy, backend: str, token_pruning: TokenPruning | None
    ) -> GraphRunner:
        from eeengine.cuda_graph import GraphRunner  # imports this module

        key = (policy.key(), backend, token_pruning)
        if key != self._runner_key:
            self._runner = None  # free the old graphs first
            self._runner = GraphRunner(self.model, policy, backend, token_pruning)
            self._runner_key = key
        return self._runner

    def run_batches(
        self,
        policy: ExitPolicy,
        backend: str,
        token_pruning: TokenPruning | None,
        encoded: Encoded,
        batches: list[list[int]],
        pad_token_id: int,
    ) -> list[HostExits]:
        """Early exit for each batch of indices into ``encoded`` (collated on the model's
        device), then the executor's scratch memory released; results on the host.

        A call of one row on the CPU, where the loop has a row runner
        (:meth:`ExitLoop.row_loop`), runs it on the token lists, with no torch op on the way
        in or out: at batch 1, right after a forward pass, each costs 10-20 us (cold caches).
        The executor's :meth:`~eeengine.executors.base.LayerExecutor.host_ops` context is
        entered around the loops that run torch ops only.
        """
        try:
            if self.device.type == "cpu" and len(batches) == 1 and len(batches[0]) == 1:
                (index,) = batches[0]
                return [self._one_row(policy, backend, token_pruning, encoded, index, pad_token_id)]
            with self.executor.host_ops():  # e.g. torch on one thread beside ORT's pool
                outs = [
                    self(
                        policy,
                        backend,
                        token_pruning,
                        *collate(encoded, indices, pad_token_id, self.device),
                    )
                    for indices in batches
                ]
        finally:
            self.executor.release_scratch()
        return [HostExits.of(out) for out in self.to_host(outs)]

    def _one_row(
        self,
        policy: ExitPolicy,
        backend: str,
        token_pruning: TokenPruning | None,
        encoded: Encoded,
        index: int,
        pad_token_id: int,
    ) -> HostExits:
        """A call of one row on the CPU: the loop's row runner on its token lists where it
        has one (:meth:`ExitLoop.row_loop`), else the layer loop."""
        loop = self._exit_loop(policy, backend, token_pruning)
        row = loop.row_loop(1)
        if row is not None:
            logits, layer = row.run_tokens(encoded.input_ids[index], encoded.token_type_ids[index])
            return HostExits([logits], [layer])
        with self.executor.host_ops():  # the row was asked for: run_layers, not run
            return HostExits.of(loop.run_layers(*collate(encoded, [index], pad_token_id)))

    def to_host(self, outputs: list[ExitOutput]) -> list[ExitOutput]:
        """``outputs`` on the CPU. On a GPU: one non-blocking copy per tensor into pinned
        memory, then one wait on an event for all of them (no per-batch sync)."""
        if self.device.type == "cpu":
            return outputs
        copies = [
            ExitOutput(
                *(None if t is None else t.to("cpu", non_blocking=True) for t in o.tensors())
            )
            for o in outputs
        ]
        done = torch.cuda.Event()
        done.record()
        done.synchronize()
        return copies
