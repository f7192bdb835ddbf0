"""What a practitioner would deploy instead of eeengine, as ``Predict`` functions
(inputs -> predicted class indices) over one checkpoint's weights and its last exit head.

- :func:`torch_provider` of :class:`FullDepth`: Hugging Face ``transformers.BertModel`` (SDPA
  attention) at full depth, eager or under ``torch.compile``.
- :func:`onnxruntime_provider`: the same model exported with **eager** attention (the ONNX
  graph of transformers' SDPA path is not one ONNX Runtime's BERT optimizer recognizes, so its
  ``Attention`` would stay unfused), optimized with ``onnxruntime.transformers.optimizer``
  (model type ``bert``: fused ``Attention``, ``EmbedLayerNormalization``,
  ``SkipLayerNormalization``, ``BiasGelu``), and with ``int8=True`` then quantized with
  ``onnxruntime.quantization.quantize_dynamic`` (int8 weights, per tensor; activations
  quantized on the fly): the ONNX Runtime / optimum recipe for CPU serving.
- :func:`papers_loop_provider`: the papers' batch-1 loop with a host check after every layer.
- :func:`engine_provider`: ``Engine.predict`` itself.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import BertModel as HFBertModel

from eeengine import Engine
from eeengine.batching import length_sorted_batches
from eeengine.policies.base import entropy

Predict = Callable[[list], list[int]]
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


class FullDepth(torch.nn.Module):
    """transformers.BertModel with the checkpoint's last exit head: logits (batch, C).

    Args:
        engine: the engine whose weights are copied.
        attn_implementation: transformers' attention ("sdpa", its default, or "eager").
    """

    def __init__(self, engine: Engine, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        self.bert = HFBertModel._from_config(
            copy.deepcopy(engine.model.config),  # _from_config sets the attention on it
            attn_implementation=attn_implementation,
            add_pooling_layer=False,
        )
        self.bert.load_state_dict(engine.model.bert.state_dict())
        self.head = engine.model.exit_heads[-1]
        self.eval()

    def forward(self, input_ids, attention_mask, token_type_ids):
        hidden = self.bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        return self.head(hidden, attention_mask)


def tokenize(engine: Engine, inputs: Sequence, return_tensors: str = "pt") -> dict:
    """Tokenize texts, or (text, text_pair) tuples, the same way for every provider
    (truncated at the engine's ``max_length``)."""
    pairs = [pair for _, pair in inputs] if isinstance(inputs[0], tuple) else None
    texts = [text for text, _ in inputs] if pairs is not None else list(inputs)
    return engine.tokenizer(
        texts,
        pairs,
        padding=True,
        truncation=True,
        max_length=engine.max_length,
        return_tensors=return_tensors,
    )


def torch_provider(engine: Engine, module: Callable) -> Predict:
    @torch.inference_mode()
    def predict(texts: list) -> list[int]:
        enc = tokenize(engine, texts)
        logits = module(*(enc[n] for n in INPUT_NAMES))
        return logits.argmax(-1).tolist()

    return predict


def export_optimized(engine: Engine, workdir: Path) -> tuple[Path, dict[str, int]]:
    """Export :class:`FullDepth` with eager attention and run ONNX Runtime's BERT optimizer.

    Returns:
        The optimized model's path and the optimizer's fused-operator counts (which fusions
        applied, e.g. ``{"Attention": 6, ...}``).
    """
    from onnxruntime.transformers.optimizer import optimize_model

    raw, optimized = workdir / "model.onnx", workdir / "model.opt.onnx"
    enc = tokenize(engine, ["a dummy input", "another one for the batch axis"])
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES}
    torch.onnx.export(
        FullDepth(engine, attn_implementation="eager"),
        tuple(enc[n] for n in INPUT_NAMES),
        str(raw),
        input_names=list(INPUT_NAMES),
        output_names=["logits"],
        dynamic_axes={**axes, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    config = engine.model.config
    onnx_model = optimize_model(
        str(raw),
        model_type="bert",
        num_heads=config.num_attention_heads,
        hidden_size=config.hidden_size,
    )
    fusions = {k: v for k, v in onnx_model.get_fused_operator_statistics().items() if v}
    onnx_model.save_model_to_file(str(optimized))
    return optimized, fusions


def onnxruntime_provider(
    engine: Engine, workdir: Path, int8: bool = False, split_cost: float = math.inf
) -> tuple[Predict, dict]:
    """The whole model as one ONNX Runtime session (see the module docstring).

    Args:
        engine: the engine whose weights are exported.
        workdir: where the ONNX files are written.
        int8: quantize the optimized model with ``quantize_dynamic`` (QInt8 weights).
        split_cost: cut each call's batch where padding costs more than this many tokens, as
            ``Engine`` does on CPU (:func:`eeengine.batching.length_sorted_batches`); the
            default pads every call to its longest input, as one session is deployed. The
            provider also takes it per call (``predict(texts, split_cost=...)``).

    Returns:
        The provider and its settings: ``fusions`` (the optimizer's fused-operator counts) and,
        with ``int8``, ``quantization``.
    """
    import onnxruntime

    from eeengine.executors.ort_environment import neighbour_session_options

    path, fusions = export_optimized(engine, workdir)
    settings: dict = {"fusions": fusions}
    if int8:
        from onnx import TensorProto
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantized = workdir / "model.int8.onnx"
        quantize_dynamic(
            path,
            quantized,
            weight_type=QuantType.QInt8,
            per_channel=False,
            # ONNX shape inference cannot type the outputs of the fused com.microsoft ops.
            extra_options={"DefaultTensorType": TensorProto.FLOAT},
        )
        path = quantized
        settings["quantization"] = "quantize_dynamic QInt8 weights, per tensor"
    # ONNX Runtime's defaults, as deployed: its workers spin between runs (batch 1 at 1.6 ms
    # instead of 2.5 with spinning off, alone in a process), which is why compare.py measures
    # latency in blocks of inputs per provider, not alternating at every input.
    options = neighbour_session_options(torch.get_num_threads())
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def predict(texts: list, split_cost: float = split_cost) -> list[int]:
        enc = tokenize(engine, texts, "np")
        lengths = enc["attention_mask"].sum(1).tolist()
        predicted = [0] * len(texts)
        for rows in length_sorted_batches(lengths, len(texts), split_cost):
            width = lengths[rows[0]]  # the longest of the rows
            (logits,) = session.run(None, {n: enc[n][rows, :width] for n in INPUT_NAMES})
            for i, label in zip(rows, logits.argmax(-1).tolist(), strict=True):
                predicted[i] = label
        return predicted

    if split_cost != math.inf:
        settings["split_cost"] = split_cost
    return predict, settings


def papers_loop_provider(engine: Engine, threshold: float) -> Predict:
    """One sample at a time, host check per layer (DeeBERT / PABEE style, raw entropy in nats),
    on eeengine's torch layers (HF's modules would only add overhead, so this is a lower bound
    on that loop's cost)."""
    model = engine.model

    @torch.inference_mode()
    def predict(texts: list) -> list[int]:
        labels = []
        for text in texts:
            enc = tokenize(engine, [text])
            hidden = model.bert.embeddings(enc["input_ids"], enc["token_type_ids"])
            for layer, head in zip(model.bert.encoder.layer, model.exit_heads, strict=True):
                hidden = layer(hidden, None)
                logits = head(hidden, enc["attention_mask"])
                if entropy(logits).item() < threshold:
                    break
            labels.append(int(logits.argmax(-1).item()))
        return labels

    return predict


def engine_provider(engine: Engine) -> Predict:
    names = engine.label_names

    def predict(texts: list) -> list[int]:
        return [names.index(p.label) for p in engine.predict(texts, batch_size=len(texts))]

    return predict
