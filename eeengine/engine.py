"""``Engine``: load a multi-exit checkpoint and predict with per-sample early exit."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from eeengine._custom_ops import resolve_backend
from eeengine.batching import check_split_cost, encode_truncating, length_sorted_batches
from eeengine.calibration import OperatingPoint, calibrate_engine
from eeengine.checkpoint import load_checkpoint
from eeengine.device_loop import DeviceLoop
from eeengine.executors import make_executor
from eeengine.flops import FlopCounter
from eeengine.inputs import char_limit, check_batch_size, normalize_inputs, split_examples
from eeengine.precision import check_precision, read_calibration
from eeengine.prediction import Prediction, predictions_in_order
from eeengine.resolve import (
    resolve_device,
    resolve_max_length,
    resolve_policy,
    resolve_token_pruning,
    validated_policy,
)
from eeengine.runtime import ExitLoop
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
        threshold: in the policy's units (nats: ``entropy``, ``mpee``; normalized entropy in
            [0, 1]: ``normalized_entropy``, ``pcee``, ``elbert``), or one per layer; None: the
            checkpoint's value for that policy.
        patience: consecutive confident (``pcee``) or agreeing (``patience``) layers.
        target_speedup: run the most accurate point of ``calibration.json`` whose layer
            speed-up L / average exit layer is at least this (within ``policy`` if given).
        max_drop: run the fastest calibrated point within this many metric points of full
            depth (see :mod:`eeengine.resolve`); with ``confidence`` in (0, 1), within it at
            that confidence (:func:`eeengine.selection.choose_operating_point`).
        device: "cpu", "cuda" or "cuda:N".
        max_length: tokens per input (default: the checkpoint's ``max_seq_length``); longer
            inputs are truncated with a warning.
        backend: the exit step's implementation: "cpp" (CPU), "triton" or "cuda" (GPU),
            "reference" (plain torch), or None for the device's fused op.
        token_pruning: MPEE token-wise exit: "checkpoint" (its ``eeengine.json`` schedule),
            None, or a :class:`TokenPruning` / its JSON form.
        executor: what runs the encoder layers (:mod:`eeengine.executors`): "torch" or
            "onnxruntime" (which drops the torch copy of the layers); None: "onnxruntime"
            where it can run, else "torch".
        precision: the encoder layers' precision on CPU (:mod:`eeengine.precision`): "fp32",
            "int8" (per-channel int8 linear weights; onnxruntime executor), "int8_static" (also
            fixed activation scales, results independent of the batch) or "bf16" (torch
            executor); exit heads stay fp32. Policy parameters come from that precision's
            calibration (``calibration-int8.json``) when the checkpoint has one.
        graph: on CUDA, run each batch as one CUDA graph replay (:mod:`eeengine.cuda_graph`);
            False: the same sync-free loop eagerly. Ignored on CPU.
        split_cost: padded tokens one more forward pass is worth (:attr:`split_cost`); None:
            the executor's, measured per executor and precision (BENCHMARKS.md, "Padding").
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
            run here (int8 / bf16 on their executor, on CPU); a threshold or ``max_length`` out
            of range; a bad token-pruning schedule or ``split_cost``; a calibration target
            that cannot be met (the best reachable point is named).
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
        confidence: float | None = None,
        split_cost: float | None = None,
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
        self.max_length = resolve_max_length(max_length, self.manifest, self.model)
        self.policy, self.operating_point = resolve_policy(
            self.model, self.manifest, self.calibration, self.path, policy, target_speedup,
            max_drop, threshold=threshold, patience=patience,
            # The default policy's parameters were calibrated at fp32.
            default_params=precision == "fp32" or not self.calibration, confidence=confidence,
            **policy_kwargs,
        )  # fmt: skip
        self._requested_backend = backend
        self._backend = resolve_backend(backend, self.policy, self.model.num_labels, self.device)
        self.token_pruning = resolve_token_pruning(
            token_pruning, self.model, self.manifest, self.path
        )
        self._flops = FlopCounter.for_model(self.model)
        self._executor = make_executor(  # the engine owns its model: one copy of the weights
            executor, self.model, precision, self.token_pruning, True, self.path
        )
        self.split_cost = self._executor.split_cost if split_cost is None else split_cost
        self._loop = DeviceLoop(self.model, self._executor, graph)

    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    @property
    def backend(self) -> str:
        """Which implementation runs the exit step: "cpp", "triton", "cuda" or "reference"."""
        return self._backend

    @property
    def split_cost(self) -> float:
        """What one more forward pass costs, in padded tokens: predict, calibrate, evaluation and
        serve cut batches where that removes more padding (inf: never). Settable (>= 0)."""
        return self._executor.split_cost

    @split_cost.setter
    def split_cost(self, value: float) -> None:
        self._executor.split_cost = check_split_cost(value)

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
        confidence: float | None = None,
    ) -> OperatingPoint:
        """Measure every policy's trade-off on ``texts`` and switch to (and return) the
        :class:`eeengine.calibration.OperatingPoint` that meets the target; :attr:`calibration`
        holds the new sweep. On error the engine is unchanged. Arguments and errors:
        :func:`eeengine.calibration.calibrate_engine`."""
        point, sweep = calibrate_engine(
            self, self._executor, texts, labels, text_pairs, target_speedup, max_drop,
            agreement, policy, batch_size, progress, confidence,
        )  # fmt: skip
        chosen = validated_policy(point.policy(), self.model)
        backend = resolve_backend(
            self._requested_backend, chosen, self.model.num_labels, self.device
        )
        self.policy, self.operating_point, self._backend = chosen, point, backend
        self.calibration = sweep
        return point

    def predict(
        self, inputs: str | tuple[str, str] | list, batch_size: int = 32
    ) -> Prediction | list[Prediction]:
        """Predict with per-sample early exit.

        Texts are cut to :func:`eeengine.inputs.char_limit` characters before tokenization: that
        bounds any input's cost and keeps the tokens of normal text (:mod:`eeengine.inputs`).

        Args:
            inputs: a text, a (text, text_pair) tuple, or a list of them.
            batch_size: most rows per pass (cut where padding costs more than a pass:
                :attr:`split_cost`); rows exit on their own and leave the batch. Results do not
                depend on it, except at int8 (README, Precision).

        Returns:
            One :class:`Prediction` for a single input, else a list in input order.

        Raises:
            TypeError / ValueError: a bad input (its index is named); nothing is run then.
            eeengine.runtime.NonFiniteLogitsError: NaN or infinite logits (input and layer
                named); no prediction is returned for the call.
        """
        check_batch_size(batch_size)
        examples, single = normalize_inputs(inputs, char_limit(self.max_length))
        texts, pairs = split_examples(examples)
        predictions: list[Prediction] = []
        chunk = batch_size * _CHUNK_BATCHES
        for start in range(0, len(texts), chunk):
            predictions += self._predict_chunk(texts, pairs, start, chunk, batch_size)
        return predictions[0] if single else predictions

    def _predict_chunk(
        self, texts: list[str], pairs: list[str] | None, offset: int, size: int, batch_size: int
    ) -> list[Prediction]:
        window = slice(offset, offset + size)
        texts, pairs = texts[window], None if pairs is None else pairs[window]
        encoded = encode_truncating(self.tokenizer, texts, pairs, self.max_length, offset)
        batches = length_sorted_batches(encoded.lengths, batch_size, self.split_cost)
        outs = self._loop.run_batches(
            self.policy, self._backend, self.token_pruning, encoded, batches,
            self.tokenizer.pad_token_id,
        )  # fmt: skip
        return predictions_in_order(
            batches, outs, encoded.lengths, offset, self.label_names, self._flops,
            self.token_pruning,
        )  # fmt: skip

    def __repr__(self) -> str:
        return f"Engine({str(self.path)!r}, policy={self.policy!r}, device={str(self.device)!r})"
