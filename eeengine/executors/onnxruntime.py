"""ONNX Runtime executor: each encoder layer is its own ONNX Runtime session.

Each layer's graph is built directly from the torch weights with ONNX Runtime's fused
transformer ops (domain ``com.microsoft``), the same ops its BERT graph optimizer produces:

    ctx  = Attention(x, [Wq|Wk|Wv], [bq|bk|bv], mask)          # fused QKV + softmax(QKᵀ/√d)V
    a    = SkipLayerNormalization(ctx @ Woᵀ, x, γ1, β1, bo)    # LayerNorm(ctx Woᵀ + bo + x)
    h    = BiasGelu(a @ Wiᵀ, bi)                               # exact (erf) GELU, not FastGelu
    out  = SkipLayerNormalization(h @ Wo2ᵀ, a, γ2, β2, bo2)

so no exporter or optimizer pass decides the fusions (and none approximates GELU). The graphs
are built in memory at load time (a few ms per layer; nothing is written to disk). Hidden
states stay torch tensors: each session reads and writes them in place through IOBinding
(pointers, no copies), so the exit head, the policy step and the batch compaction between
layers run in eeengine as with the torch executor. The embeddings run in torch.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor

from eeengine.modeling_bert import BertLayer
from eeengine.modeling_multiexit import MultiExitBert

_OPSET = 17


def layer_graph(layer: BertLayer, num_heads: int, eps: float) -> onnx.ModelProto:
    """The ONNX model of one post-LayerNorm BERT layer (see the module docstring).

    Args:
        layer: the torch layer whose weights are copied (float32).
        num_heads: attention heads.
        eps: LayerNorm epsilon.

    Returns:
        A model with inputs ``hidden_states`` (batch, seq, hidden) float32 and
        ``attention_mask`` (batch, seq) int32 (1 = real token), output ``output``
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
    initializers = [
        numpy_helper.from_array(value.detach().float().contiguous().cpu().numpy(), name)
        for name, value in weights.items()
    ]
    ms = "com.microsoft"
    nodes = [
        helper.make_node(
            "Attention",
            ["hidden_states", "qkv_weight", "qkv_bias", "attention_mask"],
            ["context"],
            domain=ms,
            num_heads=num_heads,
        ),
        helper.make_node("MatMul", ["context", "attn_out_weight"], ["attn_proj"]),
        helper.make_node(
            "SkipLayerNormalization",
            ["attn_proj", "hidden_states", "ln1_gamma", "ln1_beta", "attn_out_bias"],
            ["attention_output"],
            domain=ms,
            epsilon=eps,
        ),
        helper.make_node("MatMul", ["attention_output", "ffn_in_weight"], ["ffn_in"]),
        helper.make_node("BiasGelu", ["ffn_in", "ffn_in_bias"], ["ffn_act"], domain=ms),
        helper.make_node("MatMul", ["ffn_act", "ffn_out_weight"], ["ffn_out"]),
        helper.make_node(
            "SkipLayerNormalization",
            ["ffn_out", "attention_output", "ln2_gamma", "ln2_beta", "ffn_out_bias"],
            ["output"],
            domain=ms,
            epsilon=eps,
        ),
    ]
    hidden = ["batch", "seq", attention.output.dense.out_features]
    graph = helper.make_graph(
        nodes,
        "bert_layer",
        [
            helper.make_tensor_value_info("hidden_states", TensorProto.FLOAT, hidden),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT32, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, hidden)],
        initializers,
    )
    opsets = [helper.make_opsetid("", _OPSET), helper.make_opsetid(ms, 1)]
    return helper.make_model(graph, opset_imports=opsets)


class OnnxRuntimeExecutor:
    """Runs each encoder layer of a CPU, float32 :class:`MultiExitBert` as an ONNX Runtime
    session (see the module docstring); the embeddings run in torch.

    Args:
        model: the multi-exit model, on CPU, in eval mode.
        num_threads: ONNX Runtime intra-op threads (default: ``torch.get_num_threads()``).
    """

    name = "onnxruntime"

    def __init__(self, model: MultiExitBert, num_threads: int | None = None) -> None:
        self.model = model
        config = model.config
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = num_threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        # The exit head and policy step run in torch between two sessions: ORT's workers must
        # not spin-wait for more work while torch needs the cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._sessions = [
            onnxruntime.InferenceSession(
                layer_graph(
                    layer, config.num_attention_heads, config.layer_norm_eps
                ).SerializeToString(),
                options,
                providers=["CPUExecutionProvider"],
            )
            for layer in model.bert.encoder.layer
        ]
        self._bindings = [session.io_binding() for session in self._sessions]

    def embed(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        """(batch_size, seq_len) int64 ids -> (batch_size, seq_len, hidden_size) float32."""
        return self.model.bert.embeddings(input_ids, token_type_ids)

    def mask(self, attention_mask: Tensor) -> Tensor:
        """The (batch_size, seq_len) 1/0 mask as contiguous int32, what ``Attention`` takes."""
        return attention_mask.to(torch.int32).contiguous()

    def layer(self, index: int, hidden_states: Tensor, mask: Tensor) -> Tensor:
        """Layer ``index`` (0-based) on (batch_size, seq_len, hidden_size) float32 CPU hidden
        states; returns a new tensor of the same shape, written by ONNX Runtime in place."""
        hidden_states = hidden_states.contiguous()
        output = torch.empty_like(hidden_states)
        binding = self._bindings[index]
        _bind(binding.bind_input, "hidden_states", hidden_states, np.float32)
        _bind(binding.bind_input, "attention_mask", mask, np.int32)
        _bind(binding.bind_output, "output", output, np.float32)
        self._sessions[index].run_with_iobinding(binding)
        return output


def _bind(bind: object, name: str, tensor: Tensor, dtype: type) -> None:
    bind(name, "cpu", 0, dtype, list(tensor.shape), tensor.data_ptr())
