"""ONNX Runtime's fused ``SkipLayerNormalization`` against :func:`eeengine.executors.
onnx_graphs.skip_layer_norm` (the same LayerNorm(x + bias + residual) as two ``Add`` and the
standard ``LayerNormalization``, in a session that keeps them apart as the executor's do),
alone in a session on MiniLM-sized rows (hidden 384): median latency of a run, interleaved,
and each result's largest difference from a float64 LayerNorm.

    python benchmarks/layer_norm.py --out benchmarks/results/layer_norm
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime
from environment import environment
from onnx import TensorProto, helper

from eeengine.executors.onnx_graphs import cpu_session, model_of, skip_layer_norm

HIDDEN = 384
EPS = 1e-12


def graph(fused: bool, params: dict[str, np.ndarray]) -> bytes:
    """``y = LayerNorm(x + bias + r)`` as the fused op or as :func:`skip_layer_norm`."""
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, "seq", HIDDEN]) for n in "xr"]
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    if fused:
        nodes = [helper.make_node("SkipLayerNormalization", ["x", "r", "gamma", "beta", "bias"],
                                  ["y"], domain="com.microsoft", epsilon=EPS)]  # fmt: skip
    else:
        nodes = skip_layer_norm("x", "r", "bias", "gamma", "beta", "y", EPS)
    return model_of("ln", nodes, inputs, [output], params).SerializeToString()


def reference(x: np.ndarray, r: np.ndarray, params: dict[str, np.ndarray]) -> np.ndarray:
    u = x.astype(np.float64) + r + params["bias"]
    normalized = (u - u.mean(-1, keepdims=True)) / np.sqrt(u.var(-1, keepdims=True) + EPS)
    return normalized * params["gamma"] + params["beta"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tokens", type=int, nargs="+", default=[25, 128, 512])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--out", default="benchmarks/results/layer_norm")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    params = {n: rng.standard_normal(HIDDEN).astype(np.float32) for n in ("gamma", "beta", "bias")}
    rows = []
    for threads in args.threads:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        sessions = {
            name: cpu_session(graph(name == "fused", params), options)
            for name in ("fused", "standard_ops")
        }
        for tokens in args.tokens:
            feeds = {n: rng.standard_normal((1, tokens, HIDDEN)).astype(np.float32) for n in "xr"}
            expected = reference(feeds["x"], feeds["r"], params)
            times: dict[str, list[float]] = {name: [] for name in sessions}
            for _ in range(args.runs):  # interleaved
                for name, session in sessions.items():
                    start = time.perf_counter()
                    session.run(None, feeds)
                    times[name].append(time.perf_counter() - start)
            row = {"threads": threads, "tokens": tokens}
            for name, session in sessions.items():
                error = float(np.abs(session.run(None, feeds)[0] - expected).max())
                row[name] = {"us": statistics.median(times[name]) * 1e6, "max_error": error}
            row["fused / standard_ops"] = row["fused"]["us"] / row["standard_ops"]["us"]
            rows.append(row)
            print(json.dumps(row))
    report = {"environment": environment(), "rows": rows}
    Path(args.out).with_suffix(".json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
