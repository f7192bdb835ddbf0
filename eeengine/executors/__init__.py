"""Layer executors: what runs the embeddings and encoder layer l inside the early-exit loop.

The loop (:func:`eeengine.runtime.early_exit_forward`) asks an executor for the embeddings, then
for one layer at a time, and makes the exit decisions itself between layers (exit head + policy
step, then batch compaction). Executors are interchangeable and tested against the reference:

- ``torch`` (:class:`TorchExecutor`): eeengine's plain torch encoders, the reference; any
  backbone, any device.
- ``onnxruntime`` (:class:`OnnxRuntimeExecutor`): every encoder layer is its own ONNX Runtime
  session built from the same weights at load time (BERT backbones, CPU; the optional extra
  ``eeengine[onnx]``).

Choose with :func:`make_executor` once, at engine construction.
"""

from __future__ import annotations

import importlib.util
from typing import Protocol

from torch import Tensor

from eeengine.executors.torch import TorchExecutor
from eeengine.modeling_multiexit import MultiExitBert

EXECUTORS = ("torch", "onnxruntime")


class LayerExecutor(Protocol):
    """Runs the encoder of a :class:`MultiExitBert` piece by piece.

    ``mask(attention_mask)`` turns the (batch_size, seq_len) 1/0 mask (1 = real token) into
    whatever ``layer`` takes; the loop calls it again after every batch compaction.
    """

    name: str

    def embed(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor: ...

    def mask(self, attention_mask: Tensor) -> object: ...

    def layer(self, index: int, hidden_states: Tensor, mask: object) -> Tensor: ...


def make_executor(name: str | None, model: MultiExitBert) -> LayerExecutor:
    """Build the executor ``name`` for ``model`` (in eval mode, weights final).

    Args:
        name: "torch", "onnxruntime", or None for "onnxruntime" where it can run (onnxruntime
            installed; a BERT backbone with exact GELU, on CPU, in eval mode) and "torch"
            otherwise.
        model: the multi-exit model.

    Returns:
        The executor.

    Raises:
        ValueError: an unknown name, or "onnxruntime" where it cannot run (the message says why).
    """
    if name is not None and name not in EXECUTORS:
        raise ValueError(f"unknown executor {name!r}; available: {', '.join(EXECUTORS)}")
    reason = _onnxruntime_unavailable(model)
    if name == "onnxruntime" and reason is not None:
        raise ValueError(f"executor 'onnxruntime' is not available: {reason}")
    if name == "torch" or reason is not None:
        return TorchExecutor(model)
    from eeengine.executors.onnxruntime import OnnxRuntimeExecutor

    return OnnxRuntimeExecutor(model)


def _onnxruntime_unavailable(model: MultiExitBert) -> str | None:
    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        return "onnxruntime / onnx are not installed (pip install 'eeengine[onnx]')"
    if model.backbone_type != "bert" or model.config.hidden_act != "gelu":
        return (
            "it builds BERT layers with exact GELU; this model is "
            f"{model.backbone_type} with {model.config.hidden_act!r}"
        )
    device = next(model.parameters()).device
    if device.type != "cpu":
        return f"it runs on CPU, the model is on {device}"
    if model.training:
        return "it runs without dropout: call model.eval()"
    return None


__all__ = ["EXECUTORS", "LayerExecutor", "TorchExecutor", "make_executor"]
