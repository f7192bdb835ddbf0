"""A trained checkpoint's calibration slice, rebuilt from the training config it records.

The trainer selects the best step and calibrates the exit thresholds on rows held out of the
training data, or on the user's ``calib_file``
(:func:`eeengine.training.plan.split_calibration`), and stores its config in
``eeengine.json`` (``training.config``). The same function on the same config and data gives
the same rows in the same order, so ``eeengine calibrate`` (by default) and ``eeengine eval
--split calibration`` measure there again, never on the dev set that results are reported on.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from eeengine.checkpoint import MANIFEST
from eeengine.data import Split
from eeengine.training.config import TrainConfig
from eeengine.training.plan import load_dataset, split_calibration

CALIBRATION_SPLIT = "calibration"


def calibration_slice(manifest: dict, checkpoint: str | Path) -> tuple[Split, str]:
    """The rows the trainer calibrated ``checkpoint`` on, in the trainer's order, and where
    they come from (e.g. "100 training rows held out (stratified, seed 42)").

    Args:
        manifest: the checkpoint's ``eeengine.json``.
        checkpoint: its directory, for messages.

    Returns:
        The slice (labels as class indices, or values for regression) and its source.

    Raises:
        ValueError: the manifest records no training config or no calibration slice (a
            converted checkpoint, or one trained before slices were held out), or the data
            now gives a slice other than the one recorded (the training data changed); the
            message names what is missing and the other ways to calibrate.
        FileNotFoundError: the training data (GLUE files of ``data/``, ``train_file`` or
            ``calib_file``) is gone.
    """
    training = manifest.get("training") or {}
    stored, recorded = training.get("config"), training.get("calibration_data")
    where = Path(checkpoint) / MANIFEST
    if not stored or not recorded:
        missing = "training.config" if not stored else "training.calibration_data"
        raise ValueError(
            f"{where} has no field {missing!r} (a converted checkpoint, or one trained before "
            "calibration rows were held out), so its calibration split cannot be rebuilt; "
            "calibrate on other labelled data with --split dev or --dev-file FILE, or on "
            "in-domain texts with --unlabeled FILE"
        )
    known = {f.name for f in fields(TrainConfig)}
    # Fields of older or newer trainers that this one lacks do not choose the rows.
    config = TrainConfig(**{k: v for k, v in stored.items() if k in known})
    _, calib, source = split_calibration(config, load_dataset(config))
    if (source, len(calib.texts)) != (recorded["source"], recorded["examples"]):
        raise ValueError(
            f"the training data gives a calibration split of {len(calib.texts)} rows "
            f"({source}), but {where} records {recorded['examples']} ({recorded['source']}): "
            "the data changed since training; calibrate with --split dev, --dev-file FILE or "
            "--unlabeled FILE"
        )
    return calib, source
