"""The calibrations the trainer writes besides fp32's: the sweep of every exit policy on the
calibration slice with int8 layers (``calibration-int8.json``) and with static int8 layers
(``calibration-int8_static.json`` and its activation statistics), so that
``Engine(ckpt, precision=...)`` picks thresholds measured at its own precision
(:mod:`eeengine.precision`)."""

from __future__ import annotations

from collections.abc import Callable

from transformers import PreTrainedTokenizerBase

from eeengine.calibration import TradeOff
from eeengine.data import Split
from eeengine.executors import make_executor, precision_unavailable
from eeengine.modeling_multiexit import MultiExitBert
from eeengine.precision import calibration_file
from eeengine.token_pruning import TokenPruning


def int8_static_calibration(
    model: MultiExitBert,
    tokenizer: PreTrainedTokenizerBase,
    calib: Split,
    max_length: int,
    sweep_slice: Callable[..., TradeOff],
    token_pruning: TokenPruning | None,
    progress: bool,
    fp32_full_depth: float,
) -> tuple[dict | None, dict[str, bytes], dict]:
    """:func:`int8_calibration` for "int8_static" (:mod:`eeengine.executors.int8_static`): its
    activation statistics, measured on the first rows of the calibration slice, then its sweep
    there (``calibration-int8_static.json``); returns the sweep, the statistics' file (name ->
    content) and the manifest's record, or (None, {}, the reason) where it cannot run (no
    onnxruntime, a backbone other than BERT with exact GELU). Its token-pruning layers prune at
    int8_static too."""
    model.cpu().eval()
    reason = precision_unavailable("int8_static", model)
    if reason is not None:
        return None, {}, {"written": False, "reason": reason}
    from eeengine.executors.int8_static import (  # imports onnx
        ACTIVATIONS_FILE,
        activations_bytes,
        calibration_absmax,
    )

    stats = calibration_absmax(model, tokenizer, calib, max_length)
    executor = make_executor(None, model, "int8_static", token_pruning, activations=stats)
    sweep = {**sweep_slice(progress=progress, executor=executor).sweep}
    sweep["reference_full_depth"] = fp32_full_depth
    record = {"written": True, "file": calibration_file("int8_static")}
    files = {ACTIVATIONS_FILE: activations_bytes(stats)}
    return sweep, files, {**record, "full_depth": sweep["full_depth"]}


def int8_calibration(
    model: MultiExitBert,
    sweep_slice: Callable[..., TradeOff],
    token_pruning: TokenPruning | None,
    progress: bool,
    fp32_full_depth: float,
) -> tuple[dict | None, dict]:
    """The sweep of every policy on the calibration slice with int8 layers (the content of
    ``calibration-int8.json``, :mod:`eeengine.precision`), measured by ``sweep_slice`` (fp32's
    :func:`eeengine.calibration.measure_trade_off` on the slice) with an int8 executor (its
    token-pruning layers pruned at int8 too), and the manifest's record of it; (None, the
    reason) where int8 cannot run here (no onnxruntime, a backbone other than BERT with exact
    GELU). int8 runs on CPU: the model moves there (it is saved from there) and stays in eval
    mode.

    The sweep records ``fp32_full_depth`` (the fp32 model's full depth on the same slice) as
    its ``reference_full_depth``: int8 operating points are picked within ``max_drop`` of the
    model as trained (:func:`eeengine.selection.reference_full_depth`)."""
    model.cpu().eval()
    reason = precision_unavailable("int8", model)
    if reason is not None:
        return None, {"written": False, "reason": reason}
    executor = make_executor(None, model, "int8", token_pruning)
    sweep = {**sweep_slice(progress=progress, executor=executor).sweep}
    sweep["reference_full_depth"] = fp32_full_depth
    record = {"written": True, "file": calibration_file("int8")}
    return sweep, {**record, "full_depth": sweep["full_depth"]}
