"""Per-layer execution against one session over the whole model, per precision, and the
memory each executor holds.

Speed (``--speed``), in one process, interleaved (:func:`compare.latency_batch1`,
:func:`compare.throughput`), SST-2 dev sentences, tokenization included:

- ``eeengine_ort_{fp32,int8}``: ``Engine(ckpt, policy="none", executor="onnxruntime",
  precision=...)``, full depth: at batch 32 one ONNX Runtime session per layer, back to back;
  at batch 1 the row graph (:mod:`eeengine.executors.row_graph`), the loop in one session.
- ``one_session_{fp32,int8}``: the very same graphs (:func:`eeengine.executors.onnxruntime.
  layer_graph`, ``embeddings_graph``; int8 through the same ``quantize_int8``) joined into one
  ONNX Runtime session, then the last exit head: what per-layer execution costs over it.
- ``eeengine_torch_{fp32,bf16}``: the torch executor at fp32 and bf16 (AVX-512 BF16 here).

Memory (``--memory``): resident memory (VmRSS) of a fresh subprocess per configuration after
loading the engine and predicting a few sentences in one batch (``_row_graph``: then two, one at
a time, which builds the ONNX Runtime executor's row graph); ratio to the torch executor at
fp32.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/benchmark_executors.py --threads 2 \
        --out benchmarks/results/executors_sst2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import onnx
import torch
from compare import latency_batch1, throughput
from environment import environment
from onnx import helper, numpy_helper
from peers import INPUT_NAMES, engine_provider, tokenize

from eeengine import Engine
from eeengine.data import get_task, load_split
from eeengine.defaults import default_checkpoint
from eeengine.executors.onnx_graphs import (
    cpu_session,
    embeddings_graph,
    layer_graph,
    quantize_int8,
)
from eeengine.executors.ort_environment import neighbour_session_options

ENGINES = {  # provider -> Engine keyword arguments
    "eeengine_ort_fp32": {"executor": "onnxruntime", "precision": "fp32"},
    "eeengine_ort_int8": {"executor": "onnxruntime", "precision": "int8"},
    "eeengine_torch_fp32": {"executor": "torch", "precision": "fp32"},
    "eeengine_torch_bf16": {"executor": "torch", "precision": "bf16"},
}


def whole_model_graph(engine: Engine) -> onnx.ModelProto:
    """The embeddings and every layer graph of the ORT executor chained in one model:
    inputs ``input_ids``, ``token_type_ids``, ``attention_mask`` (batch, seq) int32, output
    ``output``, the last layer's hidden states."""
    backbone, config = engine.model.backbone, engine.model.config
    embeddings, weights = embeddings_graph(backbone.embeddings)
    graph = embeddings.graph
    del graph.input[2:]  # the weights become initializers
    graph.initializer.extend(
        numpy_helper.from_array(value.numpy(), name) for name, value in weights.items()
    )
    graph.input.append(helper.make_tensor_value_info("attention_mask", 6, ["batch", "seq"]))
    graph.node[0].output[0] = "hidden_0"
    for index, layer in enumerate(backbone.layers):
        part = layer_graph(layer, config.num_attention_heads, config.layer_norm_eps).graph
        names = {"hidden_states": f"hidden_{index}", "attention_mask": "attention_mask"}
        names["output"] = f"hidden_{index + 1}"

        def rename(name: str, names: dict = names, index: int = index) -> str:
            return names.get(name, f"l{index}_{name}")

        for node in part.node:
            node.input[:] = [rename(n) for n in node.input]
            node.output[:] = [rename(n) for n in node.output]
        for tensor in part.initializer:
            tensor.name = rename(tensor.name)
        graph.node.extend(part.node)
        graph.initializer.extend(part.initializer)
    graph.output[0].name = f"hidden_{len(backbone.layers)}"
    return embeddings


