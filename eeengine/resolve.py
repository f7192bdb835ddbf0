"""What an :class:`eeengine.Engine` runs, resolved once at load: its exit policy (given by the
caller, the checkpoint's default, or a calibrated :class:`eeengine.calibration.OperatingPoint`
that meets a target) and its MPEE token-pruning schedule."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import torch

from eeengine.calibration import OperatingPoint, select_operating_point
from eeengine.checkpoint import CALIBRATION, MANIFEST, CheckpointError
from eeengine.evaluation import policy_params
from eeengine.modeling_multiexit import MultiExitBert
from eeengine.policies import ExitPolicy, make_policy
from eeengine.selection import choose_operating_point
from eeengine.token_pruning import TokenPruning


def resolve_policy(
    model: MultiExitBert,
    manifest: dict,
    calibration: dict,
    path: Path,
    policy: str | None = None,
    target_speedup: float | None = None,
    max_drop: float | None = None,
    default_params: bool = True,
    confidence: float | None = None,
    **given: object,
) -> tuple[ExitPolicy, OperatingPoint | None]:
    """The policy to run and, when it came from a calibration target, its operating point.

    Without ``target_speedup`` / ``max_drop``: ``policy`` (default: the checkpoint's
    ``eeengine.json`` policy) with its stored parameters (the default policy's, or the fastest
    calibrated point of that policy within the ``max_drop`` the trainer chose the default by,
    at its ``max_drop_confidence``: 0.5 points as measured where the checkpoint records
    neither; where no point of that policy qualifies, its most conservative swept point, with
    a warning), overridden by the parameters in ``given`` that are not None. With a target:
    the point :func:`eeengine.calibration.select_operating_point` picks in ``calibration``.

    Args:
        model: the loaded model (labels, layers and signals the policy must fit).
        manifest: ``eeengine.json``.
        calibration: ``calibration.json`` ({} when there is none).
        path: the checkpoint directory, for messages.
        policy: a policy name, or None.
        target_speedup, max_drop, confidence: a calibration target (see
            :class:`eeengine.Engine`).
        default_params: False when the default policy's stored parameters do not fit
            ``calibration`` (they were calibrated at another precision): its parameters are
            then picked in ``calibration`` as for any other policy.
        **given: policy parameters (``threshold``, ``patience``, ``window`` ...).

    Raises:
        ValueError: unknown policy or bad parameters; a target together with parameters, a
            target without calibration, or a target no point meets.
    """
    given = {k: v for k, v in given.items() if v is not None}
    if target_speedup is None and max_drop is None:
        default = manifest["policy"]
        name = policy or default["name"]
        stored: dict = {}
        if name == default["name"] and default_params:
            stored = policy_params(default)
        elif calibration:
            stored = _calibrated_params(calibration, manifest, name, path, warn=not given)
        return validated_policy(make_policy(name, **{**stored, **given}), model), None
    if given:
        raise ValueError(
            "target_speedup / max_drop pick the policy's parameters from the calibration; "
            f"do not pass {', '.join(given)} too"
        )
    if not calibration:
        raise ValueError(
            f"{path} has no calibration ({CALIBRATION} missing or empty), so target_speedup / "
            "max_drop cannot be met; "
            "measure one with engine.calibrate(texts, labels, ...) or "
            "`eeengine calibrate --write`"
        )
    point = select_operating_point(calibration, target_speedup, max_drop, policy, confidence)
    return validated_policy(point.policy(), model), point


def _calibrated_params(
    calibration: dict, manifest: dict, name: str, path: Path, warn: bool
) -> dict:
    """The parameters of the fastest point of policy ``name`` in ``calibration`` within the
    target the trainer chose the default policy by (:func:`_trained_target`). Where none
    qualifies, the most conservative swept point of ``name`` (the most layers on average; ties
    to the higher metric), with a warning when ``warn``: an uncalibrated guess could lose
    far more than the target. {} where ``name`` was not swept (its built-in parameters)."""
    max_drop, confidence = _trained_target(manifest)
    chosen = choose_operating_point(calibration, max_drop, policy=name, confidence=confidence)
    if chosen is not None:
        return policy_params(chosen[1])
    points = calibration.get("policies", {}).get(name)
    if not points:
        return {}
    safest = max(points, key=lambda point: (point["avg_exit_layer"], point["metric"]))
    params = policy_params(safest)
    if warn:
        at = f" at {confidence:g} confidence" if confidence else ""
        shown = ", ".join(f"{k}={v}" for k, v in params.items())
        drop = calibration["full_depth"] - safest["metric"]
        warnings.warn(
            f"{path}: no calibrated point of {name!r} keeps within {max_drop:g} points of full "
            f"depth{at} on its {calibration['num_examples']} calibration examples, so it runs "
            f"its most conservative swept point ({shown}: drop {drop:.2f} at "
            f"{safest['avg_exit_layer']:.2f} layers there); calibrate on more in-domain text "
            "(eeengine calibrate --unlabeled FILE --write) to exit earlier safely",
            stacklevel=4,
        )
    return params


def _trained_target(manifest: dict) -> tuple[float, float | None]:
    """(max_drop, confidence) the trainer chose the default policy by (``training.config``:
    ``max_drop``, ``max_drop_confidence``); 0.5 points as measured for a checkpoint that does
    not record them."""
    config = manifest.get("training", {}).get("config", {})
    return config.get("max_drop", 0.5), config.get("max_drop_confidence")


def validated_policy(policy: ExitPolicy, model: MultiExitBert) -> ExitPolicy:
    """``policy``, checked against the model's labels, layers and signals.

    Raises:
        ValueError: the policy does not fit the model (e.g. ``lte`` without an LTE module).
    """
    policy.validate(model.num_labels, model.num_layers, signals=model.signals)
    return policy


def resolve_token_pruning(
    given: Literal["checkpoint"] | TokenPruning | dict | None,
    model: MultiExitBert,
    manifest: dict,
    path: Path,
) -> TokenPruning | None:
    """The MPEE schedule to run: the checkpoint's (``"checkpoint"``), none (None), or the given
    one (a :class:`TokenPruning` or its JSON form).

    Raises:
        CheckpointError: the checkpoint's schedule is invalid (file and field named).
        ValueError: a bad given schedule, or pruning on a backbone that cannot prune.
    """
    if given == "checkpoint":
        stored = manifest.get("token_pruning")
        try:
            schedule = None if stored is None else TokenPruning.from_json(stored, model.num_layers)
        except ValueError as error:
            raise CheckpointError(f"{path / MANIFEST}: {error}") from None
    elif isinstance(given, dict):
        schedule = TokenPruning.from_json(given, model.num_layers)
    else:
        schedule = given
    if schedule is not None and not model.backbone.supports_token_pruning:
        raise ValueError(f"token pruning is not supported by the {model.backbone_type} backbone")
    return schedule


def resolve_max_length(max_length: int | None, manifest: dict, model: MultiExitBert) -> int:
    """Tokens per input: ``max_length``, or the checkpoint's ``max_seq_length`` when None.

    Raises:
        ValueError: not in [3, the model's position embeddings].
    """
    resolved = max_length or manifest["max_seq_length"]
    limit = model.backbone.max_positions
    if not 2 < resolved <= limit:
        raise ValueError(f"max_length={resolved} must be in [3, {limit}]")
    return resolved


def resolve_device(device: str) -> torch.device:
    """A torch device the engine can run on.

    Raises:
        ValueError: an unknown device string, a device type other than CPU and CUDA, or a GPU
            that is not there.
    """
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use 'cpu' or 'cuda[:N]'") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} is not available: torch sees no CUDA GPU")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r} is not available: {torch.cuda.device_count()} GPU(s) present"
            )
    elif resolved.type != "cpu":
        raise ValueError(f"device {device!r} is not supported; use 'cpu' or 'cuda[:N]'")
    return resolved
