"""Precision "int8_static": int8 layers whose activation scales are fixed, so that a row's
answer does not depend on the rows it is batched with.

The "int8" precision (:func:`eeengine.executors.onnx_graphs.quantize_int8`, ONNX Runtime's
dynamic quantization) takes each matmul input's scale over the whole call: on SST-2 dev 12-17
of 872 labels change between batch 1 and batch 32 (``benchmarks/int8_batch_dependence.py``).
Here each of a layer's four matmul inputs (:data:`POINTS`) gets one scale calibrated on
held-out rows (:func:`activation_absmax`, stored in the checkpoint as
:data:`ACTIVATIONS_FILE`). BERT's activations have outlier channels that one fixed scale would
crush, so input channel k is first divided by ``s_k = max|x_k| ** alpha / max|W_k| ** (1 -
alpha)`` and weight row k multiplied by it (Xiao et al. 2023, SmoothQuant, eq. 4; exact before
rounding), with ``alpha`` = :data:`ALPHA`.

One layer (:func:`int8_static_layer_graph`), per matmul: ``Mul(x, 1 / s)``, ``QuantizeLinear``
with the calibrated per-tensor scale (uint8, zero point 128), ``MatMulIntegerToFloat`` with
per-column int8 weights; attention as ``MultiHeadAttention`` on the split QKV projection;
LayerNorm, GELU and the softmax in fp32. A layer that prunes tokens (MPEE) is its two
sublayers, :func:`int8_static_attention_graph` (also returning the [CLS] query and the keys the
pruning rule reads) and :func:`int8_static_feed_forward_graph`, with the same scales. Measured
on the default SST-2 checkpoint (BENCHMARKS.md, "A batch-independent int8"): no label changes
with the batch, probabilities 1.6x closer to fp32 than "int8", 13-16 % slower than it at batch
1 and 4-7 % at batch 32.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from safetensors.torch import save
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from eeengine.checkpoint import CheckpointError, read_safetensors, write_atomic
from eeengine.cpu_flags import cpu_has_vnni
from eeengine.data import Split
from eeengine.executors.onnx_graphs import (
    as_arrays,
    attention_inputs,
    cls_query_nodes,
    model_of,
    skip_layer_norm,
)
from eeengine.modeling_bert import BertLayer
from eeengine.modeling_multiexit import MultiExitBert

ACTIVATIONS_FILE = "int8-activations.safetensors"
ALPHA = 0.9  # SmoothQuant's migration strength (BENCHMARKS.md: 0.8-1.0 within a sentence)
CALIBRATION_ROWS = 512  # rows whose activations set the scales
_MS = "com.microsoft"
# A layer's four matmul inputs: name -> (the module of eeengine.modeling_bert.BertLayer that
# reads it, its value name in the graph).
POINTS = {
    "qkv": ("attention.self", "hidden_states"),
    "attn_out": ("attention.output.dense", "context"),
    "ffn_in": ("intermediate.dense", "attention_output"),
    "ffn_out": ("output.dense", "ffn_act"),
}


def activation_absmax(
    model: MultiExitBert,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    text_pairs: Sequence[str] | None = None,
    max_length: int | None = None,
    batch_size: int = 32,
) -> dict[str, Tensor]:
    """The largest |activation| of each input channel of every matmul input (:data:`POINTS`) of
    every layer, over the real tokens of ``texts``, with the fp32 torch layers of ``model``.

    Returns:
        ``{"layer{i}.{point}": (K,) float32}``, i 0-based, K the matmul's input width.

    Raises:
        ValueError: no texts.
    """
    if not texts:
        raise ValueError("int8_static: activation statistics need at least one text")
    stats: dict[str, Tensor] = {}
    real: dict[str, Tensor] = {}

    def hook(key: str):
        def record(_module, inputs):
            x = inputs[0][real["mask"]].abs().amax(0).float()
            stats[key] = x if key not in stats else torch.maximum(stats[key], x)

        return record

    handles = [
        layer.get_submodule(path).register_forward_pre_hook(hook(f"layer{i}.{point}"))
        for i, layer in enumerate(model.backbone.layers)
        for point, (path, _) in POINTS.items()
    ]
    try:
        for start in range(0, len(texts), batch_size):
            window = slice(start, start + batch_size)
            enc = tokenizer(
                list(texts[window]),
                None if text_pairs is None else list(text_pairs[window]),
                padding=True,
                truncation=max_length is not None,
                max_length=max_length,
                return_tensors="pt",
            )
            real["mask"] = enc["attention_mask"].bool()
            with torch.inference_mode():
                model.exits(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    finally:
        for handle in handles:
            handle.remove()
    return stats


def calibration_absmax(
    model: MultiExitBert, tokenizer: PreTrainedTokenizerBase, split: Split, max_length: int
) -> dict[str, Tensor]:
    """:func:`activation_absmax` over the first :data:`CALIBRATION_ROWS` rows of ``split``
    (the calibration rows of training and of ``eeengine calibrate``)."""
    rows = slice(0, CALIBRATION_ROWS)
    pairs = None if split.text_pairs is None else split.text_pairs[rows]
    return activation_absmax(model, tokenizer, split.texts[rows], pairs, max_length)


def activations_bytes(stats: dict[str, Tensor]) -> bytes:
    """``stats`` (:func:`activation_absmax`) as the content of :data:`ACTIVATIONS_FILE`."""
    return save({k: v.contiguous() for k, v in stats.items()}, metadata={"alpha": str(ALPHA)})


def write_activations(checkpoint: str | Path, stats: dict[str, Tensor]) -> Path:
    """Store ``stats`` (:func:`activation_absmax`) in ``checkpoint`` atomically; returns the
    file."""
    path = Path(checkpoint) / ACTIVATIONS_FILE
    data = activations_bytes(stats)
    write_atomic(path, lambda f: f.write(data))
    return path


def read_activations(checkpoint: str | Path, model: MultiExitBert) -> dict[str, Tensor]:
    """The activation statistics stored in ``checkpoint``, checked against ``model``.

    Raises:
        FileNotFoundError: there are none (the message says how to measure them).
        eeengine.checkpoint.CheckpointError: the file is corrupt, or a layer or point is
            missing, of the wrong width or not finite and positive (file and key named).
    """
    path = Path(checkpoint) / ACTIVATIONS_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"precision 'int8_static' needs {path}: measure it with `eeengine calibrate "
            f"--ckpt {checkpoint} --precision int8_static --write`"
        )
    stats = read_safetensors(path)
    config = model.config
    widths = {"qkv": config.hidden_size, "attn_out": config.hidden_size,
              "ffn_in": config.hidden_size, "ffn_out": config.intermediate_size}  # fmt: skip
    for i in range(model.num_layers):
        for point, width in widths.items():
            key = f"layer{i}.{point}"
            value = stats.get(key)
            if value is None:
                raise CheckpointError(f"{path}: no statistics for {key}")
            valid = bool(torch.isfinite(value).all() & (value >= 0).all())
            if value.shape != (width,) or not valid:
                raise CheckpointError(
                    f"{path}: {key} must be {width} finite, non-negative maxima, got shape "
                    f"{tuple(value.shape)}"
                )
    return stats


def int8_static_layer_graph(
    layer: BertLayer,
    num_heads: int,
    eps: float,
    stats: dict[str, Tensor],
    index: int,
    alpha: float = ALPHA,
) -> onnx.ModelProto:
    """Layer ``index`` (0-based) with smoothed, statically quantized matmul inputs (module
    docstring), from ``stats`` (:func:`activation_absmax`) and SmoothQuant's ``alpha``; inputs
    and output as :func:`eeengine.executors.onnx_graphs.layer_graph`."""
    graph = _StaticLayer(layer, stats, index, alpha)
    graph.attention(num_heads, eps)
    graph.feed_forward(eps)
    hidden = graph.hidden_shape
    return graph.model("bert_layer_int8_static", attention_inputs(hidden), {"output": hidden})


def int8_static_attention_graph(
    layer: BertLayer,
    num_heads: int,
    eps: float,
    stats: dict[str, Tensor],
    index: int,
    alpha: float = ALPHA,
) -> onnx.ModelProto:
    """The attention sublayer of :func:`int8_static_layer_graph`, for MPEE token pruning: the
    inputs of :func:`eeengine.executors.onnx_graphs.attention_graph`, and outputs
    ``attention_output`` (batch, seq, hidden), ``cls_query`` (batch, num_heads, head_size;
    fp32 query weights) and ``present_key`` (batch, num_heads, seq, head_size: the keys
    attended with), float32."""
    graph = _StaticLayer(layer, stats, index, alpha)
    graph.attention(num_heads, eps, present_key="present_key")
    cls_nodes, cls_weights = cls_query_nodes(layer, num_heads)
    graph.nodes += cls_nodes
    graph.tensors |= as_arrays(cls_weights)
    hidden = graph.hidden_shape
    head_size = hidden[-1] // num_heads
    outputs = {
        "attention_output": hidden,
        "cls_query": ["batch", num_heads, head_size],
        "present_key": ["batch", num_heads, "seq", head_size],
    }
    return graph.model("bert_attention_int8_static", attention_inputs(hidden), outputs)


def int8_static_feed_forward_graph(
    layer: BertLayer, eps: float, stats: dict[str, Tensor], index: int, alpha: float = ALPHA
) -> onnx.ModelProto:
    """The feed-forward sublayer of :func:`int8_static_layer_graph`: input and output as
    :func:`eeengine.executors.onnx_graphs.feed_forward_graph`. Its statistics are those of
    every token, a superset of the tokens pruning keeps."""
    graph = _StaticLayer(layer, stats, index, alpha)
    graph.feed_forward(eps)
    hidden = graph.hidden_shape
    inputs = [helper.make_tensor_value_info("attention_output", TensorProto.FLOAT, hidden)]
    return graph.model("bert_feed_forward_int8_static", inputs, {"output": hidden})


def weight_levels() -> int:
    """Largest int8 weight magnitude: 127, or 63 (7 bits) on CPUs without VNNI, whose u8·s8
    dot products add pairs of products in int16 and saturate with full-range weights (what
    ``reduce_range`` does for "int8"; :func:`eeengine.executors.onnx_graphs.quantize_int8`).
    On an AVX2-only CPU (AMD EPYC), the tiny test model's keys through the int8 projection
    were off by 3.7 % of their magnitude on average with 127 levels, 1.3 % with 63."""
    return 127 if cpu_has_vnni() else 63


class _StaticLayer:
    """The nodes and initializers of one layer's quantized sublayers, built in order."""

    def __init__(
        self, layer: BertLayer, stats: dict[str, Tensor], index: int, alpha: float
    ) -> None:
        self.layer, self.stats, self.index, self.alpha = layer, stats, index, alpha
        self.tensors: dict[str, np.ndarray] = {}
        self.nodes: list[onnx.NodeProto] = []
        self.hidden_size = layer.attention.output.dense.out_features
        self.hidden_shape: list[str | int] = ["batch", "seq", self.hidden_size]

    def linear(self, point: str, weight: Tensor, bias: Tensor | None, output: str) -> None:
        """``output = x @ weight (+ bias)`` for the matmul input ``point`` of :data:`POINTS`:
        smoothed, quantized with its calibrated scale, multiplied in int8."""
        weight = weight.detach().float()
        absmax = self.stats[f"layer{self.index}.{point}"].float()
        smooth = absmax.clamp_min(1e-5) ** self.alpha / weight.abs().amax(1).clamp_min(1e-5) ** (
            1 - self.alpha
        )
        weight = weight * smooth[:, None]
        levels = weight_levels()
        w_scale = weight.abs().amax(0).clamp_min(1e-12) / levels
        self.tensors.update({
            f"{point}_inv_smooth": (1.0 / smooth).numpy(),
            f"{point}_x_scale": np.array(float((absmax / smooth).max()) / 127.0, np.float32),
            f"{point}_x_zero": np.array(128, np.uint8),
            f"{point}_w": (weight / w_scale).round().clamp(-levels, levels).to(torch.int8).numpy(),
            f"{point}_w_scale": w_scale.numpy(),
        })  # fmt: skip
        x = POINTS[point][1]
        result = output if bias is None else f"{point}_nobias"
        self.nodes.extend([
            helper.make_node("Mul", [x, f"{point}_inv_smooth"], [f"{point}_smoothed"]),
            helper.make_node(
                "QuantizeLinear",
                [f"{point}_smoothed", f"{point}_x_scale", f"{point}_x_zero"],
                [f"{point}_q"],
            ),
            helper.make_node(
                "MatMulIntegerToFloat",
                [f"{point}_q", f"{point}_w", f"{point}_x_scale", f"{point}_w_scale",
                 f"{point}_x_zero"],
                [result],
                domain=_MS,
            ),
        ])  # fmt: skip
        if bias is not None:
            self.tensors[f"{point}_bias"] = bias.detach().float().numpy()
            self.nodes.append(helper.make_node("Add", [result, f"{point}_bias"], [output]))

    def norm(
        self, x: str, residual: str, ln: torch.nn.LayerNorm, bias: Tensor, output: str, eps: float
    ) -> None:
        """``output = LayerNorm(x + bias + residual)`` (:func:`skip_layer_norm`)."""
        for name, value in (("gamma", ln.weight), ("beta", ln.bias), ("dense_bias", bias)):
            self.tensors[f"{output}_{name}"] = value.detach().float().numpy()
        self.nodes += skip_layer_norm(
            x, residual, f"{output}_dense_bias", f"{output}_gamma", f"{output}_beta", output, eps
        )

    def attention(self, num_heads: int, eps: float, present_key: str = "") -> None:
        """``hidden_states``, ``attention_mask`` -> ``attention_output`` (and the keys in
        ``present_key`` when it is named)."""
        attention = self.layer.attention
        qkv = (attention.self.query, attention.self.key, attention.self.value)
        weight = torch.cat([p.weight for p in qkv]).T
        self.tensors["qkv_split"] = np.array([self.hidden_size] * 3, np.int64)
        self.linear("qkv", weight, torch.cat([p.bias for p in qkv]), "qkv")
        self.nodes += [
            helper.make_node("Split", ["qkv", "qkv_split"], ["q", "k", "v"], axis=-1),
            helper.make_node(
                "MultiHeadAttention", ["q", "k", "v", "", "attention_mask"],
                ["context", present_key, ""] if present_key else ["context"],
                domain=_MS, num_heads=num_heads,
            ),
        ]  # fmt: skip
        dense = attention.output.dense
        self.linear("attn_out", dense.weight.T, None, "attn_out")
        self.norm("attn_out", "hidden_states", attention.output.LayerNorm, dense.bias,
                  "attention_output", eps)  # fmt: skip

    def feed_forward(self, eps: float) -> None:
        """``attention_output`` -> ``output``."""
        layer = self.layer
        self.linear("ffn_in", layer.intermediate.dense.weight.T, None, "ffn_in")
        self.tensors["ffn_in_bias"] = layer.intermediate.dense.bias.detach().float().numpy()
        self.nodes.append(
            helper.make_node("BiasGelu", ["ffn_in", "ffn_in_bias"], ["ffn_act"], domain=_MS)
        )
        self.linear("ffn_out", layer.output.dense.weight.T, None, "ffn_out")
        self.norm("ffn_out", "attention_output", layer.output.LayerNorm, layer.output.dense.bias,
                  "output", eps)  # fmt: skip

    def model(
        self,
        name: str,
        inputs: list[onnx.ValueInfoProto],
        outputs: dict[str, list[str | int]],
    ) -> onnx.ModelProto:
        """The model of the nodes built so far, with float32 ``outputs`` (name -> shape)."""
        values = [
            helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in outputs.items()
        ]
        return model_of(name, self.nodes, inputs, values, self.tensors)
