"""eeengine against what a practitioner would deploy instead, side by side in one process.

Providers (all on the same fine-tuned checkpoint, the same inputs, tokenization included; the
peers are built in :mod:`peers`):

- ``hf_eager``: Hugging Face ``transformers.BertModel`` (SDPA) + the checkpoint's last exit head,
  full depth.
- ``hf_compile``: the same under ``torch.compile`` (dynamic shapes).
- ``onnxruntime``: the same model exported with eager attention and optimized with ONNX
  Runtime's BERT graph fusions (``Attention`` fused), one session, full depth, fp32.
- ``ort_int8``: that optimized model after ``onnxruntime.quantization.quantize_dynamic``
  (int8 weights), full depth.
- ``papers_loop``: the papers' control flow: batch 1, after every layer an unfused head, the
  entropy, and a host check (``.item()``) whether to stop, on eeengine's layers.
- ``eeengine_{executor}[_{precision}][_tok]_{point}``: ``Engine.predict`` for each layer
  executor (``torch``; ``ort``: one ONNX Runtime session per layer, and at batch 1 the row
  graph, the whole loop in one session), each precision the Engine
  offers (fp32 unnamed; ``bf16`` / ``int8`` / ``int8_static`` where ``Engine`` takes
  ``precision``; ``int8_static`` needs the checkpoint's activation statistics), without and
  with (``_tok``) MPEE token pruning (the checkpoint's schedule, else ``--token-pruning``), at
  ``full`` depth and at the operating points ``drop0.5`` / ``drop1.0``: the fastest calibrated
  point within 0.5 / 1.0 accuracy points of full depth.

Tasks (``--task``): any classification task of ``data/`` (dev split; sentence-pair tasks give
(text, text_pair) inputs), operating points from the checkpoint's ``calibration.json``; or
``imdb``: the 3,000 long movie reviews of ``data/IMDB-long`` at 512 tokens with an SST-2
checkpoint, where every configuration is calibrated (``Engine.calibrate``, labels) on the first
half of the reviews and everything is reported on the second half, never on what it was tuned
on.

Batch-1 latency is measured interleaved: the providers take turns by blocks of 20 inputs, in an
order that rotates from block to block. Throughput runs each provider over the same batches in turn,
repeated and interleaved. Accuracy (and eeengine's average exit layer and FLOPs ratio) is
recorded for each batch size from the pass that times it: int8 predictions depend on the other
inputs of a call (ONNX Runtime's dynamic quantization takes one activation scale per call), so
the batch-1 claims use batch-1 accuracy (over the latency inputs). Results are ratios to
``hf_eager`` and to ``ort_int8``; the table ends with the fastest eeengine configuration within
``--max-drop`` points (default 0.5) of fp32 full depth at each batch size.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/compare.py --threads 2 \
        --out benchmarks/results/compare_sst2
    OMP_WAIT_POLICY=PASSIVE python benchmarks/compare.py --threads 2 --task imdb \
        --out benchmarks/results/compare_imdb

On a shared CPU set ``OMP_WAIT_POLICY=PASSIVE``: torch's OpenMP workers otherwise spin at
every barrier while other processes hold the cores (measured on a busy 2-core machine: HF eager
at batch 1, 205 ms with spinning, 12.5 ms passive). The report records the environment.

The script raises oneDNN's primitive cache (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``, default 1024)
to 16,384 unless it is set: its dozen torch providers in one process, each batch compacted to
new shapes, evicted each other's bf16 matmul primitives, which were then rebuilt at every call
(bf16 early exit at batch 32: 564 sentences/s in the full run, 1,054 alone or with the larger
cache). A deployed engine is alone in its process.
"""

from __future__ import annotations

import argparse
import fnmatch
import inspect
import json
import os
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

# Before torch loads oneDNN (see the module docstring).
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16384")

import torch
import transformers
from compare_report import BASELINES, markdown, plot
from environment import environment
from peers import (
    FullDepth,
    Predict,
    onnxruntime_provider,
    papers_loop_provider,
    torch_provider,
)
from results_io import write_results

