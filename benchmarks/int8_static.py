"""Precision "int8_static" (:mod:`eeengine.executors.int8_static`: calibrated activation
scales after SmoothQuant smoothing) against "int8" (ONNX Runtime's dynamic quantization, one
activation scale per call) and fp32, at full depth, layer sessions only.

Each scheme runs the checkpoint's torch embeddings, its six layer graphs as ONNX Runtime
sessions (one global thread pool, as eeengine's executor) and its last exit head; the
activation statistics come from the first ``--calibration-rows`` rows of the checkpoint's
calibration slice (held out of training); everything reported is SST-2 dev: accuracy alone
and in batches of 32, the labels that change between the two, the probabilities' distance to
fp32, batch-1 latency and batch-32 throughput, interleaved by blocks of 32 inputs.

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
from results_io import markdown_table, write_results

from eeengine import Engine
from eeengine.data import get_task, load_split
from eeengine.defaults import default_checkpoint
from eeengine.executors.int8_static import activation_absmax, int8_static_layer_graph
from eeengine.executors.onnx_graphs import cpu_session, layer_graph, quantize_int8
from eeengine.training.calibration_slice import calibration_slice


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
            self.sessions.append(cpu_session(str(path), options))  # as the executor's

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
    stats = activation_absmax(engine.model, engine.tokenizer, rows)
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
                graph = int8_static_layer_graph(layer, heads, eps, stats, i, args.alpha)
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
    header = [
        "scheme", "dev acc. b=1", "dev acc. b=32", "labels changed b=1 vs 32",
        "mean prob. error vs fp32", "median ms b=1", "sentences/s b=32",
    ]  # fmt: skip
    cells = [
        [scheme, f"{r['accuracy_b1']:.2f}", f"{r['accuracy_b32']:.2f}",
         r["labels_changed_b1_vs_b32"], f"{r['mean_prob_error_vs_fp32']:.4f}",
         f"{r['median_ms_b1']:.2f}", f"{r['sentences_per_s_b32']:.0f}"]
        for scheme, r in report["schemes"].items()
    ]  # fmt: skip
    table = (
        f"{report['calibration']}, alpha {args.alpha}; SST-2 dev ({len(texts)} sentences), full "
        "depth, embeddings and head in torch\n\n" + markdown_table(header, cells)
    )
    write_results(args.out, report, table)
    print(table)


if __name__ == "__main__":
    main()
