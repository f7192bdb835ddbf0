"""``Engine``: load a multi-exit checkpoint and predict with per-sample early exit."""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from eeengine._custom_ops import resolve_backend
from eeengine.batching import collate, encode_truncating, length_sorted_batches
from eeengine.calibration import (
    OperatingPoint,
    check_calibration_args,
    label_values,
    measure_trade_off,
)
from eeengine.checkpoint import load_checkpoint
from eeengine.data import Split
from eeengine.evaluation import score_predictions
from eeengine.executors import make_executor
from eeengine.flops import FlopCounter
from eeengine.inputs import char_limit, normalize_inputs, split_examples
from eeengine.precision import check_precision, read_calibration
from eeengine.prediction import Prediction, predictions_from
from eeengine.resolve import (
    resolve_device,
    resolve_policy,
    resolve_token_pruning,
    validated_policy,
)
from eeengine.runtime import DeviceLoop, ExitLoop, check_finite
from eeengine.token_pruning import TokenPruning

__all__ = ["Engine", "Prediction"]

# Inputs tokenized and bucketed at a time: bounds memory for any number of texts.
_CHUNK_BATCHES = 64


class Engine:
    """Serve a multi-exit checkpoint with per-sample early exit.

    Args:
        checkpoint: a checkpoint directory (see :mod:`eeengine.checkpoint`).
        policy: exit policy name (:data:`eeengine.policies.POLICIES`); None: the checkpoint's
            default, calibrated at training time on a held-out slice of the training data.
        threshold: the policy's threshold in its own units (nats for ``entropy`` and ``mpee``;
            normalized entropy in [0, 1] for ``normalized_entropy``, ``pcee``, ``elbert``), or
            one per layer. None: the checkpoint's value for that policy.
        patience: consecutive confident (``pcee``) or agreeing (``patience``) layers.
        target_speedup: run the most accurate point of ``calibration.json`` whose layer
            speed-up L / average exit layer is at least this (within ``policy`` if given).
        max_drop: run the fastest calibrated point within this many metric points of full
            depth (see :mod:`eeengine.resolve`).
        device: "cpu", "cuda" or "cuda:N".
        max_length: tokens per input (default: the checkpoint's ``max_seq_length``); longer
            inputs are truncated with a warning.
        backend: the exit step's implementation: "cpp" (CPU), "triton" or "cuda" (GPU),
            "reference" (plain torch), or None for the device's fused op.
        token_pruning: MPEE token-wise exit: "checkpoint" (its ``eeengine.json`` schedule),
            None, or a :class:`TokenPruning` / its JSON form.
        executor: what runs the encoder layers (:mod:`eeengine.executors`): "torch",
            "onnxruntime", or None for "onnxruntime" where it can run, else "torch".
            "onnxruntime" drops the torch copy of the layers it runs (one copy in memory).
        precision: the encoder layers' precision on CPU (:mod:`eeengine.precision`): "fp32",
            "int8" (per-channel int8 linear weights; onnxruntime executor) or "bf16" (torch
            executor); exit heads stay fp32. Policy parameters come from that precision's
            calibration (``calibration-int8.json``) when the checkpoint has one.
        graph: on a CUDA device, run each batch as one CUDA graph replay (no host sync per
            layer; :mod:`eeengine.cuda_graph`); False runs the same sync-free loop eagerly.
            Ignored on CPU (see :class:`eeengine.runtime.DeviceLoop`).
        **policy_kwargs: other policy parameters (``layer``, ``window``, ``window_test``,
            ``window_range``, ``memory_weight`` ...; see :mod:`eeengine.policies`).

    Attributes:
        calibration: the sweep points are picked from (``calibration.json`` or the last
            :meth:`calibrate`; {} when there is neither).
        operating_point: the :class:`eeengine.calibration.OperatingPoint` the policy came
            from, or None when the policy was given or is the checkpoint's default.

    Raises:
        FileNotFoundError, eeengine.checkpoint.CheckpointError: a bad checkpoint (file and
            field named).
        ValueError: unknown policy, device, backend, executor or precision, or one that cannot
            run here (int8 / bf16 on their executor, on CPU);
            a threshold out of range; a bad token-pruning schedule; a calibration target that
            cannot be met (the best reachable point is named).
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
        self.device = resolve_device(device)
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
        self.policy, self.operating_point = resolve_policy(
            self.model,
            self.manifest,
            self.calibration,
            self.path,
            policy,
            target_speedup,
            max_drop,
            threshold=threshold,
            patience=patience,
            # The default policy's parameters were calibrated at fp32.
            default_params=precision == "fp32" or not self.calibration,
            **policy_kwargs,
        )
        self._requested_backend = backend
        self._backend = resolve_backend(backend, self.policy, self.model.num_labels, self.device)
        self.token_pruning = resolve_token_pruning(
            token_pruning, self.model, self.manifest, self.path
        )
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

    def calibrate(
        self,
        texts: Sequence[str],
        labels: Sequence[int | str | float] | None = None,
        text_pairs: Sequence[str] | None = None,
        target_speedup: float | None = None,
        max_drop: float | None = None,
        agreement: float | None = None,
        policy: str | None = None,
        batch_size: int = 64,
        progress: bool = False,
    ) -> OperatingPoint:
        """Measure every policy's trade-off on ``texts`` and switch to the point that meets
        the target (:mod:`eeengine.calibration`; one full-depth pass, every policy swept).

        With ``labels`` (class indices, label names or values) points are scored by the
        checkpoint's metric: give ``target_speedup`` (the most accurate point with L / average
        exit layer >= it) or ``max_drop`` (the fastest within that many metric points of full
        depth). Without labels they are scored by agreement with full depth on the same texts
        (:func:`eeengine.metrics.agreement`): the fastest point agreeing on at least
        ``agreement`` (default 0.99) of them, or the most agreeing at ``target_speedup``.
        ``policy`` restricts the choice to one policy. On success the engine runs the chosen
        :class:`eeengine.calibration.OperatingPoint` (returned) and :attr:`calibration` holds
        the new sweep; on error the engine is unchanged.

        Raises:
            TypeError / ValueError: bad texts or labels (index named), mismatched lengths, a
                target missing or given twice, a policy that does not apply, or no point meets
                the target (the best reachable is named).
        """
        max_drop = check_calibration_args(
            texts, labels, text_pairs, target_speedup, max_drop, agreement
        )
        values = None if labels is None else label_values(labels, self.label_names)
        task = self.manifest["task"]
        trade_off = measure_trade_off(
            self.model,
            self.tokenizer,
            texts,
            text_pairs,
            values,
            task["metric"],
            self.max_length,
            task.get("metrics", [])[1:],
            self.token_pruning,
            batch_size,
            progress,
            executor=self._executor,
        )
        point = trade_off.select(target_speedup, max_drop, policy)
        chosen = validated_policy(point.policy(), self.model)
        backend = resolve_backend(
            self._requested_backend, chosen, self.model.num_labels, self.device
        )
        self.policy, self.operating_point, self._backend = chosen, point, backend
        self.calibration = trade_off.sweep
        return point

    def predict(
        self, inputs: str | tuple[str, str] | list, batch_size: int = 32
    ) -> Prediction | list[Prediction]:
        """Predict with per-sample early exit.

        Texts are cut to :func:`eeengine.inputs.char_limit` characters before tokenization
        (which bounds the cost of any input without changing the tokens kept for text of
        normal density; see :mod:`eeengine.inputs`).

        Args:
            inputs: a text, a (text, text_pair) tuple, or a list of them.
            batch_size: rows per forward pass; each row exits on its own and exited rows leave
                the batch. Results do not depend on it.

        Returns:
            One :class:`Prediction` for a single input, else a list in input order.

        Raises:
            TypeError / ValueError: a bad input (its index is named); nothing is run then.
            eeengine.runtime.NonFiniteLogitsError: NaN or infinite logits (input and layer
                named); no prediction is returned for the call.
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        examples, single = normalize_inputs(inputs, char_limit(self.max_length))
        texts, pairs = split_examples(examples)
        predictions: list[Prediction] = []
        chunk = batch_size * _CHUNK_BATCHES
        for start in range(0, len(texts), chunk):
            end = start + chunk
            chunk_pairs = None if pairs is None else pairs[start:end]
            predictions += self._predict_chunk(texts[start:end], chunk_pairs, start, batch_size)
        return predictions[0] if single else predictions

    def _predict_chunk(
        self, texts: list[str], pairs: list[str] | None, offset: int, batch_size: int
    ) -> list[Prediction]:
        encoded, truncated = encode_truncating(self.tokenizer, texts, pairs, self.max_length)
        if truncated:
            warnings.warn(
                f"{len(truncated)} input(s) longer than {self.max_length} tokens were truncated "
                f"(indices {[offset + i for i in truncated[:10]]})",
                stacklevel=3,
            )
        results: list[Prediction | None] = [None] * len(texts)
        all_lengths = encoded.lengths
        batches = length_sorted_batches(all_lengths, batch_size)
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
            check_finite(out, [offset + i for i in indices])
            lengths = [all_lengths[i] for i in indices]
            batch_predictions = predictions_from(
                out, lengths, self.label_names, self._flops, self.token_pruning
            )
            for i, prediction in zip(indices, batch_predictions, strict=True):
                results[i] = prediction
        return results

    def evaluate(self, split: Split, metric: str, batch_size: int = 32) -> dict:
        """Run :meth:`predict` on a labelled split and score it by ``metric`` (a key of
        :data:`eeengine.metrics.METRICS`): :func:`eeengine.evaluation.score_predictions`' dict
        (metric value, average exit layer, speed-ups, FLOPs ratio) plus ``seconds``."""
        inputs = (
            split.texts
            if split.text_pairs is None
            else list(zip(split.texts, split.text_pairs, strict=True))
        )
        started = time.perf_counter()
        predictions = self.predict(inputs, batch_size=batch_size)
        seconds = time.perf_counter() - started
        return {**score_predictions(predictions, split.labels, metric), "seconds": seconds}

    def __repr__(self) -> str:
        return f"Engine({str(self.path)!r}, policy={self.policy!r}, device={str(self.device)!r})"
