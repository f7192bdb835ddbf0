"""eeengine against what a practitioner would deploy instead, side by side in one process.

Providers (all on the same fine-tuned checkpoint, the same inputs, tokenization included):

- ``hf_eager``: Hugging Face ``transformers.BertModel`` (SDPA) + the checkpoint's last exit head,
  full depth.
- ``hf_compile``: the same under ``torch.compile`` (dynamic shapes).
- ``onnxruntime``: the same model exported to ONNX and optimized with ONNX Runtime's BERT graph
  fusions (``onnxruntime.transformers.optimizer``), full depth.
- ``papers_loop``: the papers' control flow: batch 1, after every layer an unfused head, the
  entropy, and a host check (``.item()``) whether to stop; run on eeengine's layers (HF's
  modules would only add overhead, so this is a lower bound on that loop's cost).
- ``eeengine_{executor}_full``: eeengine with policy ``none``, for each layer executor
  (``torch``: eeengine's torch encoder; ``ort``: one ONNX Runtime session per layer, see
  :mod:`eeengine.executors`).
- ``eeengine_{executor}_drop0.5`` / ``..._drop1.0``: eeengine at the checkpoint's calibrated
  operating points within 0.5 / 1.0 accuracy points of full depth.

Any classification task of ``data/`` works (``--task``, with a checkpoint trained on it);
sentence-pair tasks (MRPC, RTE) give the long inputs, as (text, text_pair) tuples.

Batch-1 latency is measured interleaved: for each input, every provider runs once, in an order
that rotates from input to input. Throughput runs each provider over the same batches in turn,
repeated and interleaved. Results are reported as ratios to ``hf_eager``.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/compare.py --threads 2 \
        --out benchmarks/results/compare_sst2

On a shared CPU set ``OMP_WAIT_POLICY=PASSIVE``: torch's OpenMP workers otherwise spin at
every barrier while other processes hold the cores (measured on a busy 2-core machine: HF eager
at batch 1, 205 ms with spinning, 12.5 ms passive). The report records the environment.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import BertModel as HFBertModel

from eeengine import Engine
from eeengine.data import get_task, load_split
from eeengine.defaults import default_checkpoint
from eeengine.evaluation import choose_operating_point, policy_params
from eeengine.metrics import accuracy
from eeengine.policies.base import entropy

Predict = Callable[[list[str]], list[int]]


class FullDepth(torch.nn.Module):
    """transformers.BertModel with the checkpoint's last exit head: logits (batch, C)."""

    def __init__(self, engine: Engine) -> None:
        super().__init__()
        self.bert = HFBertModel(engine.model.config, add_pooling_layer=False)
        self.bert.load_state_dict(engine.model.bert.state_dict())
        self.head = engine.model.exit_heads[-1]
        self.eval()

    def forward(self, input_ids, attention_mask, token_type_ids):
        hidden = self.bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        return self.head(hidden, attention_mask)