from eeengine import Engine
from eeengine.data import DATA_DIR, Split, file_split, get_task, load_split
from eeengine.defaults import default_checkpoint
from eeengine.evaluation import policy_params
from eeengine.metrics import accuracy
from eeengine.selection import choose_operating_point
from eeengine.token_pruning import DEFAULT_TOKEN_PRUNING

EXECUTORS = {"torch": "torch", "ort": "onnxruntime"}  # provider name part -> Engine executor
IMDB = DATA_DIR / "IMDB-long" / "reviews.tsv"


@dataclass
class Workload:
    """What is measured: the reported inputs and labels, the token limit, and the labelled
    inputs operating points are calibrated on (None: the checkpoint's ``calibration.json``),
    with their labels, or without (``label_free``: by agreement with full depth)."""

    task: str
    inputs: list
    labels: list[int]
    max_length: int | None
    calibration: Split | None
    label_free: bool = False


def load_workload(
    task: str, calibration_limit: int | None = None, label_free: bool = False
) -> Workload:
    """``imdb``: reviews 1-1,500 calibrate (with their labels, or ``label_free``), 1,501-3,000
    are reported, at 512 tokens; a classification task of ``data/``: its dev split.

    Raises:
        SystemExit: a regression task.
    """
    if task == "imdb":
        # label 0 = negative, 1 = positive: the SST-2 checkpoint's class indices.
        reviews = file_split(IMDB, "sentence", "label", None, ("0", "1"))
        half = len(reviews.texts) // 2
        end = half if calibration_limit is None else min(half, calibration_limit)
        calibration = Split(reviews.texts[:end], None, reviews.labels[:end])
        reported = reviews.texts[half:], reviews.labels[half:]
        return Workload(task, *reported, 512, calibration, label_free)
    if get_task(task).label_names is None:
        raise SystemExit(f"compare.py needs a classification task; {task} is regression")
    dev = load_split(get_task(task), "dev")
    inputs = dev.texts
    if dev.text_pairs is not None:  # MRPC, RTE, QNLI: (text, text_pair) tuples
        inputs = list(zip(dev.texts, dev.text_pairs, strict=True))
    return Workload(task, inputs, dev.labels, None, None)


def precisions() -> list[str]:
    """fp32, plus the other precisions of :data:`eeengine.executors.PRECISIONS` where this
    eeengine's Engine takes ``precision``."""
    if "precision" in inspect.signature(Engine).parameters:
        from eeengine.executors import PRECISIONS

        return ["fp32", *(p for p in PRECISIONS if p != "fp32")]
    return ["fp32"]


def operating_points(
    engine: Engine, workload: Workload, drops: tuple[float, ...] = (0.5, 1.0)
) -> tuple[dict, dict]:
    """Full depth and the fastest points within each of ``drops`` accuracy points of full
    depth.

    With a calibration split, the sweep is measured on it first (:meth:`Engine.calibrate`,
    which runs the engine's precision and token pruning); label-free, its metric is agreement
    with full depth in percent, so ``drop1.0`` is the fastest point agreeing on >= 99 %.

    Returns:
        {point name: (policy, parameters)} and the sweep they come from.
    """
    if workload.calibration is not None:
        split = workload.calibration
        labels = None if workload.label_free else split.labels
        engine.calibrate(split.texts, labels, split.text_pairs, max_drop=max(drops), batch_size=16)
    points = {"full": ("none", {})}
    for drop in drops if engine.calibration else ():
        chosen = choose_operating_point(engine.calibration, max_drop=drop)
        if chosen is not None:
            points[f"drop{drop}"] = (chosen[0], policy_params(chosen[1]))
    return points, engine.calibration