def one_session_provider(engine: Engine, precision: str, threads: int):
    """``whole_model_graph`` as one session (int8: quantized whole) + the last exit head."""
    model = whole_model_graph(engine)
    options = neighbour_session_options(threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        quantize_int8(model, path) if precision == "int8" else onnx.save(model, path)
        session = cpu_session(str(path), options)  # as the executor's sessions
    head = engine.model.exit_heads[-1]
    output = session.get_outputs()[0].name

    @torch.inference_mode()
    def predict(texts: list) -> list[int]:
        enc = tokenize(engine, texts, "np")
        feeds = {n: enc[n].astype("int32") for n in INPUT_NAMES}
        (hidden,) = session.run([output], feeds)
        logits = head(torch.from_numpy(hidden), torch.from_numpy(enc["attention_mask"]))
        return logits.argmax(-1).tolist()

    return predict


def speed(args: argparse.Namespace) -> dict:
    ckpt = args.ckpt or default_checkpoint()
    dev = load_split(get_task("sst2"), "dev")
    engines = {name: Engine(ckpt, policy="none", **kw) for name, kw in ENGINES.items()}
    providers = {name: engine_provider(engine) for name, engine in engines.items()}
    reference = engines["eeengine_torch_fp32"]
    for precision in ("fp32", "int8"):
        providers[f"one_session_{precision}"] = one_session_provider(
            reference, precision, args.threads
        )
    texts = dev.texts[: args.batch1_inputs]
    for provider in providers.values():  # warm-up
        provider(texts[:4])
    times, labels1 = latency_batch1(providers, texts)
    rates, labels32 = throughput(providers, dev.texts[: args.batch32_inputs], 32, args.repeats)
    accuracy = {
        name: 100 * sum(p == y for p, y in zip(pred, dev.labels, strict=False)) / len(pred)
        for name, pred in labels32.items()
    }
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "batch1_median_ms": medians,
        "batch32_per_s": rates,
        "accuracy_on_batch32_inputs": accuracy,
        "ratios": {
            f"{p}: eeengine_ort / one_session": {
                "batch1_latency": medians[f"eeengine_ort_{p}"] / medians[f"one_session_{p}"],
                "batch32_throughput": rates[f"eeengine_ort_{p}"] / rates[f"one_session_{p}"],
            }
            for p in ("fp32", "int8")
        }
        | {
            "torch: bf16 / fp32": {
                "batch1_latency": medians["eeengine_torch_bf16"] / medians["eeengine_torch_fp32"],
                "batch32_throughput": rates["eeengine_torch_bf16"] / rates["eeengine_torch_fp32"],
            }
        },
        "inputs": {"batch1": len(texts), "batch32": min(len(dev.texts), args.batch32_inputs)},
    }


def resident_mib(ckpt: str, settings: dict, one_row: bool = False) -> float:
    """VmRSS (MiB) of a fresh process after Engine(ckpt, **settings) and a few predictions in
    one batch; ``one_row``: then two more, each alone (the loop asks the ONNX Runtime
    executor for its row graph from the second one-row batch on)."""
    code = (
        "import json, sys, warnings; warnings.simplefilter('ignore'); "
        "import torch; torch.set_num_threads(1); from eeengine import Engine; "
        f"e = Engine({ckpt!r}, policy='none', **json.loads(sys.argv[1])); "
        "e.predict(['a gorgeous, witty, seductive movie.'] * 8, batch_size=8); "
        + ("e.predict('a gorgeous, witty, seductive movie.'); " * 2 if one_row else "")
        + "print([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(settings)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.split()[-1]) / 1024


def memory(args: argparse.Namespace) -> dict:
    ckpt = str(args.ckpt or default_checkpoint())
    configurations = {name: (settings, False) for name, settings in ENGINES.items()}
    for name, settings in ENGINES.items():
        if settings["executor"] == "onnxruntime":
            configurations[f"{name}_row_graph"] = (settings, True)
    rss = {name: [] for name in configurations}
    for _ in range(args.memory_repeats):  # interleaved
        for name, (settings, one_row) in configurations.items():
            rss[name].append(resident_mib(ckpt, settings, one_row))
    medians = {name: statistics.median(values) for name, values in rss.items()}
    base = medians["eeengine_torch_fp32"]
    return {
        "rss_mib": medians,
        "ratio_to_torch_fp32": {name: value / base for name, value in medians.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch1-inputs", type=int, default=300)
    parser.add_argument("--batch32-inputs", type=int, default=872)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-repeats", type=int, default=3)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/executors_sst2")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = {"environment": environment(), "command": " ".join(sys.argv)}
    if not args.skip_memory:
        report["memory"] = memory(args)
    if not args.skip_speed:
        report["speed"] = speed(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
