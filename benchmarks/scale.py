"""How cost grows with sequence length and batch size, full depth against early exit.

Three sections, each provider interleaved with the others in one process:

- ``seq``: batch-1 latency (median ms) at 16 ... 512 tokens. Inputs are SST-2 dev sentences
  joined into texts of exactly that many tokens (early exit on such joined texts is not what
  it is on single sentences: the average exit layer is reported beside each time).
- ``batch``: sentences/s on SST-2 dev sentences at batch size 1 ... 256.
- ``memory``: peak resident memory (Linux ``VmHWM``, MiB) of one ``predict`` at batch 256
  of 128-token texts, each provider alone in a fresh subprocess (memory one provider freed would
  hide what the next one needs): resident memory once loaded and warmed up, and the peak
  during the batch.

Providers: ``hf_eager`` (transformers full depth) and eeengine at full depth and within 0.5
accuracy points of full depth, for each layer executor (see ``compare.py``).

    python benchmarks/scale.py --threads 2 --out benchmarks/results/scale_sst2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from compare import EXECUTORS
from environment import environment
from peers import FullDepth, Predict, engine_provider, torch_provider
from results_io import markdown_table, write_results

from eeengine import Engine
from eeengine.data import get_task, load_split
from eeengine.defaults import default_checkpoint
from eeengine.evaluation import policy_params
from eeengine.selection import choose_operating_point

SEQ_LENS = [16, 32, 64, 128, 256, 512]
BATCH_SIZES = [1, 8, 32, 128, 256]
SECTIONS = ("seq", "batch", "memory")


def texts_of_length(engine: Engine, sentences: list[str], seq_len: int, count: int) -> list[str]:
    """``count`` texts of exactly ``seq_len`` tokens ([CLS] and [SEP] included), each made of
    consecutive words of ``sentences`` (a start word is skipped when no cut fits exactly)."""
    words = " ".join(sentences).split()
    texts: list[str] = []
    start = 0
    while len(texts) < count:
        low, high = 1, 4 * seq_len  # the longest prefix of at most seq_len tokens
        while low < high:
            mid = (low + high + 1) // 2
            if _num_tokens(engine, words[start : start + mid]) <= seq_len:
                low = mid
            else:
                high = mid - 1
        if _num_tokens(engine, words[start : start + low]) == seq_len:
            texts.append(" ".join(words[start : start + low]))
            start += low
        else:
            start += 1
        start %= len(words) - 4 * seq_len
    return texts


def _num_tokens(engine: Engine, words: list[str]) -> int:
    return len(engine.tokenizer(" ".join(words))["input_ids"])


def build_providers(
    ckpt: Path, max_length: int, only: str | None = None
) -> tuple[dict[str, Predict], dict[str, Engine]]:
    """``hf_eager`` and the eeengine providers (full depth, within 0.5 points), or just the
    provider ``only``, and the engines behind the eeengine ones (to read exit layers)."""
    base = Engine(ckpt, policy="none", executor="torch", max_length=max_length)
    providers = {}
    if only in (None, "hf_eager"):
        providers["hf_eager"] = torch_provider(base, FullDepth(base))
    points = {"full": ("none", {})}
    chosen = choose_operating_point(base.calibration, max_drop=0.5)
    if chosen is not None:
        points["drop0.5"] = (chosen[0], policy_params(chosen[1]))
    engines = {}
    for short, executor in EXECUTORS.items():
        for point, (policy, params) in points.items():
            name = f"eeengine_{short}_{point}"
            if only not in (None, name):
                continue
            engines[name] = Engine(
                ckpt, policy=policy, executor=executor, max_length=max_length, **params
            )
            providers[name] = engine_provider(engines[name])
    return providers, engines


def _timed(predict: Predict, texts: list[str]) -> float:
    start = time.perf_counter()
    predict(texts)
    return time.perf_counter() - start


def interleaved(providers: dict[str, Predict], batches: list[list[str]]) -> dict[str, list[float]]:
    """Seconds per batch for every provider, providers in a rotating order per batch."""
    names = list(providers)
    times = {name: [] for name in names}
    for i, batch in enumerate(batches):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            times[name].append(_timed(providers[name], batch))
    return times


def avg_exit_layer(engine: Engine, texts: list[str]) -> float:
    return statistics.mean(p.exit_layer for p in engine.predict(texts))


def seq_section(providers, engines, engine, sentences, repeats) -> dict:
    rows = {}
    for seq_len in SEQ_LENS:
        texts = texts_of_length(engine, sentences, seq_len, repeats)
        times = interleaved(providers, [[text] for text in texts])
        rows[seq_len] = {
            name: {
                "median_ms": 1000 * statistics.median(values),
                **(
                    {"avg_exit_layer": avg_exit_layer(engines[name], texts)}
                    if name in engines
                    else {}
                ),
            }
            for name, values in times.items()
        }
        print(
            f"seq {seq_len}: "
            + ", ".join(f"{n} {r['median_ms']:.1f} ms" for n, r in rows[seq_len].items())
        )
    return rows


def batch_section(providers, sentences, repeats) -> dict:
    rows = {}
    for batch_size in BATCH_SIZES:
        count = max(1, min(repeats, len(sentences) // batch_size))
        batches = [sentences[i * batch_size : (i + 1) * batch_size] for i in range(count)]
        times = interleaved(providers, batches)
        rows[batch_size] = {
            name: {"sentences_per_s": batch_size / statistics.median(values)}
            for name, values in times.items()
        }
        print(
            f"batch {batch_size}: "
            + ", ".join(f"{n} {r['sentences_per_s']:.0f}/s" for n, r in rows[batch_size].items())
        )
    return rows


def peak_memory(provider: str, ckpt: Path, batch_size: int, seq_len: int) -> dict:
    """In this process: load ``provider`` alone, warm it up, then run one batch.

    Returns:
        ``loaded_mib``: resident memory before the batch; ``peak_mib``: peak resident memory
        during the batch (Linux ``VmHWM``, reset before the batch through
        ``/proc/self/clear_refs``).
    """
    providers, _ = build_providers(ckpt, max(seq_len, 128), only=provider)
    base = Engine(ckpt, policy="none", executor="torch", max_length=max(seq_len, 128))
    sentences = load_split(get_task("sst2"), "dev").texts
    texts = texts_of_length(base, sentences, seq_len, batch_size)
    del base
    predict = providers[provider]
    predict(texts[:2])
    loaded = _status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # peak resident memory := current
    predict(texts)
    return {"loaded_mib": loaded, "peak_mib": _status_mib("VmHWM")}


def _status_mib(field: str) -> float:
    """A memory field of /proc/self/status (Linux), in MiB. Unlike ``getrusage``'s maxrss,
    which a subprocess inherits from its parent, these belong to this process alone."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024  # kB
    raise KeyError(field)


