"""ONNX graphs of BERT layers, built from the torch weights, for the ONNX Runtime executor
(:mod:`eeengine.executors.onnxruntime`).

The graphs are built directly from the torch weights with ONNX Runtime's fused transformer ops
(domain ``com.microsoft``), the same ops its BERT graph optimizer produces. One layer:

    ctx  = Attention(x, [Wq|Wk|Wv], [bq|bk|bv], mask)          # fused QKV + softmax(QKᵀ/√d)V
    a    = LayerNorm(ctx @ Woᵀ + bo + x; γ1, β1)                # skip_layer_norm: Add, Add, LN
    h    = BiasGelu(a @ Wiᵀ, bi)                               # exact (erf) GELU, not FastGelu
    out  = LayerNorm(h @ Wo2ᵀ + bo2 + a; γ2, β2)

and the embeddings are one ``EmbedLayerNormalization`` (word + position + token-type, then
LayerNorm). So no exporter or optimizer pass decides the fusions, and none approximates GELU.
The executor builds them at load time (well under a second for MiniLM).

Precision "int8" (:func:`quantize_int8`): each layer graph goes through ONNX Runtime's
dynamic quantization (:func:`onnxruntime.quantization.quantize_dynamic`) with per-channel int8
weights (one scale per output column, the DESIGN.md measurement: plain per-tensor weights
cost a point of SST-2 accuracy), so ``Attention`` becomes ``QAttention`` and each ``MatMul`` a
``MatMulInteger`` on activations quantized per call (``DynamicQuantizeLinear``, uint8).
Weights use the full int8 range where the CPU has VNNI (u8·s8 dot products without
saturation), 7 bits (``reduce_range``) where it has not. LayerNorm, GELU, the softmax and the
embeddings stay fp32; so do the exit heads, which run in eeengine.

For MPEE token pruning a layer can also be built as its two sublayers:
:func:`attention_graph` (which also returns the [CLS] query and the keys the pruning rule
reads) and :func:`feed_forward_graph`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor

from eeengine.cpu_flags import cpu_has_vnni
from eeengine.modeling_bert import BertEmbeddings, BertLayer

if TYPE_CHECKING:
    from onnxruntime import InferenceSession, SessionOptions

_OPSET = 17
_MS = "com.microsoft"  # ONNX Runtime's contrib ops


def layer_graph(layer: BertLayer, num_heads: int, eps: float) -> onnx.ModelProto:
    """The ONNX model of one post-LayerNorm BERT layer (see the module docstring).

    Args:
        layer: the torch layer whose weights are copied (as float32).
        num_heads: attention heads.
        eps: LayerNorm epsilon.

    Returns:
        A model with inputs ``hidden_states`` (batch, seq, hidden) float32 and
        ``attention_mask`` (batch, seq) int32 (1 = real token), and output ``output``
        (batch, seq, hidden) float32.
    """
    attention_nodes, attention_weights = _attention_sublayer(layer, num_heads, eps)
    ffn_nodes, ffn_weights = _feed_forward_sublayer(layer, eps)
    hidden = _hidden_shape(layer)
    return _model(
        "bert_layer",
        attention_nodes + ffn_nodes,
        attention_inputs(hidden),
        [_float("output", hidden)],
        {**attention_weights, **ffn_weights},
    )


def attention_graph(layer: BertLayer, num_heads: int, eps: float) -> onnx.ModelProto:
    """The attention sublayer of :func:`layer_graph` alone, with what MPEE's token pruning
    reads (:meth:`eeengine.modeling_bert.PrunableLayer.pruned_forward`): the [CLS] query and
    the keys. ``Attention``'s optional ``present`` output holds the keys and values it
    attended with (``present[0]`` the keys: no copy is made of them); the [CLS] query is
    recomputed from [CLS]'s input row (one row through the query weights).

    Returns:
        A model with the inputs of :func:`layer_graph` and outputs ``attention_output``
        (batch, seq, hidden), ``cls_query`` (batch, num_heads, head_size) and ``present``
        (2, batch, num_heads, seq, head_size), float32.
    """
    nodes, weights = _attention_sublayer(layer, num_heads, eps, present="present")
    cls_nodes, cls_weights = cls_query_nodes(layer, num_heads)
    head_size = layer.attention.self.query.out_features // num_heads
    hidden = _hidden_shape(layer)
    outputs = [
        _float("attention_output", hidden),
        _float("cls_query", ["batch", num_heads, head_size]),
        _float("present", [2, "batch", num_heads, "seq", head_size]),
    ]
    return _model(
        "bert_attention", nodes + cls_nodes, attention_inputs(hidden), outputs,
        weights | cls_weights,
    )  # fmt: skip


def cls_query_nodes(
    layer: BertLayer, num_heads: int
) -> tuple[list[onnx.NodeProto], dict[str, Tensor]]:
    """Nodes ``hidden_states`` -> ``cls_query`` (batch, num_heads, head_size): [CLS]'s input
    row through the layer's query projection (fp32), what MPEE's pruning rule scores the keys
    against; and their weights."""
    query = layer.attention.self.query
    head_size = query.out_features // num_heads
    weights = {
        "query_weight": query.weight.T,
        "query_bias": query.bias,
        "zero": torch.tensor(0, dtype=torch.int64),
        "cls_query_shape": torch.tensor([-1, num_heads, head_size], dtype=torch.int64),
    }
    nodes = [
        helper.make_node("Gather", ["hidden_states", "zero"], ["cls_hidden"], axis=1),
        helper.make_node("MatMul", ["cls_hidden", "query_weight"], ["cls_projected"]),
        helper.make_node("Add", ["cls_projected", "query_bias"], ["cls_query_flat"]),
        helper.make_node("Reshape", ["cls_query_flat", "cls_query_shape"], ["cls_query"]),
    ]
    return nodes, weights


def feed_forward_graph(layer: BertLayer, eps: float) -> onnx.ModelProto:
    """The feed-forward sublayer of :func:`layer_graph` alone: input ``attention_output``
    (batch, seq, hidden) float32, output ``output`` of the same shape."""
    nodes, weights = _feed_forward_sublayer(layer, eps)
    hidden = _hidden_shape(layer)
    inputs = [_float("attention_output", hidden)]
    return _model("bert_feed_forward", nodes, inputs, [_float("output", hidden)], weights)


def _attention_sublayer(
    layer: BertLayer, num_heads: int, eps: float, present: str | None = None
) -> tuple[list[onnx.NodeProto], dict[str, Tensor]]:
    """Nodes ``hidden_states``, ``attention_mask`` -> ``attention_output`` (and the keys and
    values in ``present`` when it is named), and their weights."""
    attention = layer.attention
    qkv = (attention.self.query, attention.self.key, attention.self.value)
    weights = {
        "qkv_weight": torch.cat([p.weight for p in qkv]).T,
        "qkv_bias": torch.cat([p.bias for p in qkv]),
        "attn_out_weight": attention.output.dense.weight.T,
        "attn_out_bias": attention.output.dense.bias,
        "ln1_gamma": attention.output.LayerNorm.weight,
        "ln1_beta": attention.output.LayerNorm.bias,
    }
    nodes = [
        helper.make_node(
            "Attention",
            ["hidden_states", "qkv_weight", "qkv_bias", "attention_mask"],
            ["context", present] if present else ["context"],
            domain=_MS,
            num_heads=num_heads,
        ),
        *_output_block("context", "attn_out", "hidden_states", "ln1", "attention_output", eps),
    ]
    return nodes, weights


def _feed_forward_sublayer(
    layer: BertLayer, eps: float
) -> tuple[list[onnx.NodeProto], dict[str, Tensor]]:
    """Nodes ``attention_output`` -> ``output``, and their weights."""
    intermediate, output = layer.intermediate, layer.output
    weights = {
        "ffn_in_weight": intermediate.dense.weight.T,
        "ffn_in_bias": intermediate.dense.bias,
        "ffn_out_weight": output.dense.weight.T,
        "ffn_out_bias": output.dense.bias,
        "ln2_gamma": output.LayerNorm.weight,
        "ln2_beta": output.LayerNorm.bias,
    }
    nodes = [
        helper.make_node("MatMul", ["attention_output", "ffn_in_weight"], ["ffn_in"]),
        helper.make_node("BiasGelu", ["ffn_in", "ffn_in_bias"], ["ffn_act"], domain=_MS),
        *_output_block("ffn_act", "ffn_out", "attention_output", "ln2", "output", eps),
    ]
    return nodes, weights


def _output_block(
    x: str, dense: str, residual: str, norm: str, output: str, eps: float
) -> list[onnx.NodeProto]:
    """The end of each BERT sublayer (Hugging Face's ``BertSelfOutput`` / ``BertOutput``):
    ``output = LayerNorm(x @ {dense}_weight + {dense}_bias + residual)`` with
    ``{norm}_gamma`` / ``{norm}_beta``: a MatMul, then :func:`skip_layer_norm`."""
    return [
        helper.make_node("MatMul", [x, f"{dense}_weight"], [dense]),
        *skip_layer_norm(
            dense, residual, f"{dense}_bias", f"{norm}_gamma", f"{norm}_beta", output, eps
        ),
    ]


def skip_layer_norm(
    x: str, residual: str, bias: str, gamma: str, beta: str, output: str, eps: float
) -> list[onnx.NodeProto]:
    """``output = LayerNorm(x + bias + residual)`` over the last axis (biased variance, as
    torch): what ONNX Runtime's fused ``SkipLayerNormalization`` computes, as two ``Add`` and
    the standard ``LayerNormalization`` (opset 17).

    The fused op's CPU kernel (ONNX Runtime 1.32, here) takes about 2 us per token of 384
    values: at 25 tokens, alone in a session, 55 us against 18 us for these three nodes, and
    further from a float64 LayerNorm (``benchmarks/layer_norm.py``, BENCHMARKS.md "LayerNorm
    as standard ops"). ONNX Runtime's optimizer would fuse them back into the slow op:
    :func:`cpu_session` disables that pass.
    """
    p = f"{output}/ln/"
    return [
        helper.make_node("Add", [x, bias], [p + "biased"]),
        helper.make_node("Add", [p + "biased", residual], [p + "sum"]),
        helper.make_node(
            "LayerNormalization", [p + "sum", gamma, beta], [output], axis=-1, epsilon=eps
        ),
    ]


def cpu_session(model: bytes | str, options: SessionOptions) -> InferenceSession:
    """An ONNX Runtime CPU session of a model built here (bytes or a path), with ``options``,
    without the ``SkipLayerNormFusion`` pass, which would turn :func:`skip_layer_norm`'s
    ``Add`` + ``LayerNormalization`` back into the slower fused op."""
    import onnxruntime

    return onnxruntime.InferenceSession(
        model,
        options,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=["SkipLayerNormFusion"],
    )


def _hidden_shape(layer: BertLayer) -> list[str | int]:
    return ["batch", "seq", layer.attention.output.dense.out_features]


def attention_inputs(hidden: list[str | int]) -> list[onnx.ValueInfoProto]:
    """The inputs of a layer or attention graph: ``hidden_states`` of shape ``hidden``
    float32 and ``attention_mask`` (batch, seq) int32."""
    return [
        _float("hidden_states", hidden),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT32, ["batch", "seq"]),
    ]


def _float32(tensor: Tensor) -> Tensor:
    return tensor.float() if tensor.is_floating_point() else tensor


def _float(name: str, shape: list[str | int]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def embeddings_graph(embeddings: BertEmbeddings) -> tuple[onnx.ModelProto, dict[str, Tensor]]:
    """The ONNX model of :class:`eeengine.modeling_bert.BertEmbeddings`: one
    ``EmbedLayerNormalization`` (positions 0 .. seq - 1).

    Returns:
        The model, with inputs ``input_ids`` and ``token_type_ids``, (batch, seq) int32, and
        output ``output`` (batch, seq, hidden) float32; and its weights, the torch parameters
        themselves (float32, contiguous), which the model takes as further inputs of the same
        names (bound by pointer, the session reads their memory: no copy).

    Raises:
        ValueError: a weight is not float32 and contiguous.
    """
    weights = {
        "word_embeddings": embeddings.word_embeddings.weight,
        "position_embeddings": embeddings.position_embeddings.weight,
        "token_type_embeddings": embeddings.token_type_embeddings.weight,
        "ln_gamma": embeddings.LayerNorm.weight,
        "ln_beta": embeddings.LayerNorm.bias,
    }
    for key, value in weights.items():
        if value.dtype != torch.float32 or not value.is_contiguous():
            raise ValueError(f"embeddings {key}: float32 contiguous weights needed")
    ids = ["input_ids", "token_type_ids"]
    node = helper.make_node(
        "EmbedLayerNormalization",
        [*ids, *weights],
        ["output", "mask_index"],  # the op requires its second output; nothing reads it
        domain=_MS,
        epsilon=embeddings.LayerNorm.eps,
    )
    shape = ["batch", "seq"]
    inputs = [helper.make_tensor_value_info(name, TensorProto.INT32, shape) for name in ids]
    inputs += [
        helper.make_tensor_value_info(key, TensorProto.FLOAT, list(value.shape))
        for key, value in weights.items()
    ]
    hidden = [*shape, embeddings.word_embeddings.embedding_dim]
    model = _model("bert_embeddings", [node], inputs, [_float("output", hidden)], {})
    return model, {key: value.detach() for key, value in weights.items()}


def _model(
    name: str,
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: dict[str, Tensor],
) -> onnx.ModelProto:
    """A model of ``nodes``; ``initializers`` are copied (floating point ones as float32)."""
    return model_of(name, nodes, inputs, outputs, as_arrays(initializers))


def as_arrays(tensors: dict[str, Tensor]) -> dict[str, np.ndarray]:
    """Initializer values from torch tensors: contiguous CPU copies, floating point ones as
    float32."""
    return {
        key: _float32(value).detach().contiguous().cpu().numpy() for key, value in tensors.items()
    }


def model_of(
    name: str,
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: dict[str, np.ndarray],
) -> onnx.ModelProto:
    """A model of ``nodes`` with ``initializers`` (name -> array), on the standard opset and
    ONNX Runtime's contrib ops (``com.microsoft``)."""
    tensors = [initializer(key, value) for key, value in initializers.items()]
    graph = helper.make_graph(nodes, name, inputs, outputs, tensors)
    opsets = [helper.make_opsetid("", _OPSET), helper.make_opsetid(_MS, 1)]
    return helper.make_model(graph, opset_imports=opsets)


def initializer(name: str, value: np.ndarray) -> onnx.TensorProto:
    """``value`` as an initializer named ``name``, C-contiguous, its shape kept: a 0-d value
    stays 0-d (``np.ascontiguousarray`` makes it 1-d, and a 1-d index makes ``Gather`` keep
    the axis)."""
    return numpy_helper.from_array(np.array(value, order="C"), name)


def quantize_int8(model: onnx.ModelProto, output: Path) -> None:
    """Write ``model`` with int8 weights to ``output``: ONNX Runtime's dynamic quantization,
    per-channel, 7-bit weights (``reduce_range``) on CPUs without VNNI (see the module
    docstring)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The quantizer logs a hint about its pre-processing pass (for exported graphs; these are
    # built already fused) on the root logger at every call.
    previous = logging.root.manager.disable
    logging.disable(max(previous, logging.WARNING))
    try:
        quantize_dynamic(
            model,
            output,
            per_channel=True,
            reduce_range=not cpu_has_vnni(),
            weight_type=QuantType.QInt8,
            # The contrib ops' outputs have no inferred type; they are all float32.
            extra_options={"DefaultTensorType": TensorProto.FLOAT},
        )
    finally:
        logging.disable(previous)