def _calibration_engine(
    ckpt: Path, workload: Workload, pruning: dict | None, kwargs: dict
) -> Engine:
    """The engine a configuration's sweep is measured with: its precision and pruning, on the
    torch executor where that precision runs there, else on ONNX Runtime (int8)."""
    settings = {"policy": "none", "max_length": workload.max_length, "token_pruning": pruning}
    try:
        return Engine(ckpt, executor="torch", **settings, **kwargs)
    except ValueError:
        return Engine(ckpt, executor="onnxruntime", **settings, **kwargs)


def _wanted(name: str, patterns: list[str] | None) -> bool:
    return patterns is None or any(fnmatch.fnmatch(name, p) for p in patterns)


class EngineRecorder:
    """An engine provider that also sums what its predictions report (exit layer, FLOPs)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.reset()

    def reset(self) -> None:
        self.count, self.exit_layers, self.flops, self.full_flops = 0, 0, 0, 0

    def summary(self) -> dict[str, float]:
        """Average exit layer and FLOPs ratio since the last :meth:`reset`."""
        return {
            "avg_exit_layer": self.exit_layers / self.count,
            "flops_ratio": self.flops / self.full_flops,
        }

    def __call__(self, texts: list) -> list[int]:
        predictions = self.engine.predict(texts, batch_size=len(texts))
        for p in predictions:
            self.count += 1
            self.exit_layers += p.exit_layer
            self.flops += p.flops
            self.full_flops += p.full_flops
        names = self.engine.label_names
        return [names.index(p.label) for p in predictions]


def build_providers(
    ckpt: Path,
    workload: Workload,
    workdir: Path,
    patterns: list[str] | None = None,
    token_pruning: dict | None = None,
) -> tuple[dict[str, Predict], dict[str, dict]]:
    """Every provider of the module docstring whose name matches one of ``patterns`` (shell
    patterns; None: all), and its settings (policy, executor, calibration point, ...)."""
    base = Engine(ckpt, policy="none", executor="torch", max_length=workload.max_length)
    providers: dict[str, Predict] = {}
    settings: dict[str, dict] = {}
    peers = {
        "hf_eager": lambda _: (torch_provider(base, FullDepth(base)), {}),
        "hf_compile": lambda _: (torch_provider(base, torch.compile(FullDepth(base))), {}),
        "onnxruntime": lambda path: onnxruntime_provider(base, path),
        "ort_int8": lambda path: onnxruntime_provider(base, path, int8=True),
    }
    for name, build in peers.items():
        if _wanted(name, patterns):
            (workdir / name).mkdir()
            providers[name], extra = build(workdir / name)
            settings[name] = {"policy": "none", **extra}
    schedule = base.manifest.get("token_pruning") or token_pruning
    variants = {"": None, "tok_": schedule}
    measured: dict[str, dict] = {}  # the fp32 points, once measured

    def fp32_points() -> dict:
        if "fp32" not in measured:  # the fp32 providers were not asked for
            engine = _calibration_engine(ckpt, workload, None, {})
            measured["fp32"] = operating_points(engine, workload)[0]
        return dict(measured["fp32"])

    for precision in precisions():
        kwargs = {} if precision == "fp32" else {"precision": precision}
        tag = "" if precision == "fp32" else f"{precision}_"
        for prefix, pruning in variants.items():
            point_names = ("full", "drop0.5", "drop1.0")
            names = [f"eeengine_{e}_{tag}{prefix}{p}" for e in EXECUTORS for p in point_names]
            if (pruning is None and prefix) or not any(_wanted(n, patterns) for n in names):
                continue
            if prefix and workload.calibration is None and not base.manifest.get("token_pruning"):
                continue  # no calibration measured with pruning to pick its points from
            try:
                calibrated = _calibration_engine(ckpt, workload, pruning, kwargs)
            except (ValueError, FileNotFoundError) as error:  # e.g. int8_static, no statistics
                print(f"skipped {precision} {prefix or 'no '}pruning: {error}")
                continue
            points, sweep = operating_points(calibrated, workload)
            if precision == "fp32" and not prefix:
                measured["fp32"] = dict(points)
            elif not sweep and not prefix:  # no sweep of this precision: the fp32 points stand in
                points, sweep = fp32_points(), {"fp32 points": True}
            if prefix:
                points.pop("full")
            for short, executor in EXECUTORS.items():
                for point, (policy, params) in points.items():
                    name = f"eeengine_{short}_{tag}{prefix}{point}"
                    if not _wanted(name, patterns):
                        continue
                    try:
                        engine = Engine(
                            ckpt, policy=policy, executor=executor, token_pruning=pruning,
                            max_length=workload.max_length, **kwargs, **params,
                        )  # fmt: skip
                    except ValueError as error:  # e.g. a precision this executor lacks
                        print(f"skipped {name}: {error}")
                        continue
                    providers[name] = EngineRecorder(engine)
                    settings[name] = {
                        "policy": policy,
                        **params,
                        "executor": executor,
                        "precision": precision,
                        "token_pruning": pruning,
                        "backend": engine.backend,
                        "calibration_full_depth": sweep.get("full_depth"),
                        "points_from": "fp32" if "fp32 points" in sweep else precision,
                    }
            if sweep and precision == "fp32" and not prefix and _wanted("papers_loop", patterns):
                # The papers' loop at the raw-entropy point within 0.5 points, if there is one.
                entropy_point = choose_operating_point(sweep, max_drop=0.5, policy="entropy")
                if entropy_point is not None:
                    threshold = entropy_point[1]["threshold"]
                    providers["papers_loop"] = papers_loop_provider(base, threshold)
                    settings["papers_loop"] = {"policy": "entropy", "threshold": threshold}
    return providers, settings


def latency_batch1(
    providers: dict[str, Predict], texts: list, block: int = 20
) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Per-input latency in ms and the predicted labels. The providers take turns by blocks of
    ``block`` consecutive inputs, their order rotating at each block: ONNX Runtime's workers
    spin for a while after a run (its default, and eeengine's executor's), which slows
    whichever provider runs next, so alternating at every input measured each provider as run
    right after another one's spin."""
    names = list(providers)
    times = {n: [] for n in names}
    labels = {n: [] for n in names}
    for b, start in enumerate(range(0, len(texts), block)):
        for name in names[b % len(names) :] + names[: b % len(names)]:
            for text in texts[start : start + block]:
                began = time.perf_counter()
                labels[name] += providers[name]([text])
                times[name].append(1000 * (time.perf_counter() - began))
    return times, labels


