"""Numeric precision of the encoder layers, and one calibration per precision.

``Engine(ckpt, precision=...)`` runs the encoder layers in "fp32", "bf16", "int8" or
"int8_static" (see :mod:`eeengine.executors` for which executor runs which). Quantization
moves the logits, so the thresholds calibrated on fp32 logits do not carry over exactly: each
precision keeps its own sweep in the checkpoint, ``calibration.json`` for fp32 (written by the
trainer) and ``calibration-<precision>.json`` for the others (``calibration-int8.json`` by the
trainer where the int8 layers can run, on the same calibration slice as fp32; any of them by
``eeengine calibrate --precision P --write``, which for "int8_static" first measures the
activation statistics it needs). At a precision other than fp32 the default policy is the
checkpoint's default policy with the parameters of its fastest point within 0.5 points of full
depth in that precision's sweep.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from eeengine.checkpoint import CALIBRATION, read_sweep, write_json_atomic
from eeengine.executors import PRECISIONS


def check_precision(precision: str, device_type: str) -> str:
    """``precision`` if it names one and can run on ``device_type``.

    Raises:
        ValueError: an unknown precision, or bf16 / int8 off the CPU (the GPU loop runs the
            torch layers as they are).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; available: {', '.join(PRECISIONS)}")
    if precision != "fp32" and device_type != "cpu":
        raise ValueError(f"precision {precision!r} runs on CPU, not on {device_type}")
    return precision


def calibration_file(precision: str) -> str:
    """The checkpoint file holding the sweep of ``precision``: ``calibration.json`` (fp32) or
    ``calibration-<precision>.json``."""
    return CALIBRATION if precision == "fp32" else f"calibration-{precision}.json"


def read_calibration(checkpoint: str | Path, precision: str) -> dict:
    """The sweep of ``precision`` stored in ``checkpoint`` ({} with a warning when there is
    none: the fp32 thresholds then stand in).

    Raises:
        eeengine.checkpoint.CheckpointError: the file is not a JSON object, or a field is
            missing or wrong (:func:`eeengine.checkpoint_checks.check_calibration`; file and
            field named).
    """
    path = Path(checkpoint) / calibration_file(precision)
    if not path.exists():
        warnings.warn(
            f"{path} not found: using the fp32 policy parameters at {precision}; measure them "
            f"with `eeengine calibrate --precision {precision} --write`",
            stacklevel=3,
        )
        return {}
    return read_sweep(path)


def write_calibration(checkpoint: str | Path, precision: str, calibration: dict) -> Path:
    """Replace the sweep of ``precision`` in ``checkpoint`` atomically; returns the file."""
    path = Path(checkpoint) / calibration_file(precision)
    write_json_atomic(path, calibration)
    return path
