"""Graph mode on a GPU: padding exited rows (eeengine.static_loop) against compacting live rows
into smaller static buffers (eeengine.compaction), at batch 32 and 128.

Model and inputs: the checkpoint given by ``--ckpt`` with its default policy on SST-2 dev
sentences (64 tokens), so rows exit where real rows exit; without ``--ckpt``, a random
MiniLM-shaped model whose heads are scaled so that rows exit at different layers, policy
``entropy``. Both runners replay one CUDA graph per batch (``GraphRunner`` with
``compact=False`` / ``True``), results checked equal (exit layers exactly, logits to 1e-4).
Interleaved, each call timed with a device synchronize after it; median ms per batch and
sentences/s.

    python benchmarks/benchmark_compaction.py [--ckpt DIR] [--out compaction.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from benchmark_exit_head_step import minilm_config
from gpu_compare import inputs_for
from transformers import PreTrainedTokenizerBase

from eeengine.checkpoint import load_checkpoint
from eeengine.cuda_graph import GraphRunner
from eeengine.data import get_task, load_split
from eeengine.evaluation import policy_params
from eeengine.modeling_multiexit import MultiExitBert
from eeengine.policies import make_policy
from eeengine.policies.entropy import EntropyPolicy

BATCH_SIZES = (32, 128)
SEQ_LEN = 64


def model_and_policy(ckpt: Path | None):
    """The checkpoint's model, default policy and tokenizer, or a random MiniLM-shaped model
    with confident-enough heads, ``entropy`` at 0.3 nats and no tokenizer (random ids)."""
    if ckpt is not None:
        loaded = load_checkpoint(ckpt)
        stored = loaded.manifest["policy"]
        policy = make_policy(stored["name"], **policy_params(stored))
        return loaded.model.cuda().eval(), policy, loaded.tokenizer
    torch.manual_seed(0)
    model = MultiExitBert(minilm_config(), num_labels=2).eval()
    with torch.no_grad():
        for layer, head in enumerate(model.exit_heads, start=1):
            head.classifier.weight.mul_(4.0 * layer)  # later layers more confident
    return model.cuda(), EntropyPolicy(0.3), None


def batches(tokenizer: PreTrainedTokenizerBase | None, batch_size: int, count: int) -> list:
    """``count`` batches of SST-2 dev sentences at SEQ_LEN tokens (random ids without a
    tokenizer)."""
    if tokenizer is not None:
        texts = load_split(get_task("sst2"), "dev").texts
        return inputs_for(tokenizer, texts, batch_size, SEQ_LEN, count)
    gen = torch.Generator().manual_seed(batch_size)
    ids = torch.randint(1000, 2000, (count, batch_size, SEQ_LEN), generator=gen).cuda()
    return [(i, torch.ones_like(i), torch.zeros_like(i)) for i in ids]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("compaction.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmark_compaction needs a CUDA GPU")
    model, policy, tokenizer = model_and_policy(args.ckpt)
    runners = {
        "padded": GraphRunner(model, policy, None),
        "compacted": GraphRunner(model, policy, None, compact=True),
    }
    rows = []
    with torch.inference_mode():
        for batch_size in BATCH_SIZES:
            data = batches(tokenizer, batch_size, 8)
            outs = {name: [r(*b) for b in data] for name, r in runners.items()}
            for got, want in zip(outs["compacted"], outs["padded"], strict=True):
                assert torch.equal(got.exit_layer, want.exit_layer), "exit layers differ"
                torch.testing.assert_close(got.logits, want.logits, atol=1e-4, rtol=1e-4)
            avg_exit = statistics.mean(o.exit_layer.float().mean().item() for o in outs["padded"])
            times: dict[str, list[float]] = {name: [] for name in runners}
            for rep in range(args.reps):
                for name, runner in runners.items():
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    runner(*data[rep % len(data)])
                    torch.cuda.synchronize()
                    times[name].append((time.perf_counter() - start) * 1e3)
            for name, t in times.items():
                median = statistics.median(t)
                rows.append({"batch_size": batch_size, "seq_len": SEQ_LEN, "runner": name,
                             "median_ms": median, "sentences_per_s": batch_size * 1e3 / median,
                             "avg_exit_layer": avg_exit})  # fmt: skip
    report = {
        "device": torch.cuda.get_device_name(),
        "model": str(args.ckpt) if args.ckpt else "random MiniLM-shaped",
        "policy": repr(policy),
        "results": rows,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for row in rows:
        print(
            f"batch {row['batch_size']:>3} {row['runner']:<10} {row['median_ms']:.3f} ms "
            f"{row['sentences_per_s']:.0f}/s (avg exit layer {row['avg_exit_layer']:.2f})"
        )


if __name__ == "__main__":
    main()