def throughput(
    providers: dict[str, Predict], texts: list, batch_size: int, repeats: int
) -> tuple[dict[str, float], dict[str, list[int]]]:
    """Inputs per second over ``texts`` in batches, best of interleaved repeats, and each
    provider's predicted labels (from its first pass)."""
    batches = [texts[i : i + batch_size] for i in range(0, len(texts), batch_size)]
    best = {n: 0.0 for n in providers}
    labels: dict[str, list[int]] = {}
    names = list(providers)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            predicted = []
            start = time.perf_counter()
            for batch in batches:
                predicted += providers[name](batch)
            best[name] = max(best[name], len(texts) / (time.perf_counter() - start))
            labels.setdefault(name, predicted)
    return best, labels


def prepare(threads: int | None, ckpt: Path | None) -> Path:
    """Set torch's CPU threads (None: its default), silence the truncation warnings (reviews
    longer than the limit are truncated on purpose; Engine and the tokenizer warn on each
    call), and return the checkpoint (None: the cached default)."""
    if threads:
        torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message=r".*longer than \d+ tokens were truncated")
    transformers.logging.set_verbosity_error()
    return ckpt or default_checkpoint()


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", type=Path, help="checkpoint (default: the cached SST-2 one)")
    parser.add_argument("--task", default="sst2", help="a classification task of data/, or imdb")
    parser.add_argument("--limit", type=int, help="report on the first N inputs (default: all)")
    parser.add_argument("--latency-limit", type=int, help="batch-1 latency on the first N only")
    parser.add_argument("--calibration-limit", type=int, help="imdb: calibrate on N reviews")
    parser.add_argument(
        "--label-free", action="store_true", help="imdb: calibrate by agreement, not labels"
    )
    parser.add_argument("--providers", nargs="+", help="shell patterns of providers to run")
    parser.add_argument(
        "--token-pruning",
        type=json.loads,
        default=DEFAULT_TOKEN_PRUNING,
        help="schedule of the _tok providers when the checkpoint has none (JSON)",
    )
    parser.add_argument(
        "--max-drop",
        type=float,
        default=0.5,
        help="the verdict's bound: accuracy points below fp32 full depth (imdb: 1.0)",
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's default)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compare_sst2"))
    args = parser.parse_args()
    ckpt = prepare(args.threads, args.ckpt)
    workload = load_workload(args.task, args.calibration_limit, args.label_free)
    texts, gold = workload.inputs[: args.limit], workload.labels[: args.limit]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        providers, settings = build_providers(
            ckpt, workload, Path(workdir), args.providers, args.token_pruning
        )
        if not providers:
            raise SystemExit(f"no provider matches --providers {' '.join(args.providers)}")
        print(f"built {len(providers)} providers in {time.perf_counter() - started:.0f} s")
        for predict in providers.values():  # warm up (and compile) on other shapes
            for text in workload.inputs[-args.warmup :]:
                predict([text])
            predict(workload.inputs[-max(args.batch_sizes) :])
        # int8 predictions depend on the batch (one activation scale per call), so accuracy
        # and exits are recorded for each batch size, from the pass that times it.
        recorders = {n: p for n, p in providers.items() if isinstance(p, EngineRecorder)}
        latency_texts = texts[: args.latency_limit]
        for recorder in recorders.values():
            recorder.reset()  # the warm-up ran through them
        times, labels = latency_batch1(providers, latency_texts)
        passes = {1: (labels, gold[: len(latency_texts)])}
        exits = {1: {n: r.summary() for n, r in recorders.items()}}
        rates = {}
        for b in args.batch_sizes:
            for recorder in recorders.values():
                recorder.reset()
            rates[b], labels = throughput(providers, texts, b, args.repeats)
            passes[b] = (labels, gold)
            exits[b] = {n: r.summary() for n, r in recorders.items()}

    rows = {}
    for name in providers:
        median = statistics.median(times[name])
        rows[name] = dict(settings[name])
        for b, (labels, expected) in passes.items():
            rows[name][f"accuracy_b{b}"] = accuracy(labels[name], expected)
            for key, value in exits[b].get(name, {}).items():
                rows[name][f"{key}_b{b}"] = value
        rows[name].update(median_ms=median, p90_ms=_percentile(times[name], 90))
        for base in BASELINES:
            if base in providers:
                rows[name][f"speedup_median_vs_{base}"] = statistics.median(times[base]) / median
        for b in args.batch_sizes:
            rows[name][f"sentences_per_s_b{b}"] = rates[b][name]
            for base in BASELINES:
                if base in providers:
                    rows[name][f"throughput_vs_{base}_b{b}"] = rates[b][name] / rates[b][base]
    report = {
        "task": args.task,
        "inputs": len(texts),
        "latency_inputs": len(latency_texts),
        "max_length": workload.max_length,
        "label_free_calibration": workload.label_free,
        "calibration_inputs": None
        if workload.calibration is None
        else len(workload.calibration.texts),
        "threads": torch.get_num_threads(),
        "seconds": time.perf_counter() - started,
        "environment": environment(),
        "checkpoint": str(ckpt),
        "max_drop": args.max_drop,
        "providers": rows,
    }
    table = markdown(report, args.batch_sizes)
    write_results(args.out, report, table)
    plot(report, args.batch_sizes[0], args.out.with_suffix(".png"))
    print(table)


if __name__ == "__main__":
    main()
