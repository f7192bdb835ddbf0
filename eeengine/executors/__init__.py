"""Layer executors: what runs the embeddings and encoder layer l inside the early-exit loop.

The loop (:func:`eeengine.runtime.early_exit_forward`) asks an executor for the embeddings, then
for one layer at a time, and makes the exit decisions itself between layers (exit head + policy
step, then batch compaction). Executors are interchangeable and tested against the reference:

- ``torch`` (:class:`TorchExecutor`): eeengine's plain torch encoders, the reference; any
  backbone, any device.
- ``onnxruntime`` (:class:`OnnxRuntimeExecutor`): every encoder layer is its own ONNX Runtime
  session built from the same weights at load time, a token-pruning layer two (attention,
  feed-forward; the pruning runs between them) (BERT backbones, CPU; the optional extra
  ``eeengine[onnx]``).

Precision (:data:`PRECISIONS`): "fp32" on either executor; "int8" (linear weights quantized per
channel, activations per call) and "int8_static" (activations with calibrated scales, so that
results do not depend on the batch: :mod:`eeengine.executors.int8_static`) on ``onnxruntime``;
"bf16" (the layers in bfloat16) on ``torch``, since ONNX Runtime has no bf16 CPU kernels.
Embeddings, exit heads and the policy step stay float32 at every precision.

Choose with :func:`make_executor` once, at engine construction.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from eeengine.executors.base import LayerExecutor
from eeengine.executors.torch import TorchExecutor
from eeengine.modeling_multiexit import MultiExitBert
from eeengine.token_pruning import TokenPruning

EXECUTORS = ("torch", "onnxruntime")
PRECISIONS = ("fp32", "bf16", "int8", "int8_static")
# The executors that run each precision, preferred first.
_PRECISION_EXECUTORS = {
    "fp32": ("onnxruntime", "torch"),
    "bf16": ("torch",),
    "int8": ("onnxruntime",),
    "int8_static": ("onnxruntime",),
}


def make_executor(
    name: str | None,
    model: MultiExitBert,
    precision: str = "fp32",
    token_pruning: TokenPruning | None = None,
    release_weights: bool = False,
    checkpoint: str | Path | None = None,
    activations: dict | None = None,
) -> LayerExecutor:
    """Build the executor ``name`` for ``model`` (in eval mode, weights final).

    Args:
        name: "torch", "onnxruntime", or None for the first of those that runs ``precision``
            here: "onnxruntime" where it can run (onnxruntime installed; a BERT backbone with
            exact GELU, on CPU, in eval mode) for fp32 and int8, "torch" otherwise.
        model: the multi-exit model.
        precision: "fp32", "bf16", "int8" or "int8_static" (see the module docstring).
        token_pruning: the MPEE schedule the loop will run (None: none); its layers run
            through :meth:`LayerExecutor.pruned_layer`: ``onnxruntime`` builds each as two
            sessions (attention, feed-forward) with the pruning between them; a bf16 ``torch``
            executor leaves them in float32.
        release_weights: the caller owns ``model`` and runs its layers only through the
            executor, so the executor keeps one copy of the weights: ``onnxruntime`` drops the
            torch weights of the layers (:meth:`OnnxRuntimeExecutor.release_torch_layers`).
            False: the caller may still run the torch layers itself (they stay as they are,
            except that a bf16 executor casts them).
        checkpoint: "int8_static" only: the checkpoint directory holding its activation
            statistics (:func:`eeengine.executors.int8_static.read_activations`), unless
            ``activations`` gives them (:func:`eeengine.executors.int8_static.activation_absmax`).

    Returns:
        The executor.

    Raises:
        ValueError: an unknown name or precision, an executor that does not run the
            precision, or one that cannot run here (the message says why).
        FileNotFoundError: "int8_static" without ``checkpoint`` statistics (the message names
            the command that measures them).
        eeengine.checkpoint.CheckpointError: its statistics are corrupt (file and key named).
    """
    if name is not None and name not in EXECUTORS:
        raise ValueError(f"unknown executor {name!r}; available: {', '.join(EXECUTORS)}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; available: {', '.join(PRECISIONS)}")
    candidates = _PRECISION_EXECUTORS[precision]
    if name is not None and name not in candidates:
        raise ValueError(
            f"precision {precision!r} runs on the {' or '.join(candidates)} executor, not {name!r}"
        )
    reason = _onnxruntime_unavailable(model)
    if name is None:
        name = next((c for c in candidates if c != "onnxruntime" or reason is None), None)
        if name is None:
            raise ValueError(
                f"precision {precision!r} needs the onnxruntime executor, which is not "
                f"available: {reason}"
            )
    elif name == "onnxruntime" and reason is not None:
        raise ValueError(f"executor 'onnxruntime' is not available: {reason}")
    pruning_layers = frozenset(() if token_pruning is None else token_pruning.indices)
    if name == "torch":
        return TorchExecutor(model, precision, pruning_layers)
    from eeengine.executors.onnxruntime import OnnxRuntimeExecutor

    if precision == "int8_static" and activations is None:
        from eeengine.executors.int8_static import read_activations

        if checkpoint is None:
            raise FileNotFoundError("precision 'int8_static' needs a checkpoint's statistics")
        activations = read_activations(checkpoint, model)
    executor = OnnxRuntimeExecutor(
        model, precision, pruning_layers=pruning_layers, activations=activations
    )
    if release_weights:
        executor.release_torch_layers()
    return executor


def precision_unavailable(precision: str, model: MultiExitBert) -> str | None:
    """Why no executor runs ``precision`` for ``model`` as it is now (device, mode), or None
    when :func:`make_executor` ``(None, model, precision)`` can build one.

    Raises:
        ValueError: an unknown precision.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; available: {', '.join(PRECISIONS)}")
    if "torch" in _PRECISION_EXECUTORS[precision]:
        return None
    return _onnxruntime_unavailable(model)


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


__all__ = [
    "EXECUTORS",
    "PRECISIONS",
    "LayerExecutor",
    "TorchExecutor",
    "make_executor",
    "precision_unavailable",
]