def _tokenize(engine: Engine, inputs: list, return_tensors: str = "pt") -> dict:
    """Tokenize texts, or (text, text_pair) tuples, the same way for every provider."""
    pairs = [pair for _, pair in inputs] if isinstance(inputs[0], tuple) else None
    texts = [text for text, _ in inputs] if pairs is not None else inputs
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
    def predict(texts: list[str]) -> list[int]:
        enc = _tokenize(engine, texts)
        logits = module(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
        return logits.argmax(-1).tolist()

    return predict


def onnxruntime_provider(engine: Engine, model: FullDepth, workdir: Path) -> tuple[Predict, dict]:
    """The model exported with ``torch.onnx.export`` and optimized by ONNX Runtime's BERT
    optimizer, as a practitioner would deploy it.

    Returns:
        The provider and the optimizer's fused-operator counts (which fusions applied).
    """
    import onnxruntime
    from onnxruntime.transformers.optimizer import optimize_model

    raw, optimized = workdir / "model.onnx", workdir / "model.opt.onnx"
    enc = _tokenize(engine, ["a dummy input", "another one for the batch axis"])
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    torch.onnx.export(
        model,
        tuple(enc[n] for n in names),
        str(raw),
        input_names=names,
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
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    # ORT's workers spin for a while after each run by default; in this shared process they
    # would slow down whichever provider runs next (measured: HF eager +43 % right after an
    # ORT run). eeengine's ORT executor turns spinning off for the same reason.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(
        str(optimized), options, providers=["CPUExecutionProvider"]
    )

    def predict(texts: list[str]) -> list[int]:
        enc = _tokenize(engine, texts, "np")
        (logits,) = session.run(None, {n: enc[n] for n in names})
        return logits.argmax(-1).tolist()

    return predict, fusions


def papers_loop_provider(engine: Engine, threshold: float) -> Predict:
    """One sample at a time, host check per layer (DeeBERT / PABEE style, raw entropy)."""
    model = engine.model

    @torch.inference_mode()
    def predict(texts: list[str]) -> list[int]:
        labels = []
        for text in texts:
            enc = _tokenize(engine, [text])
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

    def predict(texts: list[str]) -> list[int]:
        return [names.index(p.label) for p in engine.predict(texts, batch_size=len(texts))]

    return predict


EXECUTORS = {"torch": "torch", "ort": "onnxruntime"}  # provider name part -> Engine executor


def build_providers(ckpt: Path, workdir: Path) -> tuple[dict[str, Predict], dict[str, dict]]:
    """Every provider of the module docstring, and its settings (policy, executor, ...)."""
    base = Engine(ckpt, policy="none", executor="torch")
    full = FullDepth(base)
    ort, fusions = onnxruntime_provider(base, full, workdir)
    providers = {
        "hf_eager": torch_provider(base, full),
        "hf_compile": torch_provider(base, torch.compile(full, dynamic=True)),
        "onnxruntime": ort,
    }
    settings = {name: {"policy": "none"} for name in providers}
    settings["onnxruntime"]["fusions"] = fusions
    points = {"full": ("none", {})}
    for drop in (0.5, 1.0):
        chosen = choose_operating_point(base.calibration, max_drop=drop)
        if chosen is not None:
            points[f"drop{drop}"] = (chosen[0], policy_params(chosen[1]))
    for short, executor in EXECUTORS.items():
        for point, (policy, params) in points.items():
            name = f"eeengine_{short}_{point}"
            engine = Engine(ckpt, policy=policy, executor=executor, **params)
            providers[name] = engine_provider(engine)
            settings[name] = {"policy": policy, **params, "executor": executor}
    # The papers' loop at the raw-entropy point within 0.5 points, when the sweep has one.
    entropy_point = choose_operating_point(base.calibration, max_drop=0.5, policy="entropy")
    if entropy_point is not None:
        threshold = entropy_point[1]["threshold"]
        providers["papers_loop"] = papers_loop_provider(base, threshold)
        settings["papers_loop"] = {"policy": "entropy", "threshold": threshold}
    return providers, settings


def latency_batch1(
    providers: dict[str, Predict], texts: list[str]
) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Per-input latency in ms and the predicted labels, interleaved across providers."""
    names = list(providers)
    times = {n: [] for n in names}
    labels = {n: [] for n in names}
    for i, text in enumerate(texts):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            start = time.perf_counter()
            labels[name] += providers[name]([text])
            times[name].append(1000 * (time.perf_counter() - start))
    return times, labels


def throughput(
    providers: dict[str, Predict], texts: list[str], batch_size: int, repeats: int
) -> dict[str, float]:
    """Sentences per second over ``texts`` in batches, best of interleaved repeats."""
    batches = [texts[i : i + batch_size] for i in range(0, len(texts), batch_size)]
    best = {n: 0.0 for n in providers}
    names = list(providers)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            for batch in batches:
                providers[name](batch)
            best[name] = max(best[name], len(texts) / (time.perf_counter() - start))
    return best


def environment() -> dict:
    """What the timings depend on besides the code: threads, OpenMP waiting, versions, CPU."""
    import platform

    import onnxruntime
    import transformers

    return {
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        **{name: os.environ.get(name) for name in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")},
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", type=Path, help="checkpoint (default: the cached SST-2 one)")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--limit", type=int, help="use the first N dev inputs (default: all)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's default)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compare_sst2"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    ckpt = args.ckpt or default_checkpoint()
    dev = load_split(get_task(args.task), "dev")
    if get_task(args.task).label_names is None:
        raise SystemExit(f"compare.py needs a classification task; {args.task} is regression")
    inputs = dev.texts
    if dev.text_pairs is not None:  # MRPC, RTE, QNLI, STS-B: (text, text_pair) tuples
        inputs = list(zip(dev.texts, dev.text_pairs, strict=True))
    texts, gold = inputs[: args.limit], dev.labels[: args.limit]
    with tempfile.TemporaryDirectory() as workdir:
        providers, settings = build_providers(ckpt, Path(workdir))
        for predict in providers.values():  # warm up (and compile) on other shapes
            for text in inputs[-args.warmup :]:
                predict([text])
            predict(inputs[: max(args.batch_sizes)])
        times, labels = latency_batch1(providers, texts)
        rates = {b: throughput(providers, texts, b, args.repeats) for b in args.batch_sizes}

    rows = {}
    for name in providers:
        median = statistics.median(times[name])
        rows[name] = {
            **settings[name],
            "accuracy": accuracy(labels[name], gold),
            "median_ms": median,
            "p90_ms": _percentile(times[name], 90),
            "speedup_median_vs_hf": statistics.median(times["hf_eager"]) / median,
            **{f"sentences_per_s_b{b}": rates[b][name] for b in args.batch_sizes},
            **{
                f"throughput_vs_hf_b{b}": rates[b][name] / rates[b]["hf_eager"]
                for b in args.batch_sizes
            },
        }
    report = {
        "task": args.task,
        "inputs": len(texts),
        "threads": torch.get_num_threads(),
        "environment": environment(),
        "checkpoint": str(ckpt),
        "providers": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    table = _markdown(report, args.batch_sizes)
    args.out.with_suffix(".md").write_text(table)
    _plot(report, args.batch_sizes[0], args.out.with_suffix(".png"))
    print(table)


def _markdown(report: dict, batch_sizes: list[int]) -> str:
    head = "| provider | policy | accuracy | median ms (b=1) | p90 ms | × HF (median) |"
    head += "".join(f" sent/s b={b} | × HF b={b} |" for b in batch_sizes)
    lines = [head, "|" + "---|" * (6 + 2 * len(batch_sizes))]
    for name, r in report["providers"].items():
        policy = r["policy"] + "".join(f" {k}={r[k]}" for k in ("threshold", "patience") if k in r)
        line = (
            f"| {name} | {policy} | {r['accuracy']:.2f} | {r['median_ms']:.2f} | "
            f"{r['p90_ms']:.2f} | {r['speedup_median_vs_hf']:.2f} |"
        )
        line += "".join(
            f" {r[f'sentences_per_s_b{b}']:.0f} | {r[f'throughput_vs_hf_b{b}']:.2f} |"
            for b in batch_sizes
        )
        lines.append(line)
    return "\n".join(lines) + "\n"


def _plot(report: dict, batch_size: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in report["providers"].items():
        ax.scatter(r[f"sentences_per_s_b{batch_size}"], r["accuracy"])
        ax.annotate(name, (r[f"sentences_per_s_b{batch_size}"], r["accuracy"]), fontsize=8)
    ax.set_xlabel(f"sentences / s at batch {batch_size} ({report['threads']} threads)")
    ax.set_ylabel(f"{report['task']} dev accuracy (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
