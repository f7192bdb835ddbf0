"""ONNX Runtime executor: the embeddings and each encoder layer are ONNX Runtime sessions.

The graphs are built directly from the torch weights with ONNX Runtime's fused transformer ops
(domain ``com.microsoft``), the same ops its BERT graph optimizer produces. One layer:

    ctx  = Attention(x, [Wq|Wk|Wv], [bq|bk|bv], mask)          # fused QKV + softmax(QKᵀ/√d)V
    a    = SkipLayerNormalization(ctx @ Woᵀ, x, γ1, β1, bo)    # LayerNorm(ctx Woᵀ + bo + x)
    h    = BiasGelu(a @ Wiᵀ, bi)                               # exact (erf) GELU, not FastGelu
    out  = SkipLayerNormalization(h @ Wo2ᵀ, a, γ2, β2, bo2)

and the embeddings are one ``EmbedLayerNormalization`` (word + position + token-type, then
LayerNorm). So no exporter or optimizer pass decides the fusions, and none approximates GELU.
The graphs are built in memory at load time (well under a second for MiniLM; nothing is
written to disk). Hidden states stay torch tensors: each session reads and writes them in place
through IOBinding (pointers, no copies), and the exit head, the policy step and the batch
compaction between layers run in eeengine exactly as with the torch executor. Running the
embeddings in ONNX Runtime too means no multi-threaded torch op runs between two sessions
(waking torch's thread pool costs more than a small op at batch 1 on a busy CPU).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor

from eeengine.modeling_bert import BertEmbeddings, BertLayer
from eeengine.modeling_multiexit import MultiExitBert

_OPSET = 17
_MS = "com.microsoft"  # ONNX Runtime's contrib ops
_NUMPY_DTYPES = {torch.float32: np.float32, torch.int32: np.int32}


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
    attention, intermediate, output = layer.attention, layer.intermediate, layer.output
    qkv = (attention.self.query, attention.self.key, attention.self.value)
    weights = {
        "qkv_weight": torch.cat([p.weight for p in qkv]).T,
        "qkv_bias": torch.cat([p.bias for p in qkv]),
        "attn_out_weight": attention.output.dense.weight.T,
        "attn_out_bias": attention.output.dense.bias,
        "ln1_gamma": attention.output.LayerNorm.weight,
        "ln1_beta": attention.output.LayerNorm.bias,
        "ffn_in_weight": intermediate.dense.weight.T,
        "ffn_in_bias": intermediate.dense.bias,
        "ffn_out_weight": output.dense.weight.T,
        "ffn_out_bias": output.dense.bias,
        "ln2_gamma": output.LayerNorm.weight,
        "ln2_beta": output.LayerNorm.bias,
    }
    nodes = [
        helper.make_node(
            "Attention",
            ["hidden_states", "qkv_weight", "qkv_bias", "attention_mask"],
            ["context"],
            domain=_MS,
            num_heads=num_heads,
        ),
        helper.make_node("MatMul", ["context", "attn_out_weight"], ["attn_proj"]),
        helper.make_node(
            "SkipLayerNormalization",
            ["attn_proj", "hidden_states", "ln1_gamma", "ln1_beta", "attn_out_bias"],
            ["attention_output"],
            domain=_MS,
            epsilon=eps,
        ),
        helper.make_node("MatMul", ["attention_output", "ffn_in_weight"], ["ffn_in"]),
        helper.make_node("BiasGelu", ["ffn_in", "ffn_in_bias"], ["ffn_act"], domain=_MS),
        helper.make_node("MatMul", ["ffn_act", "ffn_out_weight"], ["ffn_out"]),
        helper.make_node(
            "SkipLayerNormalization",
            ["ffn_out", "attention_output", "ln2_gamma", "ln2_beta", "ffn_out_bias"],
            ["output"],
            domain=_MS,
            epsilon=eps,
        ),
    ]
    hidden = ["batch", "seq", attention.output.dense.out_features]
    inputs = [
        helper.make_tensor_value_info("hidden_states", TensorProto.FLOAT, hidden),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT32, ["batch", "seq"]),
    ]
    return _model("bert_layer", nodes, inputs, hidden, weights)


def embeddings_graph(embeddings: BertEmbeddings) -> onnx.ModelProto:
    """The ONNX model of :class:`eeengine.modeling_bert.BertEmbeddings`: one
    ``EmbedLayerNormalization`` (positions 0 .. seq - 1).

    Returns:
        A model with inputs ``input_ids`` and ``token_type_ids``, (batch, seq) int32, and
        output ``output`` (batch, seq, hidden) float32.
    """
    weights = {
        "word_embeddings": embeddings.word_embeddings.weight,
        "position_embeddings": embeddings.position_embeddings.weight,
        "token_type_embeddings": embeddings.token_type_embeddings.weight,
        "ln_gamma": embeddings.LayerNorm.weight,
        "ln_beta": embeddings.LayerNorm.bias,
    }
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
    hidden = [*shape, embeddings.word_embeddings.embedding_dim]
    return _model("bert_embeddings", [node], inputs, hidden, weights)


def _model(
    name: str,
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    output_shape: list[str | int],
    weights: dict[str, Tensor],
) -> onnx.ModelProto:
    """A model of ``nodes`` with one float32 output ``output`` and ``weights`` (copied as
    float32) as initializers."""
    graph = helper.make_graph(
        nodes,
        name,
        inputs,
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, output_shape)],
        [
            numpy_helper.from_array(value.detach().float().contiguous().cpu().numpy(), key)
            for key, value in weights.items()
        ],
    )
    opsets = [helper.make_opsetid("", _OPSET), helper.make_opsetid(_MS, 1)]
    return helper.make_model(graph, opset_imports=opsets)


class OnnxRuntimeExecutor:
    """Runs the embeddings and each encoder layer of a CPU, float32 :class:`MultiExitBert` with
    a BERT backbone and exact GELU as ONNX Runtime sessions (see the module docstring).

    Args:
        model: the multi-exit model, on CPU, in eval mode.
        num_threads: ONNX Runtime intra-op threads (default: ``torch.get_num_threads()``).
    """

    name = "onnxruntime"

    def __init__(self, model: MultiExitBert, num_threads: int | None = None) -> None:
        config = model.config
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = num_threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        # The exit head and policy step run in eeengine between two sessions: ORT's workers
        # must not spin-wait for more work while eeengine needs the cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # Shapes change at every compaction; ORT's arena keeps every size it ever served and
        # never gives memory back (measured: 2.9 GiB peak at batch 256 x 128 tokens with it,
        # 0.97 GiB without, same speed).
        options.enable_cpu_mem_arena = False
        graphs = [embeddings_graph(model.backbone.embeddings)] + [
            layer_graph(layer, config.num_attention_heads, config.layer_norm_eps)
            for layer in model.backbone.layers
        ]
        self._sessions = [
            onnxruntime.InferenceSession(
                graph.SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
            for graph in graphs
        ]
        self._bindings = [session.io_binding() for session in self._sessions]
        self._hidden_size = config.hidden_size

    def embed(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        """(batch_size, seq_len) int64 ids -> (batch_size, seq_len, hidden_size) float32."""
        output = torch.empty((*input_ids.shape, self._hidden_size), dtype=torch.float32)
        inputs = {"input_ids": _int32(input_ids), "token_type_ids": _int32(token_type_ids)}
        return self._run(0, inputs, output)

    def mask(self, attention_mask: Tensor) -> Tensor:
        """The (batch_size, seq_len) 1/0 mask as contiguous int32, what ``Attention`` takes."""
        return _int32(attention_mask)

    def layer(self, index: int, hidden_states: Tensor, mask: Tensor) -> Tensor:
        """Layer ``index`` (0-based) on (batch_size, seq_len, hidden_size) float32 CPU hidden
        states; returns a new tensor of the same shape, written by ONNX Runtime in place."""
        hidden_states = hidden_states.contiguous()
        inputs = {"hidden_states": hidden_states, "attention_mask": mask}
        return self._run(index + 1, inputs, torch.empty_like(hidden_states))

    def _run(self, session: int, inputs: dict[str, Tensor], output: Tensor) -> Tensor:
        """Run session ``session`` (0: embeddings, l: layer l) on contiguous CPU tensors bound
        by pointer (no copies); ``output`` is written in place and returned."""
        binding = self._bindings[session]
        for name, tensor in inputs.items():
            _bind(binding.bind_input, name, tensor)
        _bind(binding.bind_output, "output", output)
        self._sessions[session].run_with_iobinding(binding)
        return output


def _int32(tensor: Tensor) -> Tensor:
    return tensor.to(torch.int32).contiguous()


def _bind(bind: Callable, name: str, tensor: Tensor) -> None:
    bind(name, "cpu", 0, _NUMPY_DTYPES[tensor.dtype], list(tensor.shape), tensor.data_ptr())
