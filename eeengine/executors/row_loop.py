"""The row graph's runner: one row through the whole early-exit loop as one ONNX Runtime
session (:func:`eeengine.executors.row_graph.row_exit_model`), built and cached by
:meth:`eeengine.executors.onnxruntime.OnnxRuntimeExecutor.row_loop`."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import onnxruntime
import torch
from torch import Tensor

from eeengine.executors.io_binding import bind_pointer


class RowLoop:
    """Runs a row graph (:func:`eeengine.executors.row_graph.row_exit_model`) on one row,
    inputs and outputs bound by pointer.

    Args:
        session: the row graph's session.
        embedding_weights: the embeddings' weights, bound once.
        state: the policy's initial state for one row (:meth:`ExitPolicy.init_state`), bound
            once (the graph reads it and never writes it).
        num_labels: classes of the exit heads (1: regression).
    """

    def __init__(
        self,
        session: onnxruntime.InferenceSession,
        embedding_weights: dict[str, Tensor],
        state: dict[str, Tensor],
        num_labels: int,
    ) -> None:
        self._session = session
        self._binding = session.io_binding()
        self._state = {f"state.{key}": value.contiguous() for key, value in state.items()}
        for name, tensor in {**embedding_weights, **self._state}.items():
            bind_pointer(self._binding.bind_input, name, tensor)
        # numpy buffers: copied out and wrapped with torch.from_numpy, cheaper than two torch
        # clones in the cold cache right after a run (batch 1).
        self._logits = np.empty((1, num_labels), dtype=np.float32)
        self._exit_layer = np.empty(1, dtype=np.int64)
        self._lock = threading.Lock()  # one run at a time: one binding, one pair of outputs
        bind_pointer(self._binding.bind_output, "logits", self._logits)
        bind_pointer(self._binding.bind_output, "exit_layer", self._exit_layer)

    def __call__(
        self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor
    ) -> tuple[Tensor, Tensor]:
        """One row, (1, seq_len) int64 each, right-padded (mask 1 = real token) -> logits
        (1, num_labels) float32 (the policy's output logits at the exit) and exit_layer (1,)
        int64, 1-based. The graph takes the real tokens only."""
        length = int(attention_mask.sum())
        inputs = {  # bound by pointer: contiguous, and referenced until the run
            "input_ids": input_ids[:, :length].contiguous(),
            "token_type_ids": token_type_ids[:, :length].contiguous(),
        }
        logits, exit_layer = self._run(inputs)
        return torch.from_numpy(logits), torch.from_numpy(exit_layer)

    def run_tokens(
        self, input_ids: Sequence[int], token_type_ids: Sequence[int]
    ) -> tuple[list[float], int]:
        """One unpadded row as token lists -> its logits at the exit (float32 values) and its
        1-based exit layer; numpy only (at batch 1, right after a run, a torch op costs
        10-20 us)."""
        inputs = {
            "input_ids": np.array([input_ids], dtype=np.int64),
            "token_type_ids": np.array([token_type_ids], dtype=np.int64),
        }
        logits, exit_layer = self._run(inputs)
        return logits[0].tolist(), int(exit_layer[0])

    def _run(self, inputs: dict[str, Tensor | np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Bind the contiguous ``inputs`` by pointer, run, and copy the outputs out."""
        with self._lock:
            for name, value in inputs.items():
                bind_pointer(self._binding.bind_input, name, value)
            self._session.run_with_iobinding(self._binding)
            return self._logits.copy(), self._exit_layer.copy()
