"""The ``eeengine`` command: train, predict, eval, info."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, fields
from pathlib import Path

from eeengine._custom_ops import HAS_C, LOAD_ERROR
from eeengine.checkpoint import CheckpointError
from eeengine.data import get_task, load_split
from eeengine.defaults import default_checkpoint, minilm_dir
from eeengine.engine import Engine
from eeengine.evaluation import all_exit_logits, exit_metrics
from eeengine.executors import EXECUTORS
from eeengine.training import TrainConfig, train


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", help="checkpoint directory (default: the cached SST-2 model)")
    parser.add_argument("--policy", help="exit policy (default: the checkpoint's)")
    parser.add_argument("--threshold", type=float, help="policy threshold")
    parser.add_argument("--patience", type=int, help="patience (pcee, patience)")
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="another policy parameter, e.g. --param layer=3 (budget), --param window=2 (elbert)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", choices=("cpp", "reference"), help="default: cpp if built")
    parser.add_argument(
        "--executor", choices=EXECUTORS, help="default: onnxruntime if installed, else torch"
    )
    parser.add_argument("--batch-size", type=int, default=32)


def _engine(args: argparse.Namespace) -> Engine:
    ckpt = args.ckpt or default_checkpoint()
    return Engine(
        ckpt,
        policy=args.policy,
        threshold=args.threshold,
        patience=args.patience,
        device=args.device,
        backend=args.backend,
        executor=args.executor,
        **dict(_parse_param(p) for p in args.param),
    )


def _parse_param(text: str) -> tuple[str, object]:
    """``name=value`` with value parsed as JSON when it is JSON (numbers, lists), else a string."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise ValueError(f"--param {text!r}: expected NAME=VALUE")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def cmd_predict(args: argparse.Namespace) -> None:
    engine = _engine(args)
    predictions = engine.predict(list(args.texts), batch_size=args.batch_size)
    if args.json:
        print(
            json.dumps(
                [{"text": t, **asdict(p)} for t, p in zip(args.texts, predictions, strict=True)]
            )
        )
        return
    for text, p in zip(args.texts, predictions, strict=True):
        answer = f"{p.label:<10} {p.score:6.1%}" if p.label is not None else f"{p.value:8.3f}"
        print(f"{answer}  exit {p.exit_layer}/{p.num_layers}  {text}")


def cmd_train(args: argparse.Namespace) -> None:
    config = TrainConfig(
        base_model=args.base_model or str(minilm_dir()),
        **{f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name != "base_model"},
    )
    path = train(config, args.out)
    print(f"saved {path}")


def cmd_eval(args: argparse.Namespace) -> None:
    engine = _engine(args)
    task = get_task(args.task or engine.manifest["task"]["name"])
    dev = load_split(task, args.split)
    logits = all_exit_logits(
        engine.model.cpu(), engine.tokenizer, dev.texts, dev.text_pairs, engine.max_length
    )
    engine.model.to(engine.device)
    per_exit = exit_metrics(logits, dev.labels, task.metric)
    result = engine.evaluate(dev, task.metric, batch_size=args.batch_size)
    report = {
        "task": task.name,
        "split": args.split,
        "examples": len(dev.texts),
        "per_exit": per_exit,
        "policy": {"name": engine.policy.name, **engine.policy.params()},
        **result,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{task.name} {args.split} ({len(dev.texts)} examples), metric: {task.metric}")
    print("| exit layer | " + " | ".join(str(i + 1) for i in range(len(per_exit))) + " |")
    print("|---|" + "---|" * len(per_exit))
    print(f"| {task.metric} | " + " | ".join(f"{m:.2f}" for m in per_exit) + " |")
    print(
        f"\npolicy {engine.policy!r}: {task.metric} {result['value']:.2f} "
        f"(full depth {per_exit[-1]:.2f}), average exit layer {result['avg_exit_layer']:.2f} "
        f"of {engine.num_layers}, speed-up {result['layer_saving']:.1%} of layers saved "
        f"({result['speedup']:.2f}x)"
    )


def cmd_info(args: argparse.Namespace) -> None:
    engine = Engine(args.ckpt or default_checkpoint())
    m = engine.manifest
    training = m.get("training") or {}
    print(f"checkpoint  {engine.path}")
    print(
        f"backbone    {m['backbone']}, {engine.num_layers} layers, "
        f"hidden {engine.model.config.hidden_size}"
    )
    print(f"task        {m['task']['name']} ({m['task']['type']}), labels {engine.label_names}")
    print(f"exit heads  {m['exit_heads']}")
    print(f"policy      {engine.policy!r}")
    print(f"backend     {engine.backend}" + ("" if HAS_C else f" ({LOAD_ERROR})"))
    print(f"executor    {engine.executor}")
    if training:
        metrics = ", ".join(f"{v:.2f}" for v in training.get("dev_exit_metrics", []))
        print(
            f"training    recipe {training.get('recipe')}, "
            f"dev {training.get('dev_metric')} per exit: {metrics}"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eeengine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("predict", help="predict with per-sample early exit")
    p.add_argument("texts", nargs="+", help="texts to classify")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_engine_args(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("train", help="fine-tune a multi-exit checkpoint")
    p.add_argument("--out", required=True, type=Path, help="checkpoint directory to write")
    p.add_argument("--base-model", help="Hugging Face BERT dir (default: all-MiniLM-L6-v2)")
    defaults = TrainConfig(base_model="")
    for f in fields(TrainConfig):
        if f.name == "base_model":
            continue
        default = getattr(defaults, f.name)
        kind = type(default) if default is not None else int
        p.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=default)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="dev metric per exit and of the exit policy")
    p.add_argument("--task", help="GLUE task (default: the checkpoint's)")
    p.add_argument("--split", default="dev")
    p.add_argument("--json", action="store_true")
    _add_engine_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("info", help="describe a checkpoint")
    p.add_argument("ckpt", nargs="?", help="checkpoint directory (default: the cached SST-2 model)")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError, CheckpointError) as e:
        print(f"eeengine: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
