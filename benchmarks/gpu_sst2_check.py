"""The GPU engine against the CPU reference on all of SST-2 dev, for every policy, and
``Engine.predict`` without a host sync (``benchmarks/gpu_check.sh`` runs it on a lent GPU).

Reference: the checkpoint's model on CPU, every exit at full depth (``all_exit_outputs``, with
the checkpoint's token pruning), then each policy applied by its plain-torch definition
(``run_policy``). For every policy the checkpoint can run (parameters from the checkpoint's
default or its calibration), ``Engine(ckpt, policy=name, device="cuda")`` (graph mode) predicts
all of SST-2 dev; labels and exit layers must equal the reference's, logits agree to 1e-3.
The default policy also runs with ``graph=False`` (the eager GPU loop). Then, after a warm-up
call (which captures the graphs), ``Engine.predict`` on 96 sentences runs under
``torch.cuda.set_sync_debug_mode("error")``: any host sync raises. (Results reach the host by
pinned non-blocking copies and one ``Event.synchronize`` per call, which that mode does not
flag: it is the one deliberate wait, per call, not per batch or layer.)

    python benchmarks/gpu_sst2_check.py --ckpt DIR [--out results.json]

Exit status 1 when a label, an exit layer or the sync check differs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from eeengine import Engine
from eeengine.data import get_task, load_split
from eeengine.evaluation import all_exit_outputs
from eeengine.policies import POLICIES, run_policy

SYNC_SAMPLE = 96


def reference_outputs(ckpt: Path, texts: list[str]) -> tuple[Engine, torch.Tensor, dict]:
    """The CPU engine and every exit's full-depth logits and signals on ``texts``."""
    cpu = Engine(ckpt, device="cpu", executor="torch", backend="reference")
    logits, signals = all_exit_outputs(
        cpu.model, cpu.tokenizer, texts, None, cpu.max_length, token_pruning=cpu.token_pruning
    )
    return cpu, logits, signals


def compare(engine: Engine, texts: list[str], all_logits, signals) -> dict:
    """Predict ``texts`` on the GPU engine; mismatches against ``run_policy`` on CPU."""
    exit_layer, logits = run_policy(engine.policy, all_logits, signals)
    started = time.perf_counter()
    predictions = engine.predict(texts, batch_size=32)
    seconds = time.perf_counter() - started
    got_layers = torch.tensor([p.exit_layer for p in predictions])
    got_logits = torch.tensor([p.logits for p in predictions])
    layer_diff = (got_layers != exit_layer).nonzero().flatten().tolist()
    label_diff = (got_logits.argmax(-1) != logits.argmax(-1)).nonzero().flatten().tolist()
    return {
        "n": len(texts),
        "exit_layer_mismatches": len(layer_diff),
        "label_mismatches": len(label_diff),
        "first_mismatches": sorted(set(layer_diff + label_diff))[:5],
        "max_logit_diff": float((got_logits - logits).abs().max()),
        "avg_exit_layer": float(got_layers.float().mean()),
        "seconds_incl_capture": seconds,
    }


def sync_check(engine: Engine, texts: list[str]) -> str:
    """ "ok", or the error a host sync raised inside ``engine.predict`` after warm-up."""
    engine.predict(texts, batch_size=32)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        engine.predict(texts, batch_size=32)
    except RuntimeError as error:
        return f"host sync: {error}".splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return "ok"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("gpu_sst2_check.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_sst2_check needs a CUDA GPU")
    texts = load_split(get_task("sst2"), "dev").texts
    cpu, all_logits, signals = reference_outputs(args.ckpt, texts)
    default = cpu.manifest["policy"]["name"]
    names = [default] + [name for name in POLICIES if name != default]
    rows = []
    for name, graph in [(default, True), (default, False)] + [(n, True) for n in names[1:]]:
        row = {"policy": name, "mode": "graph" if graph else "eager"}
        try:
            engine = Engine(args.ckpt, policy=name, device="cuda", graph=graph)
        except ValueError as error:  # e.g. lte without an LTE module, no calibrated threshold
            rows.append({**row, "skipped": str(error)})
            continue
        row.update(params=repr(engine.policy), backend=engine.backend, loop=engine.loop)
        row.update(compare(engine, texts, all_logits, signals))
        row["sync_check"] = sync_check(engine, texts[:SYNC_SAMPLE])
        rows.append(row)
        del engine
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "checkpoint": str(args.ckpt),
        "token_pruning": None if cpu.token_pruning is None else cpu.token_pruning.to_json(),
        "results": rows,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    failed = False
    print(f"{report['device']}, torch {report['torch']}, SST-2 dev ({len(texts)} sentences)")
    for row in rows:
        if "skipped" in row:
            print(f"  {row['policy']:<20} skipped: {row['skipped']}")
            continue
        bad = row["exit_layer_mismatches"] + row["label_mismatches"]
        failed |= bool(bad) or row["sync_check"] != "ok"
        print(
            f"  {row['policy']:<20} {row['mode']:<5} {row['backend']:<9} exit-layer mismatches "
            f"{row['exit_layer_mismatches']}, label mismatches {row['label_mismatches']}, max "
            f"|dlogit| {row['max_logit_diff']:.2e}, avg exit {row['avg_exit_layer']:.2f}, "
            f"sync check {row['sync_check']}"
        )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
