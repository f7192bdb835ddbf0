"""Design study: int8 layers with calibrated (static) activation scales and SmoothQuant-style
smoothing, against the dynamic quantization eeengine's int8 uses today.

Today's int8 (:func:`eeengine.executors.onnx_graphs.quantize_int8`, ONNX Runtime's
``quantize_dynamic``) quantizes each matmul input with one scale taken over the whole call, so
a row's answer depends on the rows it is batched with (``int8_batch_dependence.py``). Here each
of a layer's four matmul inputs (the QKV projection's, the attention output's, the two
feed-forward ones) gets a fixed scale instead, calibrated once on held-out rows, so every row
is quantized the same way alone or batched. BERT's activations have outlier channels that one
fixed scale would crush, so each input channel k is first divided by
``s_k = max|x_k| ** alpha / max|W_k| ** (1 - alpha)`` and the weight rows multiplied by it
(Xiao et al. 2023, SmoothQuant, eq. 4; an exact rewrite of x @ W before rounding).

Per layer: ``Mul(x, 1 / s)`` (in a shipped graph three of the four fold into the preceding
LayerNorm or value weights), ``QuantizeLinear`` with the calibrated per-tensor scale (uint8,
zero point 128), ``MatMulIntegerToFloat`` with per-column int8 weights; attention as
``MultiHeadAttention`` on the split QKV projection. Calibration: the checkpoint's calibration
slice (held out of training); everything reported: SST-2 dev, through the checkpoint's
embeddings, six layer sessions of each scheme and its last exit head.

    EEENGINE_HOME=/work/eehome python benchmarks/int8_static.py --threads 2 \\
        --out benchmarks/results/int8_static
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from onnx import TensorProto, helper, numpy_helper
from results_io import write_results

from eeengine import Engine
from eeengine.data import get_task, load_split
from eeengine.defaults import default_checkpoint
from eeengine.executors.onnx_graphs import layer_graph, quantize_int8
from eeengine.modeling_bert import BertLayer
from eeengine.training.calibration_slice import calibration_slice

MS = "com.microsoft"
# The four matmul inputs of a layer: name -> (the module that reads it, graph value name).
POINTS = {
    "qkv": ("attention.self", "hidden_states"),
    "attn_out": ("attention.output.dense", "context"),
    "ffn_in": ("intermediate.dense", "attention_output"),
    "ffn_out": ("output.dense", "ffn_act"),
}


def channel_absmax(engine: Engine, texts: list[str], batch_size: int = 32) -> list[dict]:
    """Per layer, per point of :data:`POINTS`: the largest |activation| of each input channel
    over the real tokens of ``texts`` (fp32 torch model), a (K,) float32 tensor."""
    layers = engine.model.backbone.layers
    stats: list[dict] = [{} for _ in layers]
    real = {}

    def hook(index: int, point: str):
        def record(_module, inputs):
            x = inputs[0][real["mask"]].abs().amax(0)
            seen = stats[index].get(point)
            stats[index][point] = x if seen is None else torch.maximum(seen, x)

        return record

    handles = [
        layer.get_submodule(path).register_forward_pre_hook(hook(i, point))
        for i, layer in enumerate(layers)
        for point, (path, _) in POINTS.items()
    ]
    try:
        for start in range(0, len(texts), batch_size):
            enc = engine.tokenizer(
                texts[start : start + batch_size], padding=True, return_tensors="pt"
            )
            real["mask"] = enc["attention_mask"].bool()
            with torch.inference_mode():
                engine.model.exits(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    finally:
        for handle in handles:
            handle.remove()
    return stats


def static_layer_graph(
    layer: BertLayer, num_heads: int, eps: float, absmax: dict, alpha: float
) -> onnx.ModelProto:
    """One BERT layer with smoothed, statically quantized matmul inputs (module docstring);
    inputs and output as :func:`eeengine.executors.onnx_graphs.layer_graph`."""
    attention = layer.attention
    qkv = (attention.self.query, attention.self.key, attention.self.value)
    linears = {
        "qkv": (torch.cat([p.weight for p in qkv]).T, torch.cat([p.bias for p in qkv])),
        "attn_out": (attention.output.dense.weight.T, None),
        "ffn_in": (layer.intermediate.dense.weight.T, None),
        "ffn_out": (layer.output.dense.weight.T, None),
    }
    tensors: dict[str, np.ndarray] = {}
    nodes = []

    def linear(point: str, output: str) -> None:
        weight, bias = (None if t is None else t.detach().float() for t in linears[point])
        x = POINTS[point][1]
        smooth = absmax[point].clamp_min(1e-5) ** alpha / weight.abs().amax(1).clamp_min(1e-5) ** (
            1 - alpha
        )
        weight = weight * smooth[:, None]
        x_scale = float((absmax[point] / smooth).max()) / 127.0
        w_scale = weight.abs().amax(0).clamp_min(1e-12) / 127.0
        tensors.update(
            {
                f"{point}_inv_smooth": (1.0 / smooth).numpy(),
                f"{point}_x_scale": np.array(x_scale, np.float32),
                f"{point}_x_zero": np.array(128, np.uint8),
                f"{point}_w": (weight / w_scale).round().clamp(-127, 127).to(torch.int8).numpy(),
                f"{point}_w_scale": w_scale.numpy(),
            }
        )
        nodes.extend([
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
                [output if bias is None else f"{point}_nobias"],
                domain=MS,
            ),
        ])  # fmt: skip
        if bias is not None:
            tensors[f"{point}_bias"] = bias.numpy()
            nodes.append(helper.make_node("Add", [f"{point}_nobias", f"{point}_bias"], [output]))

    def norm(x: str, residual: str, ln: torch.nn.LayerNorm, bias: torch.Tensor, out: str):
        for name, value in (("gamma", ln.weight), ("beta", ln.bias), ("dense_bias", bias)):
            tensors[f"{out}_{name}"] = value.detach().float().numpy()
        nodes.append(helper.make_node(
            "SkipLayerNormalization",
            [x, residual, f"{out}_gamma", f"{out}_beta", f"{out}_dense_bias"],
            [out], domain=MS, epsilon=eps,
        ))  # fmt: skip

    hidden_size = attention.output.dense.out_features
    tensors["qkv_split"] = np.array([hidden_size] * 3, np.int64)
    linear("qkv", "qkv")
    nodes += [
        helper.make_node("Split", ["qkv", "qkv_split"], ["q", "k", "v"], axis=-1),
        helper.make_node(
            "MultiHeadAttention", ["q", "k", "v", "", "attention_mask"], ["context"],
            domain=MS, num_heads=num_heads,
        ),
    ]  # fmt: skip
    linear("attn_out", "attn_out")
    norm("attn_out", "hidden_states", attention.output.LayerNorm, attention.output.dense.bias,
         "attention_output")  # fmt: skip
    linear("ffn_in", "ffn_in")
    tensors["ffn_in_bias"] = layer.intermediate.dense.bias.detach().float().numpy()
    nodes.append(helper.make_node("BiasGelu", ["ffn_in", "ffn_in_bias"], ["ffn_act"], domain=MS))
    linear("ffn_out", "ffn_out")
    norm("ffn_out", "attention_output", layer.output.LayerNorm, layer.output.dense.bias, "output")
    shape = ["batch", "seq", hidden_size]
    graph = helper.make_graph(
        nodes,
        "bert_layer_int8_static",
        [
            helper.make_tensor_value_info("hidden_states", TensorProto.FLOAT, shape),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT32, shape[:2]),
        ],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(np.ascontiguousarray(v), k) for k, v in tensors.items()],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)]
    return helper.make_model(graph, opset_imports=opsets)


class LayerStack:
    """The checkpoint's torch embeddings, six ONNX Runtime layer sessions, its last exit head:
    full-depth probabilities of a padded batch."""

    def __init__(self, engine: Engine, graphs: list[onnx.ModelProto], workdir: Path) -> None:
        self.engine = engine
        options = onnxruntime.SessionOptions()
        options.use_per_session_threads = False  # one spinning pool, as eeengine's executor
        self.sessions = []
        for i, graph in enumerate(graphs):
            path = workdir / f"layer{i}.onnx"
            onnx.save(graph, path)
            self.sessions.append(
                onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            )

    @torch.inference_mode()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        model = self.engine.model
        enc = self.engine.tokenizer(texts, padding=True, return_tensors="pt")
        hidden = model.backbone.embeddings(enc["input_ids"], enc["token_type_ids"]).numpy()
        mask = enc["attention_mask"].numpy().astype(np.int32)
        for session in self.sessions:
            (hidden,) = session.run(None, {"hidden_states": hidden, "attention_mask": mask})
        logits = model.exit_heads[-1](torch.from_numpy(hidden), enc["attention_mask"])
        return torch.softmax(logits, -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", type=Path, help="checkpoint (default: the cached SST-2 one)")
    parser.add_argument("--alpha", type=float, default=0.9, help="SmoothQuant's migration strength")
    parser.add_argument("--calibration-rows", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/int8_static"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    onnxruntime.set_global_thread_pool_sizes(args.threads, 1)
    ckpt = args.ckpt or default_checkpoint()
    engine = Engine(ckpt, policy="none", executor="torch")
    calibration, source = calibration_slice(engine.manifest, ckpt)
    rows = sorted(calibration.texts[: args.calibration_rows], key=len)
    absmax = channel_absmax(engine, rows)
    config = engine.model.config
    heads, eps = config.num_attention_heads, config.layer_norm_eps
    layers = engine.model.backbone.layers
    workdir = Path(tempfile.mkdtemp(prefix="int8-static-"))
    stacks = {}
    for scheme in ("fp32", "int8_dynamic", "int8_static"):
        (workdir / scheme).mkdir(parents=True, exist_ok=True)
        graphs = []
        for i, layer in enumerate(layers):
            graph = layer_graph(layer, heads, eps)
            if scheme == "int8_dynamic":
                quantize_int8(graph, workdir / scheme / "q.onnx")
                graph = onnx.load(workdir / scheme / "q.onnx")
            elif scheme == "int8_static":
                graph = static_layer_graph(layer, heads, eps, absmax[i], args.alpha)
            graphs.append(graph)
        stacks[scheme] = LayerStack(engine, graphs, workdir / scheme)
    # The embeddings and the head are small: torch on one thread beside the sessions' pools.
    torch.set_num_threads(1)
    dev = load_split(get_task(engine.manifest["task"]["name"]), "dev")
    texts, gold = dev.texts, torch.tensor(dev.labels)
    probs = {1: {s: [] for s in stacks}, 32: {s: [] for s in stacks}}
    times = {1: {s: [] for s in stacks}, 32: {s: [] for s in stacks}}
    for size in (1, 32):  # interleaved by blocks of 32 inputs
        for start in range(0, len(texts), 32):
            for scheme, stack in stacks.items():
                block = texts[start : start + 32]
                for batch in [block[i : i + size] for i in range(0, len(block), size)]:
                    began = time.perf_counter()
                    probs[size][scheme].append(stack(batch))
                    times[size][scheme].append(1000 * (time.perf_counter() - began))
    reference = torch.cat(probs[1]["fp32"])
    report = {"checkpoint": str(ckpt), "calibration": f"{len(rows)} of {source}",
              "alpha": args.alpha, "schemes": {}}  # fmt: skip
    for scheme in stacks:
        alone, batched = torch.cat(probs[1][scheme]), torch.cat(probs[32][scheme])
        report["schemes"][scheme] = {
            "accuracy_b1": 100 * float((alone.argmax(-1) == gold).float().mean()),
            "accuracy_b32": 100 * float((batched.argmax(-1) == gold).float().mean()),
            "labels_changed_b1_vs_b32": int((alone.argmax(-1) != batched.argmax(-1)).sum()),
            "mean_prob_error_vs_fp32": float((alone - reference).abs().max(-1).values.mean()),
            "median_ms_b1": statistics.median(times[1][scheme]),
            "sentences_per_s_b32": len(texts) / (sum(times[32][scheme]) / 1000),
        }
    lines = [
        f"{report['calibration']}, alpha {args.alpha}; SST-2 dev ({len(texts)} sentences), full "
        "depth, embeddings and head in torch",
        "",
        "| scheme | dev acc. b=1 | dev acc. b=32 | labels changed b=1 vs 32 | mean prob. error vs "
        "fp32 | median ms b=1 | sentences/s b=32 |",
        "|---|---|---|---|---|---|---|",
    ]
    for scheme, r in report["schemes"].items():
        lines.append(
            f"| {scheme} | {r['accuracy_b1']:.2f} | {r['accuracy_b32']:.2f} | "
            f"{r['labels_changed_b1_vs_b32']} | {r['mean_prob_error_vs_fp32']:.4f} | "
            f"{r['median_ms_b1']:.2f} | {r['sentences_per_s_b32']:.0f} |"
        )
    table = "\n".join(lines) + "\n"
    write_results(args.out, report, table)
    print(table)


if __name__ == "__main__":
    main()
