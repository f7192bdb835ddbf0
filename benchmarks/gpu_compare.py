"""Side-by-side GPU latency: Hugging Face eager, Hugging Face ``torch.compile(mode=
"reduce-overhead")`` (CUDA graphs), eeengine eager (the sync-free loop, every layer) and
eeengine graph mode (one CUDA graph replay, IF nodes skip layers once every row exited).

Models: the MiniLM-L6 SST-2 checkpoint given by ``--ckpt`` (the Hugging Face peers load its
backbone, the same weights) and a random-weight 12-layer, 768-hidden BERT (BERT-base shape,
timing only). eeengine runs full depth (policy ``none``) and the default policy: the
checkpoint's default for MiniLM; ``budget`` at layer 6 for the random model (its random heads
never get confident). The peers run full depth plus the last exit head (same output).

Inputs: SST-2 dev sentences, tokenized to exactly N tokens (truncated or padded; the mask marks
real tokens); batch 1 at N = 16 / 64 / 128, batch 32 and 128 at N = 64. Each repetition uses
the next sentences, so early exit sees real inputs. Providers run interleaved; each call is
timed end to end with a device synchronize after it (the measurement's sync, not the engine's);
median and p20/p80 in ms, sentences/s from the median. Graph-pool memory: reserved CUDA memory
before and after eeengine captured its graphs for all shapes, per model and policy.

Shapes run most important first and stop when ``--budget-s`` is spent (each shape's rows are
written to ``--out`` as soon as they exist), so a time limit leaves partial, valid results.

    python benchmarks/gpu_compare.py --ckpt DIR [--out gpu_compare.json] [--budget-s 150]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from transformers import BertConfig
from transformers import BertModel as HFBertModel

from eeengine.checkpoint import load_checkpoint
from eeengine.cuda_graph import GraphRunner
from eeengine.data import get_task, load_split
from eeengine.evaluation import policy_params
from eeengine.modeling_multiexit import MultiExitBert
from eeengine.policies import ExitPolicy, make_policy
from eeengine.policies.budget import BudgetPolicy
from eeengine.policies.none import NoExitPolicy
from eeengine.runtime import early_exit_forward
from eeengine.token_pruning import TokenPruning

# (batch_size, seq_len), most important first (the targets: batch 1 at 128 tokens,
# batch 128).
SHAPES = [(1, 128), (128, 64), (32, 64), (1, 16), (1, 64)]
QUANTILES = {"median": 50, "p20": 20, "p80": 80}


def hf_twin(model: MultiExitBert) -> HFBertModel:
    """A transformers BertModel (SDPA attention) with ``model``'s backbone weights."""
    hf = HFBertModel(model.config, add_pooling_layer=False)
    missing, unexpected = hf.load_state_dict(model.bert.state_dict(), strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return hf.to(next(model.parameters()).device).eval()


def hf_forward(hf: HFBertModel, model: MultiExitBert) -> Callable[..., Tensor]:
    """Full depth with the last exit head: the logits eeengine's full depth returns."""
    head = model.exit_head(model.num_layers - 1)

    def forward(input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor) -> Tensor:
        hidden = hf(input_ids, attention_mask, token_type_ids).last_hidden_state
        return head.classify(head.pool(hidden, attention_mask))

    return forward


def inputs_for(tokenizer, texts: list[str], batch_size: int, seq_len: int, count: int) -> list:
    """``count`` batches of ``batch_size`` consecutive sentences, exactly ``seq_len`` tokens."""
    batches = []
    for i in range(count):
        chunk = [texts[(i * batch_size + j) % len(texts)] for j in range(batch_size)]
        enc = tokenizer(
            chunk, padding="max_length", truncation=True, max_length=seq_len,
            return_tensors="pt", return_token_type_ids=True,
        )  # fmt: skip
        batches.append(
            tuple(enc[k].cuda() for k in ("input_ids", "attention_mask", "token_type_ids"))
        )
    return batches


def measure(calls: dict[str, Callable[..., object]], batches: list, reps: int) -> dict:
    """Interleaved latencies (ms) per provider over ``reps`` repetitions after 3 warm-ups."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for rep in range(3 + reps):
        batch = batches[rep % len(batches)]
        for name, call in calls.items():
            torch.cuda.synchronize()
            start = time.perf_counter()
            call(*batch)
            torch.cuda.synchronize()
            if rep >= 3:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {
        name: {q: statistics.quantiles(t, n=100)[p - 1] for q, p in QUANTILES.items()}
        for name, t in times.items()
    }


def run_model(
    label: str,
    model: MultiExitBert,
    policy: ExitPolicy,
    token_pruning: TokenPruning | None,
    tokenizer,
    texts: list[str],
    deadline: float,
    write: Callable[[dict], None],
) -> None:
    """Every shape for one model (until ``deadline``), rows written as they are measured;
    ``policy`` runs with ``token_pruning``, full depth without."""
    hf = hf_twin(model)
    forward = hf_forward(hf, model)
    compiled = torch.compile(forward, mode="reduce-overhead")
    policies = {"full": NoExitPolicy(), "policy": policy}
    schedules = {"full": None, "policy": token_pruning}
    runners = {key: GraphRunner(model, p, None, schedules[key]) for key, p in policies.items()}
    reserved_before = torch.cuda.memory_reserved()
    for batch_size, seq_len in SHAPES:
        if time.monotonic() > deadline:
            write({"model": label, "batch_size": batch_size, "seq_len": seq_len,
                   "skipped": "time budget spent"})  # fmt: skip
            continue
        batches = inputs_for(tokenizer, texts, batch_size, seq_len, 64 if batch_size == 1 else 4)
        calls: dict[str, Callable[..., object]] = {"hf_eager": forward, "hf_compile": compiled}
        for key, p in policies.items():
            runner = runners[key]
            calls[f"ee_eager_{key}"] = lambda *b, p=p, r=runner: early_exit_forward(
                model, p, *b, backend=r.backend, token_pruning=r.token_pruning
            )
            calls[f"ee_graph_{key}"] = runner
        with torch.inference_mode():
            results = measure(calls, batches, reps=60 if batch_size == 1 else 20)
            exits = [runners["policy"](*b).exit_layer.float().mean().item() for b in batches]
        for provider, quantiles in results.items():
            write({
                "model": label, "batch_size": batch_size, "seq_len": seq_len,
                "provider": provider, **quantiles,
                "sentences_per_s": batch_size * 1e3 / quantiles["median"],
                "policy": repr(policies["policy" if provider.endswith("policy") else "full"]),
                "avg_exit_layer": statistics.mean(exits) if provider.endswith("policy") else None,
            })  # fmt: skip
    write({
        "model": label, "graph_pool_mib": (torch.cuda.memory_reserved() - reserved_before) / 2**20,
        "buckets": {key: r.buckets for key, r in runners.items()},
        "conditional_nodes": runners["full"].conditional_unavailable or "yes",
    })  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("gpu_compare.json"))
    parser.add_argument("--budget-s", type=float, default=150.0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_compare needs a CUDA GPU")
    deadline = time.monotonic() + args.budget_s
    rows: list[dict] = []
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}

    def write(row: dict) -> None:
        rows.append(row)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        if "provider" in row:
            print(
                f"{row['model']:<9} b{row['batch_size']:<4} n{row['seq_len']:<4} "
                f"{row['provider']:<16} {row['median']:8.3f} ms [{row['p20']:.3f}, "
                f"{row['p80']:.3f}] {row['sentences_per_s']:9.0f}/s"
                + (f" avg exit {row['avg_exit_layer']:.2f}" if row["avg_exit_layer"] else ""),
                flush=True,
            )
        else:
            print(json.dumps(row), flush=True)

    texts = load_split(get_task("sst2"), "dev").texts
    ckpt = load_checkpoint(args.ckpt)
    minilm = ckpt.model.cuda().eval()
    stored = ckpt.manifest["policy"]
    default = make_policy(stored["name"], **policy_params(stored))
    pruning = ckpt.manifest.get("token_pruning")
    schedule = None if pruning is None else TokenPruning.from_json(pruning, minilm.num_layers)
    run_model("minilm", minilm, default, schedule, ckpt.tokenizer, texts, deadline, write)
    torch.manual_seed(0)
    config = BertConfig(num_hidden_layers=12, hidden_size=768, num_attention_heads=12,
                        intermediate_size=3072)  # fmt: skip
    bert = MultiExitBert(config, num_labels=2).cuda().eval()
    run_model(
        "bert-base", bert, BudgetPolicy(layer=6), None, ckpt.tokenizer, texts, deadline, write
    )


if __name__ == "__main__":
    main()