def memory_section(names: list[str], ckpt: Path, threads: int) -> dict:
    rows = {}
    for name in names:
        command = [sys.executable, __file__, "--threads", str(threads), "--peak-memory", name]
        if ckpt is not None:
            command += ["--ckpt", str(ckpt)]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows[name] = json.loads(out.strip().splitlines()[-1])
        print(f"memory {name}: {rows[name]}")
    return rows


def _markdown(report: dict) -> str:
    lines = []
    if "seq" in report:
        names = list(next(iter(report["seq"].values())))
        lines += ["### Latency at batch 1 against sequence length (median ms; avg exit layer)", ""]
        cells = []
        for seq_len, row in report["seq"].items():
            cells.append([seq_len])
            for n in names:
                layer = f" ({row[n]['avg_exit_layer']:.1f})" if "avg_exit_layer" in row[n] else ""
                cells[-1].append(f"{row[n]['median_ms']:.1f}{layer}")
        lines.append(markdown_table(["seq", *names], cells))  # its newline + the join's: a blank
    if "batch" in report:
        names = list(next(iter(report["batch"].values())))
        lines += ["### Sentences/s against batch size (SST-2 dev sentences)", ""]
        cells = [
            [batch_size, *(f"{row[n]['sentences_per_s']:.0f}" for n in names)]
            for batch_size, row in report["batch"].items()
        ]
        lines.append(markdown_table(["batch", *names], cells))
    if "memory" in report:
        lines += ["### Resident memory, one batch of 256 x 128 tokens (MiB)", ""]
        cells = []
        for name, row in report["memory"].items():
            extra = row["peak_mib"] - row["loaded_mib"]
            cells.append(
                [name, f"{row['loaded_mib']:.0f}", f"{row['peak_mib']:.0f}", f"{extra:.0f}"]
            )
        header = ["provider", "loaded", "peak during the batch", "peak - loaded"]
        lines.append(markdown_table(header, cells).removesuffix("\n"))  # no blank line after
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", type=Path, help="checkpoint (default: the cached SST-2 one)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=10, help="inputs / batches per point")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scale_sst2"))
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--peak-memory", metavar="PROVIDER", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ckpt = args.ckpt or default_checkpoint()
    if args.peak_memory:
        print(json.dumps(peak_memory(args.peak_memory, ckpt, 256, 128)))
        return

    providers, engines = build_providers(ckpt, max(SEQ_LENS))
    engine = next(iter(engines.values()))
    sentences = load_split(get_task("sst2"), "dev").texts
    if set(args.sections) & {"seq", "batch"}:
        for predict in providers.values():  # warm up
            predict(sentences[:8])
    sections = {
        "seq": lambda: seq_section(providers, engines, engine, sentences, args.repeats),
        "batch": lambda: batch_section(providers, sentences, args.repeats),
        "memory": lambda: memory_section(list(providers), args.ckpt, args.threads),
    }
    report = {"environment": environment(), "checkpoint": str(ckpt)}
    report.update({name: sections[name]() for name in args.sections})
    table = _markdown(report)
    write_results(args.out, report, table)
    print(table)


if __name__ == "__main__":
    main()
