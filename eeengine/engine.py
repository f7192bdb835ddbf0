"""``Engine``: load a multi-exit checkpoint and predict with per-sample early exit."""

from __future__ import annotations

import numbers
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from eeengine._custom_ops import resolve_backend
from eeengine.batching import collate, encode, length_sorted_batches
from eeengine.checkpoint import CALIBRATION, MANIFEST, CheckpointError, load_checkpoint
from eeengine.data import TASKS, Split
from eeengine.evaluation import (
    all_exit_outputs,
    check_target,
    choose_operating_point,
    flops_tables,
    policy_params,
    select_operating_point,
    sweep,
)
from eeengine.executors import make_executor
from eeengine.flops import FlopCounter
from eeengine.inputs import Example, normalize_inputs
from eeengine.metrics import METRICS
from eeengine.policies import ExitPolicy, make_policy
from eeengine.precision import check_precision, read_calibration
from eeengine.runtime import DeviceLoop, ExitLoop, ExitOutput
from eeengine.token_pruning import TokenPruning

# Inputs tokenized and bucketed at a time: bounds memory for any number of texts.
_CHUNK_BATCHES = 64


@dataclass
class Prediction:
    """The engine's answer for one input.

    Attributes:
        label: predicted label name (classification), else None.
        score: probability of the predicted label (classification), else None.
        probs: softmax probabilities per label name (classification), else None.
        value: predicted value (regression), else None.
        exit_layer: 1-based layer whose exit head produced the answer.
        num_layers: depth of the model (exit_layer == num_layers means full depth).
        logits: raw logits of the exit taken, float32 values.
        tokens_kept: real tokens left after each layer the input ran (length ``exit_layer``)
            under token-wise exit; None without token pruning.
        flops: FLOPs the engine executed for this input (see :mod:`eeengine.flops`).
        full_flops: FLOPs of the full model (every layer, no pruning, one head) on this input;
            MPEE's ρ = Σ flops / Σ full_flops over a data set.
    """

    label: str | None
    score: float | None
    probs: dict[str, float] | None
    value: float | None
    exit_layer: int
    num_layers: int
    logits: list[float] = field(repr=False)
    tokens_kept: list[int] | None = None
    flops: int | None = None
    full_flops: int | None = None


