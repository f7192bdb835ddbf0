"""The options the ``eeengine`` commands share, and how they become :class:`eeengine.Engine`
and :class:`eeengine.training.TrainConfig` arguments (:mod:`eeengine.cli` builds the parser;
``eeengine serve`` and the benchmarks reuse these)."""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from dataclasses import fields
from typing import Any

import docstring_parser

from eeengine._custom_ops import BACKENDS
from eeengine.defaults import default_checkpoint
from eeengine.engine import Engine
from eeengine.executors import EXECUTORS, PRECISIONS
from eeengine.heads import LAYOUTS, POOLINGS
from eeengine.token_pruning import DEFAULT_TOKEN_PRUNING
from eeengine.training import TrainConfig
from eeengine.training.calibration_slice import CALIBRATION_SPLIT
from eeengine.training.contrastive import EXITS
from eeengine.training.recipes import BASE_RECIPES, RECIPES


def add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    """:func:`add_model_args` and ``--batch-size``."""
    add_model_args(parser)
    parser.add_argument(
        "--batch-size", type=int, default=32, help="most inputs per forward pass (default 32)"
    )


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Which checkpoint runs, and how: ``--ckpt``, ``--device``, ``--backend``, ``--executor``,
    ``--precision``, ``--split-cost``, ``--eager``, ``--token-pruning``; read back by
    :func:`engine_settings` (with the policy options of :func:`add_policy_args`)."""
    parser.add_argument("--ckpt", help="checkpoint directory (default: the cached SST-2 model)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument(
        "--backend", choices=BACKENDS, help="default: the fastest fused op of the device"
    )
    parser.add_argument(
        "--executor", choices=EXECUTORS, help="default: onnxruntime if installed, else torch"
    )
    add_precision_arg(parser)
    parser.add_argument(
        "--split-cost",
        type=float,
        metavar="TOKENS",
        help="padded tokens one more forward pass is worth: inputs that would run together are "
        "cut into calls of similar lengths where that saves more (default: the executor's, "
        "measured: onnxruntime 64, torch on CPU 256 (fp32) or 1024 (bf16), GPU never); inf "
        "never cuts",
    )
    parser.add_argument(
        "--eager",
        action="store_true",
        help="on a CUDA device, run the sync-free loop eagerly instead of replaying CUDA graphs",
    )
    parser.add_argument(
        "--token-pruning",
        type=token_pruning_arg,
        default="checkpoint",
        metavar="SCHEDULE",
        help="MPEE token pruning: 'checkpoint' (its trained schedule, the default), 'none', "
        f"'mpee' ({json.dumps(DEFAULT_TOKEN_PRUNING)}) or a JSON schedule like it. The "
        "checkpoint's thresholds were calibrated with its own schedule: with another, pass the "
        "point `eeengine calibrate --token-pruning ...` prints (--policy, --threshold, --param)",
    )


def token_pruning_arg(text: str) -> str | dict | None:
    """``--token-pruning``: "checkpoint", None for "none", the MPEE default schedule for
    "mpee", or the JSON object given (checked when the engine loads, against its depth).

    Raises:
        argparse.ArgumentTypeError: anything else (argparse names the option).
    """
    named = {"checkpoint": "checkpoint", "none": None, "mpee": DEFAULT_TOKEN_PRUNING}
    if text in named:
        return named[text]
    try:
        schedule = json.loads(text)
    except json.JSONDecodeError:
        schedule = None
    if not isinstance(schedule, dict):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not 'checkpoint', 'none', 'mpee' or a JSON object like "
            f"{json.dumps(DEFAULT_TOKEN_PRUNING)}"
        )
    return schedule


def add_precision_arg(parser: argparse.ArgumentParser) -> None:
    """``--precision`` of the encoder layers (:mod:`eeengine.precision`), default fp32."""
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="encoder layers on CPU: fp32, int8 or int8_static (onnxruntime executor; int8_static: "
        "fixed activation scales, results independent of the batch) or bf16 (torch executor)",
    )


def add_data_args(parser: argparse.ArgumentParser, default_split: str) -> None:
    """The labelled data of ``eval`` and ``calibrate``, read by
    :func:`eeengine.cli_data.eval_data` (``--split`` left None stands for ``default_split``, or
    for ``dev`` with ``--dev-file``)."""
    parser.add_argument("--task", help="GLUE task (default: the checkpoint's)")
    parser.add_argument(
        "--split",
        help=f"'{CALIBRATION_SPLIT}': the rows the trainer held out of the training data (or "
        "its --calib-file) to pick the best step and the thresholds, rebuilt from the training "
        "config in eeengine.json; 'dev' (for a checkpoint trained with --train-file: its dev "
        "file) or another split of data/TASK/ (default: "
        f"{default_split}, or dev with --dev-file)",
    )
    parser.add_argument(
        "--dev-file",
        help="a CSV/TSV/JSONL file for a checkpoint trained with --train-file (default with "
        "--split dev: its own dev file)",
    )


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_args(parser)
    add_policy_args(parser)


def add_policy_args(parser: argparse.ArgumentParser) -> None:
    """``--policy``, ``--threshold``, ``--patience`` and repeated ``--param NAME=VALUE``; read
    them back with :func:`policy_kwargs`."""
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


def make_engine(args: argparse.Namespace) -> Engine:
    return Engine(**engine_settings(args))


def engine_settings(args: argparse.Namespace) -> dict:
    """:class:`Engine`'s keyword arguments from the options of :func:`add_model_args` and
    :func:`add_policy_args`."""
    return {
        "checkpoint": str(args.ckpt or default_checkpoint()),
        "device": args.device,
        "backend": args.backend,
        "executor": args.executor,
        "graph": not args.eager,
        "precision": args.precision,
        "split_cost": args.split_cost,
        "token_pruning": args.token_pruning,
        **policy_kwargs(args),
    }


def policy_kwargs(args: argparse.Namespace) -> dict:
    """The :class:`Engine` policy arguments of :func:`add_policy_args`' options.

    Raises:
        ValueError: a ``--param`` that is not NAME=VALUE.
    """
    return {
        "policy": args.policy,
        "threshold": args.threshold,
        "patience": args.patience,
        **dict(_parse_param(p) for p in args.param),
    }


def _parse_param(text: str) -> tuple[str, object]:
    """``name=value`` with value parsed as JSON when it is JSON (numbers, lists), else a string."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise ValueError(f"--param {text!r}: expected NAME=VALUE")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


