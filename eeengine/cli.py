"""The ``eeengine`` command: train, predict, eval, calibrate, info, score, serve."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, fields
from pathlib import Path

from eeengine._custom_ops import HAS_C, LOAD_ERROR
from eeengine.checkpoint import CheckpointError, update_checkpoint
from eeengine.cli_args import (
    add_checkpoint_args,
    add_config_args,
    add_data_args,
    add_engine_args,
    add_precision_arg,
    engine_settings,
    make_engine,
)
from eeengine.cli_data import eval_data
from eeengine.data import Split, get_task, unlabeled_file
from eeengine.defaults import default_checkpoint, minilm_dir
from eeengine.engine import Engine
from eeengine.evaluation import evaluate
from eeengine.precision import write_calibration
from eeengine.report import markdown, per_exit_metrics, sweep_report, write_report
from eeengine.selection import reference_full_depth
from eeengine.training import TrainConfig, train
from eeengine.training.calibration_slice import CALIBRATION_SPLIT


def cmd_predict(args: argparse.Namespace) -> None:
    engine = make_engine(args)
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
    engine = make_engine(args)
    name, split_name, metric, extra_metrics, dev = eval_data(args, engine, "dev")
    if args.sweep:
        report = sweep_report(engine, name, split_name, dev, metric, extra_metrics, progress=True)
        paths = write_report(report, args.out or f"sweep-{name}")
        print(markdown(report))
        print("wrote " + ", ".join(str(path) for path in paths))
        return
    per_exit = per_exit_metrics(engine, dev, metric)
    result = evaluate(engine, dev, metric, batch_size=args.batch_size)
    report = {
        "task": name,
        "split": split_name,
        "examples": len(dev.texts),
        "per_exit": per_exit,
        "policy": {"name": engine.policy.name, **engine.policy.params()},
        **result,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{name} {split_name} ({len(dev.texts)} examples), metric: {metric}")
    print("| exit layer | " + " | ".join(str(i + 1) for i in range(len(per_exit))) + " |")
    print("|---|" + "---|" * len(per_exit))
    print(f"| {metric} | " + " | ".join(f"{m:.2f}" for m in per_exit) + " |")
    print(
        f"\npolicy {engine.policy!r}: {metric} {result['value']:.2f} "
        f"(full depth {per_exit[-1]:.2f}), average exit layer {result['avg_exit_layer']:.2f} "
        f"of {engine.num_layers}, speed-up {result['layer_saving']:.1%} of layers saved "
        f"({result['speedup']:.2f}x); FLOPs ratio {result['flops_ratio']:.3f} "
        f"({result['flops_speedup']:.2f}x, MPEE's acceleration)"
    )


def calibration_inputs(args: argparse.Namespace, engine: Engine) -> tuple[str, str, Split]:
    """What ``eeengine calibrate`` calibrates on: (data name, split name, split), the split's
    labels None for ``--unlabeled``."""
    if args.unlabeled:
        if args.task or args.dev_file or args.split:
            raise ValueError(
                "--unlabeled calibrates on its own texts: drop --task / --split / --dev-file"
            )
        if not args.text_column:
            raise ValueError("--unlabeled needs --text-column")
        data = unlabeled_file(args.unlabeled, args.text_column, args.text_pair_column)
        return "unlabeled", Path(args.unlabeled).name, data
    if args.agreement is not None:
        raise ValueError("--agreement is the target of --unlabeled calibration")
    trained_on = engine.manifest["task"]["name"]
    if args.task is not None and get_task(args.task).name != trained_on:
        raise ValueError(f"the checkpoint was trained on {trained_on}, not {args.task}")
    name, split_name, _, _, data = eval_data(args, engine, CALIBRATION_SPLIT)
    return name, split_name, data


def measure_int8_activations(engine: Engine, split_name: str, data: Split) -> None:
    """``calibrate --precision int8_static --write``: the activation statistics its scales come
    from, on the first rows of ``data`` with ``engine``'s fp32 torch layers, written to the
    checkpoint before the int8_static engine is built from them."""
    from eeengine.executors.int8_static import (  # imports onnx
        CALIBRATION_ROWS,
        calibration_absmax,
        write_activations,
    )

    stats = calibration_absmax(engine.model, engine.tokenizer, data, engine.max_length)
    path = write_activations(engine.path, stats)
    rows = min(len(data.texts), CALIBRATION_ROWS)
    print(f"wrote {path} (activations of {rows} rows of {split_name})")


def cmd_calibrate(args: argparse.Namespace) -> None:
    checkpoint = args.ckpt or default_checkpoint()
    if args.write and args.token_pruning != "checkpoint":
        raise ValueError(
            "--write stores thresholds for the checkpoint as trained, with its own token "
            "pruning; without --write, --token-pruning measures another schedule: pass the "
            "point it prints to predict, eval, score or serve (--policy, --threshold, --param)"
        )
    inputs = None
    if args.precision == "int8_static" and args.write:
        fp32 = Engine(checkpoint, policy="none", executor="torch")
        inputs = calibration_inputs(args, fp32)
        measure_int8_activations(fp32, *inputs[1:])
        del fp32
    engine = Engine(
        checkpoint,
        device=args.device,
        backend=args.backend,
        executor=args.executor,
        graph=not args.eager,
        precision=args.precision,
        split_cost=args.split_cost,
        token_pruning=args.token_pruning,
    )
    name, split_name, data = inputs or calibration_inputs(args, engine)
    labels = None if args.unlabeled else data.labels
    point = engine.calibrate(
        data.texts,
        labels,
        data.text_pairs,
        target_speedup=args.target_speedup,
        max_drop=args.max_drop,
        agreement=args.agreement,
        policy=args.policy,
        batch_size=args.batch_size,
        progress=True,
        confidence=args.confidence,
    )
    reference = reference_full_depth(engine.calibration)
    spread = "" if point.drop_std is None else f" ± {point.drop_std:.2f} (bootstrap sd)"
    print(
        f"{name} {split_name} ({len(data.texts)} examples, {engine.calibration['metric']}): "
        f"{point.describe()}; full depth {reference:.2f}, drop {reference - point.metric:.2f}"
        f"{spread}; layer speed-up {point.speedup:.2f}x ({point.layer_saving:.1%} of layers "
        "saved)"
    )
    if args.write and engine.precision != "fp32":
        # The default policy stays fp32's; this precision re-picks its parameters here.
        print(f"wrote {write_calibration(engine.path, engine.precision, engine.calibration)}")
    elif args.write:
        update_checkpoint(engine.path, point.to_json(), engine.calibration)
        print(f"wrote the default policy and calibration.json of {engine.path}")


def cmd_score(args: argparse.Namespace) -> None:
    from eeengine.scoring import DEFAULT_CHUNK_ROWS, ScoreJob, score_file  # imports pyarrow

    job = ScoreJob(
        args.input,
        args.output,
        args.text_column,
        args.text_pair_column,
        args.id_column,
        DEFAULT_CHUNK_ROWS if args.chunk_rows is None else args.chunk_rows,
    )
    options = {"batch_size": args.batch_size, "overwrite": args.overwrite}
    if args.ray:
        from eeengine.ray_scoring import score_file_ray

        summary = score_file_ray(
            job, engine_settings(args), actors=args.actors, address=args.address, **options
        )
    else:
        summary = score_file(job, engine_settings(args), **options)
    resumed = f" ({summary.resumed_rows} written before the run was interrupted)"
    layers = f"; average exit layer {summary.avg_exit_layer:.2f}" if summary.avg_exit_layer else ""
    print(
        f"wrote {summary.rows} rows to {job.output}{resumed if summary.resumed_rows else ''} "
        f"in {summary.seconds:.1f} s{layers}"
    )


def cmd_info(args: argparse.Namespace) -> None:
    engine = Engine(args.ckpt or default_checkpoint(), precision=args.precision)
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
    pruning = engine.token_pruning
    print(f"tokens      {json.dumps(pruning.to_json()) if pruning else 'no token pruning'}")
    print(f"backend     {engine.backend}" + ("" if HAS_C else f" ({LOAD_ERROR})"))
    print(f"executor    {engine.executor}, precision {engine.precision}")
    print(f"loop        {engine.loop}")
    if training:
        metrics = ", ".join(f"{v:.2f}" for v in training.get("dev_exit_metrics", []))
        steps = f"{training['steps']} steps, " if "steps" in training else ""
        budget = (training.get("schedule") or {}).get("time_budget")
        if budget and budget["steps"] < budget["planned_steps"]:
            steps = (
                f"{budget['steps']} of {budget['planned_steps']} planned steps (the "
                f"{budget['max_train_seconds']:g} s time budget), "
            )
        print(
            f"training    recipe {training.get('recipe')}, {steps}"
            f"dev {training.get('dev_metric')} per exit: {metrics}"
        )
    reports = training.get("default_policy")
    if reports:
        calib, dev = reports["calibration"], reports["dev"]
        source = training["calibration_data"]["source"]
        print(
            f"calibrated  on {source}: default policy promised a drop of {calib['drop']:.2f} "
            f"at {calib['avg_exit_layer']:.2f} layers; measured on dev {dev['drop']:.2f} at "
            f"{dev['avg_exit_layer']:.2f} layers"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eeengine",
        description="Early-exit inference for multi-exit BERT-class classifiers. Commands given no "
        "checkpoint use the default SST-2 one (trained and cached on first use).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("predict", help="predict with per-sample early exit")
    p.add_argument("texts", nargs="+", help="texts to classify")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_engine_args(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "train",
        help="fine-tune a multi-exit checkpoint",
        description="Fine-tune on a GLUE task (--task) or on your own CSV/TSV/JSONL files "
        "(--train-file, --dev-file, --text-column, [--text-pair-column], --label-column, "
        "[--regression]). Rerunning an interrupted run with the same arguments resumes it.",
    )
    p.add_argument("--out", required=True, type=Path, help="checkpoint directory to write")
    p.add_argument(
        "--base-model", help="Hugging Face BERT/RoBERTa/ALBERT dir (default: all-MiniLM-L6-v2)"
    )
    add_config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="dev metric per exit and of the exit policy")
    add_data_args(p, "dev")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--sweep",
        action="store_true",
        help="sweep every policy the checkpoint supports; write PREFIX.json, .md and .png",
    )
    p.add_argument("--out", help="file prefix of --sweep's report (default: sweep-TASK)")
    add_engine_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "calibrate",
        help="measure every policy on a labelled split (or unlabeled in-domain texts) and pick "
        "an operating point",
        description="Measure every exit policy's trade-off and pick the point that meets the "
        "target. By default on the checkpoint's calibration split: the rows its training run "
        "held out of the training data (or its --calib-file), rebuilt from the training config "
        "in eeengine.json, never the dev set results are reported on. A checkpoint without "
        "that config (converted) needs --split dev, --dev-file FILE or --unlabeled FILE.",
    )
    add_data_args(p, CALIBRATION_SPLIT)
    p.add_argument("--policy", help="pick among this policy's points only (default: any)")
    target = p.add_mutually_exclusive_group()
    target.add_argument(
        "--target-speedup",
        type=float,
        help="the most accurate point with L / average exit layer >= this",
    )
    target.add_argument(
        "--max-drop", type=float, help="the fastest point within this many metric points"
    )
    target.add_argument(
        "--agreement",
        type=float,
        help="with --unlabeled: the fastest point whose predictions agree with full depth on "
        "at least this fraction of the texts (default 0.99)",
    )
    p.add_argument(
        "--confidence",
        type=float,
        help="with --max-drop or --agreement: keep the drop within it at this confidence, "
        "in (0, 1), from the drop's bootstrap spread on the calibration texts (e.g. 0.9); "
        "default: the drop as measured",
    )
    p.add_argument(
        "--unlabeled",
        help="calibrate without labels on the texts of this CSV/TSV/JSONL file (in-domain "
        "traffic): agreement with full depth",
    )
    p.add_argument("--text-column", help="text column of --unlabeled")
    p.add_argument("--text-pair-column", help="second-segment column of --unlabeled")
    p.add_argument(
        "--write",
        action="store_true",
        help="fp32: store the point as the checkpoint's default policy and refresh "
        "calibration.json; other precisions: write calibration-<precision>.json",
    )
    add_checkpoint_args(p)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser(
        "score",
        help="score a CSV/TSV/JSONL/Parquet file, streaming, resumable",
        description="Predict every row of a file and write row, [id], label, score and "
        "exit_layer (regression: value) in input order, in the format of the output's suffix. "
        "Memory stays bounded; rerunning an interrupted run resumes it.",
    )
    p.add_argument("--input", required=True, type=Path, help=".csv, .tsv, .jsonl or .parquet")
    p.add_argument("--output", required=True, type=Path, help=".csv, .tsv, .jsonl or .parquet")
    p.add_argument("--text-column", required=True, help="the input column to classify")
    p.add_argument("--text-pair-column", help="second segment of sentence-pair inputs")
    p.add_argument("--id-column", help="an input column to copy to the output")
    p.add_argument(
        "--chunk-rows",
        type=int,
        help="rows read, scored and written at a time, one part file each (bounds memory and "
        "the work an interruption can lose; default 4096)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--ray", action="store_true", help="run on Ray Data (needs eeengine[ray])")
    p.add_argument("--address", help="Ray cluster address (default: start Ray locally)")
    p.add_argument("--actors", type=int, default=2, help="Ray actors, one Engine each (default 2)")
    add_engine_args(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("info", help="describe a checkpoint")
    p.add_argument("ckpt", nargs="?", help="checkpoint directory (default: the cached SST-2 model)")
    add_precision_arg(p)
    p.set_defaults(func=cmd_info)

    from eeengine.serve.cli import add_serve_parser  # imports the serving stack

    add_serve_parser(sub)
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
