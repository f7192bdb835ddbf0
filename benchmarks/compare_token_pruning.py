"""Layer-wise exit alone against layer-wise + token-wise exit (MPEE), side by side in one
process, on one checkpoint and a task's dev split: the task metric, MPEE's FLOPs ratio ρ and
its inverse (the acceleration), the layer speed-up and wall-clock, each at the operating point
(the checkpoint's policy, or ``--policy`` with ``--threshold`` / ``--patience`` / ``--param``
as in ``eeengine eval``) and at full depth (policy ``none``).

Providers: ``layerwise`` (no pruning) and ``tokenwise`` (the pruning schedule: the
checkpoint's, else ``--token-pruning``, else the 6-layer default). Each provider evaluates the
whole split once per round, in an order that alternates between rounds; wall-clock is the
median over rounds, reported as a ratio to ``layerwise``.

    python benchmarks/compare_token_pruning.py --ckpt DIR --task sst2 \
        --out benchmarks/results/token_pruning_sst2
    python benchmarks/compare_token_pruning.py --ckpt DIR --task sst2 --policy elbert \
        --threshold 0.6 --param window=3 --param window_test=monotonic
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from results_io import markdown_table, write_results

from eeengine import Engine
from eeengine.cli_args import add_policy_args, policy_kwargs
from eeengine.data import get_task, load_split
from eeengine.evaluation import evaluate
from eeengine.token_pruning import DEFAULT_TOKEN_PRUNING

MEASURES = ("value", "avg_exit_layer", "speedup", "flops_ratio", "flops_speedup")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, type=Path)
    parser.add_argument("--task", required=True)
    parser.add_argument("--token-pruning", type=json.loads, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    add_policy_args(parser)
    args = parser.parse_args()
    point = policy_kwargs(args)

    task = get_task(args.task)
    dev = load_split(task, "dev")
    manifest = json.loads((args.ckpt / "eeengine.json").read_text())
    schedule = manifest.get("token_pruning") or args.token_pruning or DEFAULT_TOKEN_PRUNING
    providers = {"layerwise": None, "tokenwise": schedule}
    results: dict[str, dict] = {}
    for name, token_pruning in providers.items():
        for full_depth in (False, True):
            policy = {"policy": "none"} if full_depth else point
            engine = Engine(args.ckpt, token_pruning=token_pruning, **policy)
            key = f"{name}/{'full depth' if full_depth else 'policy'}"
            result = evaluate(engine, dev, task.metric, batch_size=args.batch_size)
            results[key] = {"policy": repr(engine.policy), **{m: result[m] for m in MEASURES}}
    engines = {name: Engine(args.ckpt, token_pruning=tp, **point) for name, tp in providers.items()}
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    for round_index in range(args.rounds):
        order = list(engines) if round_index % 2 == 0 else list(reversed(engines))
        for name in order:
            result = evaluate(engines[name], dev, task.metric, batch_size=args.batch_size)
            seconds[name].append(result["seconds"])
    base = statistics.median(seconds["layerwise"])
    for name in engines:
        median = statistics.median(seconds[name])
        results[f"{name}/policy"].update(seconds=median, time_ratio=median / base)

    report = {"ckpt": str(args.ckpt), "task": task.name, "schedule": schedule, "results": results}
    header = [
        "provider / policy", task.metric, "avg exit layer", "layer speed-up", "ρ", "1/ρ",
        "time (ratio)",
    ]  # fmt: skip
    rows = []
    for key, r in results.items():
        timing = f"{r['seconds']:.1f} s ({r['time_ratio']:.2f})" if "seconds" in r else ""
        rows.append([
            key, f"{r['value']:.2f}", f"{r['avg_exit_layer']:.2f}", f"{r['speedup']:.2f}x",
            f"{r['flops_ratio']:.3f}", f"{r['flops_speedup']:.2f}x", timing,
        ])  # fmt: skip
    text = f"{task.name} dev, {args.ckpt.name}, token pruning {json.dumps(schedule)}\n\n"
    text += markdown_table(header, rows)
    print(text, end="")
    if args.out:
        write_results(args.out, report, text)


if __name__ == "__main__":
    main()