class Engine:
    """Serve a multi-exit checkpoint with per-sample early exit.

    Args:
        checkpoint: path of a checkpoint directory (see :mod:`eeengine.checkpoint`).
        policy: exit policy name (see :data:`eeengine.policies.POLICIES`);
            None uses the checkpoint's default, chosen at training time on the dev set.
        threshold: the policy's threshold (entropy in nats for ``entropy``; normalized entropy
            in [0, 1] for ``normalized_entropy`` and ``pcee``), or one per layer. None: the
            checkpoint's value for that policy (its default policy, or else the fastest
            calibrated point within 0.5 points of full depth).
        patience: consecutive confident (``pcee``) or agreeing (``patience``) layers.
        target_speedup: pick the policy and its parameters from the checkpoint's
            ``calibration.json``: the most accurate calibrated point whose layer speed-up
            L / average exit layer is at least this (2.0 = half the layers on average, a saving
            1 - avg / L of 50 %). Restricted to ``policy`` when it is given, else any
            calibrated policy.
        max_drop: like ``target_speedup``, but the fastest calibrated point within this many
            metric points (e.g. accuracy percentage points) of full depth.
        device: a torch device string ("cpu", "cuda", "cuda:1").
        max_length: tokens per input (default: the checkpoint's ``max_seq_length``); longer
            inputs are truncated with a warning.
        backend: how the exit head + policy step runs: a fused op ("cpp" on CPU; "triton",
            or "cuda" where the extension has CUDA kernels, on a GPU), "reference" (plain
            torch), or None for the device's first fused op that implements the policy, else
            "reference" with one warning saying why.
            Token pruning uses the fused C++ op with "cpp", else its plain-torch reference.
        token_pruning: MPEE token-wise exit: "checkpoint" for the schedule in
            ``eeengine.json``, None for none, or a schedule (a :class:`TokenPruning` or its
            JSON form ``{"layers": [...], "keep_ratio": r, "beta": [...]}``).
        executor: what runs the encoder layers (see :mod:`eeengine.executors`): "torch" (the
            reference), "onnxruntime" (one ONNX Runtime session per layer, CPU, BERT backbones,
            needs ``eeengine[onnx]``), or None for "onnxruntime" where it can run, else "torch".
            With "onnxruntime" the torch copy of the layers it runs is dropped (one copy of the
            weights in memory).
        precision: the encoder layers' precision on CPU (see :mod:`eeengine.precision`):
            "fp32"; "int8" (per-channel int8 linear weights, onnxruntime executor); "bf16"
            (torch executor). Exit heads stay fp32. The policy's parameters come from that
            precision's calibration (``calibration-int8.json``) when the checkpoint has one.
        graph: on a CUDA device, run each batch as one CUDA graph replay (no host sync per
            layer; :mod:`eeengine.cuda_graph`); False runs the same sync-free loop eagerly.
            Ignored on CPU (see :class:`eeengine.runtime.DeviceLoop`).
        **policy_kwargs: other parameters of the policy, e.g. ``layer`` for ``budget``,
            ``window`` / ``window_test`` / ``window_range`` for ``elbert``, ``memory_weight``
            for ``mpee`` (see :mod:`eeengine.policies`).

    Attributes:
        calibration: the sweep operating points are picked from: ``calibration.json``, or the
            last :meth:`calibrate` measurement ({} when there is neither).
        operating_point: the calibrated point the policy was picked from (``{"name", policy
            parameters, "metric", "avg_exit_layer", "speedup", ...}``), or None when the policy
            was given or is the checkpoint's default.

    Raises:
        FileNotFoundError, eeengine.checkpoint.CheckpointError: bad checkpoint (file and field
            named).
        ValueError: unknown policy, threshold out of range, unknown or unavailable device,
            unknown backend or a fused backend where it cannot run, a bad token-pruning schedule
            or one on a backbone that cannot prune (ALBERT with inner_group_num > 1), unknown
            executor or "onnxruntime" where it cannot run, an unknown precision or one the
            executor does not run or off the CPU; with ``target_speedup`` or
            ``max_drop``: no calibration, policy parameters given as well, or no calibrated
            point meets the target (the best reachable is named).
    """

    def __init__(
        self,
        checkpoint: str | Path,
        policy: str | None = None,
        threshold: float | Sequence[float] | None = None,
        patience: int | None = None,
        target_speedup: float | None = None,
        max_drop: float | None = None,
        device: str = "cpu",
        max_length: int | None = None,
        backend: str | None = None,
        token_pruning: Literal["checkpoint"] | TokenPruning | dict | None = "checkpoint",
        executor: str | None = None,
        graph: bool = True,
        precision: str = "fp32",
        **policy_kwargs: object,
    ) -> None:
        self.device = _resolve_device(device)
        self.precision = check_precision(precision, self.device.type)
        ckpt = load_checkpoint(checkpoint)
        self.path = Path(checkpoint)
        self.manifest = ckpt.manifest
        self.calibration = (
            ckpt.calibration if precision == "fp32" else read_calibration(self.path, precision)
        )
        self.tokenizer = ckpt.tokenizer
        self.label_names = ckpt.label_names
        self.model = ckpt.model.to(self.device)
        self.max_length = max_length or ckpt.manifest["max_seq_length"]
        limit = self.model.backbone.max_positions
        if not 2 < self.max_length <= limit:
            raise ValueError(f"max_length={self.max_length} must be in [3, {limit}]")
        given = {"threshold": threshold, "patience": patience, **policy_kwargs}
        self.operating_point: dict | None = None
        if target_speedup is None and max_drop is None:
            self.policy = self._make_policy(policy, given)
        else:
            if any(v is not None for v in given.values()):
                raise ValueError(
                    "target_speedup / max_drop pick the policy's parameters from the calibration; "
                    f"do not pass {', '.join(k for k, v in given.items() if v is not None)} too"
                )
            if not self.calibration:
                raise ValueError(
                    f"{self.path / CALIBRATION} not found, so target_speedup / max_drop cannot "
                    "be met; measure one with engine.calibrate(texts, labels, ...) or "
                    "`eeengine calibrate --write`"
                )
            self.policy, self.operating_point = self._calibrated_policy(
                self.calibration, target_speedup, max_drop, policy
            )
        self._requested_backend = backend
        self._backend = resolve_backend(backend, self.policy, self.model.num_labels, self.device)
        self.token_pruning = self._token_pruning(token_pruning)
        self._flops = FlopCounter.for_model(self.model)
        pruned = () if self.token_pruning is None else self.token_pruning.layers
        # The engine owns its model: the executor keeps one copy of the weights.
        self._executor = make_executor(
            executor, self.model, precision, torch_layers={layer - 1 for layer in pruned}
        )
        self._loop = DeviceLoop(self.model, self._executor, graph)

    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    @property
    def backend(self) -> str:
        """Which implementation runs the exit step: "cpp", "triton", "cuda" or "reference"."""
        return self._backend

    @property
    def loop(self) -> str:
        """The early-exit loop: "compaction" (CPU), "graph" or "eager" (CUDA)."""
        return self._loop.mode

    @property
    def executor(self) -> str:
        """What runs the encoder layers: "torch" or "onnxruntime"."""
        return self._executor.name

    def exit_loop(self) -> ExitLoop:
        """The engine's early-exit loop (model, policy, backend, token pruning, executor) in
        per-layer pieces, for callers that schedule layers themselves (``eeengine serve``)."""
        return ExitLoop(self.model, self.policy, self._backend, self.token_pruning, self._executor)

    def _make_policy(self, name: str | None, given: dict) -> ExitPolicy:
        default = self.manifest["policy"]
        name = name or default["name"]
        stored = {}
        # The default's parameters were calibrated at fp32; other precisions re-pick them.
        if name == default["name"] and (self.precision == "fp32" or not self.calibration):
            stored = policy_params(default)
        elif self.calibration:
            chosen = choose_operating_point(self.calibration, policy=name)
            stored = policy_params(chosen[1]) if chosen else {}
        overrides = {k: v for k, v in given.items() if v is not None}
        policy = make_policy(name, **{**stored, **overrides})
        policy.validate(self.model.num_labels, self.num_layers, signals=self.model.signals)
        return policy

    def _calibrated_policy(
        self,
        calibration: dict,
        target_speedup: float | None,
        max_drop: float | None,
        policy: str | None,
    ) -> tuple[ExitPolicy, dict]:
        """The policy of the point :func:`select_operating_point` picks, and that point."""
        name, point = select_operating_point(calibration, target_speedup, max_drop, policy)
        chosen = make_policy(name, **policy_params(point))
        chosen.validate(self.model.num_labels, self.num_layers, signals=self.model.signals)
        return chosen, {"name": name, **point}

    def calibrate(
        self,
        texts: Sequence[str],
        labels: Sequence[int | str | float],
        text_pairs: Sequence[str] | None = None,
        target_speedup: float | None = None,
        max_drop: float | None = None,
        policy: str | None = None,
        batch_size: int = 64,
        progress: bool = False,
    ) -> dict:
        """Measure every policy's trade-off on labelled data and switch to the point that
        meets the target.

        Runs the model to full depth once (:func:`eeengine.evaluation.all_exit_outputs`, with
        the engine's token pruning),
        sweeps every policy that applies over its threshold grid
        (:func:`eeengine.evaluation.sweep`, the task's official metric), then picks a point
        as :class:`Engine` does with ``target_speedup`` / ``max_drop``. On success the engine
        uses that policy from now on and :attr:`calibration` holds the new sweep; on error the
        engine is unchanged.

        Args:
            texts: the inputs (first segments).
            labels: one per text: a class index or label name (classification) or a value
                (regression).
            text_pairs: second segments, one per text, for sentence-pair tasks.
            target_speedup: the most accurate point with L / average exit layer >= this.
            max_drop: the fastest point within this many metric points of full depth.
            policy: restrict the choice to one policy; None: any policy that applies.
            batch_size: rows per full-depth forward pass.
            progress: show a progress bar.

        Returns:
            The chosen point: ``{"name", policy parameters, "metric" (the task's metric),
            "metrics", "avg_exit_layer" (layers), "layer_saving" (1 - avg / L),
            "speedup" (L / avg)}``.

        Raises:
            TypeError / ValueError: bad texts or labels (the index is named), mismatched
                lengths, both or neither of ``target_speedup`` / ``max_drop``, a policy that
                does not apply, no point meets the target (the best reachable is named), or a
                backend that cannot run the chosen policy.
        """
        if text_pairs is not None and len(text_pairs) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(text_pairs)} text_pairs")
        if len(labels) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
        if not texts:
            raise ValueError("calibration needs at least one labelled example")
        normalize_inputs(
            list(texts) if text_pairs is None else list(zip(texts, text_pairs, strict=True))
        )
        values = self._label_values(labels)
        check_target(target_speedup, max_drop)
        metric, extra_metrics = self._task_metrics()
        all_logits, signals = all_exit_outputs(
            self.model,
            self.tokenizer,
            texts,
            text_pairs,
            self.max_length,
            batch_size=batch_size,
            progress=progress,
            token_pruning=self.token_pruning,
            executor=self._executor,
        )
        flops = flops_tables(
            self.model, self.tokenizer, texts, text_pairs, self.max_length, self.token_pruning
        )
        calibration = sweep(all_logits, values, metric, signals, extra_metrics, flops)
        chosen, point = self._calibrated_policy(calibration, target_speedup, max_drop, policy)
        backend = resolve_backend(
            self._requested_backend, chosen, self.model.num_labels, self.device
        )
        self.policy, self.operating_point, self._backend = chosen, point, backend
        self.calibration = calibration
        return point

    def _label_values(self, labels: Sequence[int | str | float]) -> list[int] | list[float]:
        """Class indices (names are looked up) or float values, checked one by one."""
        if self.label_names is None:
            values = []
            for i, label in enumerate(labels):
                if isinstance(label, bool) or not isinstance(label, numbers.Real):
                    raise TypeError(f"labels[{i}] must be a number (regression), got {label!r}")
                values.append(float(label))
            return values
        indices = []
        for i, label in enumerate(labels):
            if isinstance(label, str) and label in self.label_names:
                indices.append(self.label_names.index(label))
            elif (
                isinstance(label, numbers.Integral)
                and not isinstance(label, bool)
                and 0 <= label < len(self.label_names)
            ):
                indices.append(int(label))
            else:
                raise ValueError(
                    f"labels[{i}] = {label!r} is neither a label name {self.label_names} nor a "
                    f"class index in [0, {len(self.label_names) - 1}]"
                )
        return indices

    def _token_pruning(
        self, given: Literal["checkpoint"] | TokenPruning | dict | None
    ) -> TokenPruning | None:
        if given == "checkpoint":
            stored = self.manifest.get("token_pruning")
            try:
                schedule = (
                    None if stored is None else TokenPruning.from_json(stored, self.num_layers)
                )
            except ValueError as error:
                raise CheckpointError(f"{self.path / MANIFEST}: {error}") from None
        elif isinstance(given, dict):
            schedule = TokenPruning.from_json(given, self.num_layers)
        else:
            schedule = given
        if schedule is not None and not self.model.backbone.supports_token_pruning:
            raise ValueError(
                f"token pruning is not supported by the {self.model.backbone_type} backbone"
            )
        return schedule

    def predict(
        self, inputs: str | tuple[str, str] | list, batch_size: int = 32
    ) -> Prediction | list[Prediction]:
        """Predict with per-sample early exit.

        Args:
            inputs: a text, a (text, text_pair) tuple, or a list of them.
            batch_size: rows per forward pass; each row exits on its own and exited rows leave
                the batch. Results do not depend on it.

        Returns:
            One :class:`Prediction` for a single input, else a list in input order.

        Raises:
            TypeError / ValueError: a bad input (its index is named); nothing is run then.
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        examples, single = normalize_inputs(inputs)
        predictions: list[Prediction] = []
        chunk = batch_size * _CHUNK_BATCHES
        for start in range(0, len(examples), chunk):
            predictions += self._predict_chunk(examples[start : start + chunk], start, batch_size)
        return predictions[0] if single else predictions

    def _predict_chunk(
        self, examples: list[Example], offset: int, batch_size: int
    ) -> list[Prediction]:
        texts = [text for text, _ in examples]
        pairs = [pair for _, pair in examples]
        has_pairs = any(pair is not None for pair in pairs)
        if has_pairs and not all(pair is not None for pair in pairs):
            raise ValueError("mix of single texts and (text, text_pair) inputs in one call")
        encoded = encode(self.tokenizer, texts, pairs if has_pairs else None, None)
        too_long = [i for i, n in enumerate(encoded.lengths) if n > self.max_length]
        if too_long:
            warnings.warn(
                f"{len(too_long)} input(s) longer than {self.max_length} tokens were truncated "
                f"(indices {[offset + i for i in too_long[:10]]})",
                stacklevel=3,
            )
            truncated = encode(
                self.tokenizer,
                [texts[i] for i in too_long],
                [pairs[i] for i in too_long] if has_pairs else None,
                self.max_length,
            )
            for j, i in enumerate(too_long):
                encoded.input_ids[i] = truncated.input_ids[j]
                encoded.token_type_ids[i] = truncated.token_type_ids[j]

        results: list[Prediction | None] = [None] * len(examples)
        batches = length_sorted_batches(encoded.lengths, batch_size)
        outs = [
            self._loop(
                self.policy,
                self._backend,
                self.token_pruning,
                *collate(encoded, indices, self.tokenizer.pad_token_id, self.device),
            )
            for indices in batches
        ]
        for indices, out in zip(batches, self._loop.to_host(outs), strict=True):
            for row, (i, prediction) in enumerate(
                zip(indices, self._predictions(out), strict=True)
            ):
                length = len(encoded.input_ids[i])
                if self.token_pruning is not None:
                    prediction.tokens_kept = out.tokens_kept[row, : prediction.exit_layer].tolist()
                prediction.flops = self._flops.executed(
                    length, prediction.exit_layer, self.token_pruning
                )
                prediction.full_flops = self._flops.full(length)
                results[i] = prediction
        return results

    def _task_metrics(self) -> tuple[str, tuple[str, ...]]:
        """The metric the checkpoint was calibrated with (``eeengine.json``) and, for a GLUE
        task, its other official metrics; a task from the user's files has none."""
        task = self.manifest["task"]
        glue = TASKS.get(task["name"])
        extra = glue.extra_metrics if glue is not None and glue.metric == task["metric"] else ()
        return task["metric"], extra

    def _predictions(self, out: ExitOutput) -> list[Prediction]:
        """One :class:`Prediction` per row, with one host copy per field for the whole batch."""
        layers = out.exit_layer.tolist()
        logits = out.logits.tolist()
        if self.label_names is None:
            return [
                Prediction(None, None, None, row[0], layer, self.num_layers, row)
                for row, layer in zip(logits, layers, strict=True)
            ]
        all_probs = torch.softmax(out.logits, -1).tolist()
        predictions = []
        for row, probs, layer in zip(logits, all_probs, layers, strict=True):
            best = max(range(len(probs)), key=probs.__getitem__)
            predictions.append(
                Prediction(
                    label=self.label_names[best],
                    score=probs[best],
                    probs=dict(zip(self.label_names, probs, strict=True)),
                    value=None,
                    exit_layer=layer,
                    num_layers=self.num_layers,
                    logits=row,
                )
            )
        return predictions

    def evaluate(self, split: Split, metric: str, batch_size: int = 32) -> dict:
        """Run :meth:`predict` on a labelled split and score it.

        Args:
            split: texts, optional text pairs and labels (see :func:`eeengine.data.load_split`).
            metric: name in :data:`eeengine.metrics.METRICS`.

        Returns:
            ``{"metric", "value", "avg_exit_layer" (layers), "layer_saving" (1 - avg / L),
            "speedup" (L / avg), "flops_ratio" (MPEE's ρ = Σ executed / Σ full-model FLOPs),
            "flops_speedup" (1 / ρ, MPEE's acceleration), "seconds"}``.
        """
        inputs = (
            split.texts
            if split.text_pairs is None
            else list(zip(split.texts, split.text_pairs, strict=True))
        )
        started = time.perf_counter()
        predictions = self.predict(inputs, batch_size=batch_size)
        seconds = time.perf_counter() - started
        if self.label_names is None:
            outputs = [p.value for p in predictions]
        else:
            outputs = [self.label_names.index(p.label) for p in predictions]
        avg = sum(p.exit_layer for p in predictions) / len(predictions)
        flops_ratio = sum(p.flops for p in predictions) / sum(p.full_flops for p in predictions)
        return {
            "metric": metric,
            "value": METRICS[metric](outputs, split.labels),
            "avg_exit_layer": avg,
            "layer_saving": 1.0 - avg / self.num_layers,
            "speedup": self.num_layers / avg,
            "flops_ratio": flops_ratio,
            "flops_speedup": 1.0 / flops_ratio,
            "seconds": seconds,
        }

    def __repr__(self) -> str:
        return f"Engine({str(self.path)!r}, policy={self.policy!r}, device={str(self.device)!r})"


def _resolve_device(device: str) -> torch.device:
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