# TrainConfig field annotation -> argparse type (booleans are flags).
# dict: a JSON object, e.g. --token-pruning '{"layers": [2, 4], "keep_ratio": 0.7, ...}'.
_ARG_TYPES = {"str": str, "int": int, "float": float, "dict": json.loads}
# TrainConfig fields with a fixed set of values.
_CHOICES = {
    "recipe": RECIPES,
    "lte_base": tuple(BASE_RECIPES),
    "layout": LAYOUTS,
    "pooling": POOLINGS,
    "contrastive_exits": EXITS,
}


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """One option per :class:`TrainConfig` field but ``base_model``: ``--epochs 2``,
    ``--text-column sentence``; a boolean is ``--regression`` / ``--no-resume`` (an optional
    one, ``bool | None``, stays None, automatic, unless given); an optional value takes
    ``none`` for None (``--max-drop-confidence none``). Each option's help is its
    field's entry in :class:`TrainConfig`'s docstring (:func:`config_help`)."""
    defaults = TrainConfig(base_model="")
    helps = config_help()
    for f in fields(TrainConfig):
        if f.name == "base_model":
            continue
        flag = f"--{f.name.replace('_', '-')}"
        default = getattr(defaults, f.name)
        text = f"{helps[f.name]} (default: %(default)s)"
        if f.type in ("bool", "bool | None"):
            action = argparse.BooleanOptionalAction
            parser.add_argument(flag, action=action, default=default, help=text)
        else:
            kind = _ARG_TYPES[f.type.split(" | ")[0]]
            if f.type.endswith(" | None"):
                kind = _or_none(kind)
            choices = _CHOICES.get(f.name)
            parser.add_argument(flag, type=kind, default=default, choices=choices, help=text)


def _or_none(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """``kind``, or None for the word "none" (``--max-drop-confidence none``: as measured)."""

    def parse(value: str) -> Any:
        return None if value.lower() == "none" else kind(value)

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def config_help() -> dict[str, str]:
    """Every :class:`TrainConfig` field -> its entry of the class docstring's Attributes (an
    entry may name several fields), on one line, without reST markup, ``%`` escaped for
    argparse."""
    helps = {}
    for entry in docstring_parser.parse(TrainConfig.__doc__ or "").params:
        text = re.sub(r":\w+:`~?([^`]+)`", r"\1", " ".join(entry.description.split()))
        for name in entry.arg_name.split(","):
            helps[name.strip()] = text.replace("``", "").replace("%", "%%")
    return helps
