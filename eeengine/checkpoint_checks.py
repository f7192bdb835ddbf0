"""Checks that a checkpoint's files agree with each other and with the model they describe.

:func:`eeengine.checkpoint.load_checkpoint` runs them in this order, each before the step it
protects:

1. :func:`check_config_sizes`: every size in ``config.json`` is a positive integer, and the
   model that ``config.json`` and ``eeengine.json`` describe holds no more parameters than
   ``model.safetensors`` does (counted from its header, built as shapes only:
   :mod:`eeengine.meta_modules`), so a corrupt config can never make the loader allocate a
   model larger than the weights file.
2. :func:`check_tensors`: every stored tensor is floating point and finite (a NaN in one
   encoder matrix would otherwise become ``score=nan``; a NaN in an exit head would silently
   skip that exit).
3. :func:`check_tokenizer`: tokenizer files exist and agree with the embeddings: every token id
   addresses an embedding row, the vocabulary fills the rows (up to padding to a multiple of
   :data:`EMBEDDING_ROW_MULTIPLE`), [CLS]/[SEP]/pad ids exist, inputs are wrapped as
   ``[CLS] ... [SEP]`` with the ids ``config.json`` gives as ``bos_token_id`` / ``eos_token_id``
   (RoBERTa's ``<s>`` 0 and ``</s>`` 2, ALBERT's ``[CLS]`` 2 and ``[SEP]`` 3; BERT's config
   names none), and a RoBERTa tokenizer pads with the id its position ids skip.
4. :func:`check_calibration`: ``calibration.json`` (and ``calibration-<precision>.json``) has
   the structure :func:`eeengine.evaluation.sweep` writes and the operating-point readers
   index (:mod:`eeengine.calibration`, :mod:`eeengine.resolve`).

Every failure raises :class:`CheckpointError` (or ``FileNotFoundError``) naming the file, the
field and what was expected.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from eeengine.meta_modules import meta_modules


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete or corrupt; the message names the file
    and the field."""


# Embedding matrices are often padded past the tokenizer's vocabulary to a multiple of 64 or
# 128 rows (Hugging Face ``resize_token_embeddings(pad_to_multiple_of=...)``): more unused rows
# than that means the tokenizer belongs to another model.
EMBEDDING_ROW_MULTIPLE = 128

# Files one of which holds a Hugging Face tokenizer's vocabulary.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model")

# config.json integer fields that size the model (those its backbone has).
_SIZE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
    "embedding_size",
    "num_hidden_groups",
    "inner_group_num",
)


def read_header(file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (dtype, shape) from a safetensors header, without reading the data.

    Raises:
        FileNotFoundError: the file does not exist.
        CheckpointError: the header is corrupt, or the data is shorter than the header says.
    """
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found")
    try:
        with safe_open(file, "pt") as f:
            return {
                key: (f.get_slice(key).get_dtype(), tuple(f.get_slice(key).get_shape()))
                for key in f.keys()  # noqa: SIM118 (safe_open has no __iter__)
            }
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: corrupt or unreadable safetensors file: {e}") from None


def check_config_sizes(
    config: PretrainedConfig,
    build: Callable[[PretrainedConfig], nn.Module],
    header: dict[str, tuple[str, tuple[int, ...]]],
    config_file: Path,
    weights: Path,
) -> None:
    """Refuse a config whose model would be far bigger than the weights file, before building it.

    The parameter count of the described model is linear in ``num_hidden_layers``; it is
    measured on the meta device (no memory) at one and two layer groups and extrapolated. More
    than twice the stored count is refused here (so building the model never takes more than
    about twice the file's memory); smaller differences are named tensor by tensor by the
    loader's shape check.

    Args:
        config: the backbone config read from ``config_file``.
        build: makes the multi-exit model of a config (with the manifest's labels and heads).
        header: :func:`read_header` of ``weights``.

    Raises:
        CheckpointError: a size field that is not a positive integer, a model that cannot be
            built from the config, or one with more parameters than ``weights`` holds.
    """
    for name in _SIZE_FIELDS:
        value = getattr(config, name, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CheckpointError(
                f"{config_file}: field {name!r} = {value!r}, expected a positive integer"
            )
    if config.hidden_size % config.num_attention_heads:
        raise CheckpointError(
            f"{config_file}: field 'hidden_size' = {config.hidden_size} is not a multiple of "
            f"field 'num_attention_heads' = {config.num_attention_heads}"
        )
    stored = sum(math.prod(shape) for _, shape in header.values())
    group = getattr(config, "num_hidden_groups", 1)
    counts = []
    for layers in (group, 2 * group):
        probe = copy.deepcopy(config)
        probe.num_hidden_layers = layers
        try:
            with meta_modules():
                counts.append(sum(p.numel() for p in build(probe).state_dict().values()))
        except Exception as e:  # any failure of the model code on a corrupt config
            raise CheckpointError(
                f"{config_file}: cannot build the model it describes: {type(e).__name__}: {e}"
            ) from None
    described = counts[0] + (config.num_hidden_layers - group) * (counts[1] - counts[0]) / group
    if described > 2 * stored:
        raise CheckpointError(
            f"{config_file}: describes a model of {described:,.0f} parameters (hidden_size "
            f"{config.hidden_size}, num_hidden_layers {config.num_hidden_layers}, vocab_size "
            f"{config.vocab_size}) but {weights} holds {stored:,}: the files do not belong "
            "together"
        )


def check_tensors(state: dict[str, Tensor], weights: Path) -> None:
    """Every tensor floating point and finite (one reduction per tensor).

    Raises:
        CheckpointError: names the first bad tensor and how many of its values are NaN or inf.
    """
    for key, value in state.items():
        if not value.is_floating_point():
            raise CheckpointError(
                f"{weights}: tensor {key!r} has dtype {value.dtype}, expected "
                "a floating-point dtype"
            )
        if not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise CheckpointError(
                f"{weights}: tensor {key!r} {tuple(value.shape)} holds {bad} NaN or infinite "
                "value(s); every weight must be finite"
            )


def tokenizer_file(path: Path) -> Path:
    """The checkpoint's tokenizer vocabulary file (first of :data:`TOKENIZER_FILES`).

    Raises:
        FileNotFoundError: none of them is there (transformers would otherwise build a
            tokenizer with an empty vocabulary that maps every word to [UNK]).
    """
    for name in TOKENIZER_FILES:
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(
        f"{path}: no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)}, as "
        "saved by tokenizer.save_pretrained)"
    )


def check_tokenizer(
    tokenizer: PreTrainedTokenizerBase,
    config: PretrainedConfig,
    backbone: str,
    file: Path,
    config_file: Path,
) -> None:
    """The tokenizer fits the embeddings and wraps inputs as the backbone expects.

    Args:
        tokenizer: loaded from the checkpoint directory.
        config: the backbone config (``vocab_size`` is the number of embedding rows, equal to
            the stored embedding matrix's by the shape check).
        backbone: "bert", "roberta" or "albert".
        file: the tokenizer file (:func:`tokenizer_file`), named in errors.
        config_file: ``config.json``, named in errors.

    Raises:
        CheckpointError: a token id outside the embedding rows, a vocabulary that fills fewer
            rows than the embeddings have (beyond padding), a missing or out-of-range
            [CLS]/[SEP]/pad token, inputs not wrapped as ``[CLS] text [SEP]``, [CLS]/[SEP] ids
            other than ``config.json``'s ``bos_token_id`` / ``eos_token_id`` where it has them,
            or (RoBERTa) a pad id other than its ``pad_token_id``.
    """
    rows = config.vocab_size
    vocab = tokenizer.get_vocab()
    size = len(tokenizer)
    top_token, top_id = max(vocab.items(), key=lambda item: item[1], default=("", -1))
    if top_id >= rows:
        raise CheckpointError(
            f"{file}: token {top_token!r} has id {top_id}, outside the {rows} embedding rows "
            f"({config_file} field 'vocab_size'): the tokenizer belongs to another model"
        )
    if size + EMBEDDING_ROW_MULTIPLE <= rows:
        raise CheckpointError(
            f"{file}: the vocabulary has {size} tokens but the embeddings have {rows} rows "
            f"({config_file} field 'vocab_size'); expected {rows} tokens (or fewer by less than "
            f"{EMBEDDING_ROW_MULTIPLE} rows of padding): the tokenizer belongs to another model "
            "or was cut"
        )
    for role in ("cls_token", "sep_token", "pad_token"):
        token_id = getattr(tokenizer, f"{role}_id")
        if token_id is None or not 0 <= token_id < rows:
            raise CheckpointError(
                f"{file}: {role} {getattr(tokenizer, role)!r} has id {token_id}, expected an id "
                f"in [0, {rows})"
            )
    try:
        ids = tokenizer("a")["input_ids"]
    except Exception as e:  # a corrupt tokenizer_config.json surfaces only when encoding
        raise CheckpointError(
            f"{file.parent}: the tokenizer files load but cannot encode 'a': "
            f"{type(e).__name__}: {e}"
        ) from None
    if len(ids) < 3 or ids[0] != tokenizer.cls_token_id or ids[-1] != tokenizer.sep_token_id:
        raise CheckpointError(
            f"{file}: encodes 'a' as {ids}; the {backbone} backbone expects "
            f"[{tokenizer.cls_token} ({tokenizer.cls_token_id}), ..., {tokenizer.sep_token} "
            f"({tokenizer.sep_token_id})]"
        )
    for role, field in (("cls_token", "bos_token_id"), ("sep_token", "eos_token_id")):
        expected = getattr(config, field, None)
        if expected is not None and getattr(tokenizer, f"{role}_id") != expected:
            raise CheckpointError(
                f"{file}: {role} {getattr(tokenizer, role)!r} has id "
                f"{getattr(tokenizer, f'{role}_id')}, but {config_file} field {field!r} = "
                f"{expected}"
            )
    if backbone == "roberta" and tokenizer.pad_token_id != config.pad_token_id:
        raise CheckpointError(
            f"{file}: pads with id {tokenizer.pad_token_id}, but {config_file} field "
            f"'pad_token_id' = {config.pad_token_id} (RoBERTa's position ids skip that id)"
        )


# calibration.json: the top-level fields the operating-point readers index, and those of each
# swept point (OperatingPoint.from_sweep); other keys of a point are policy parameters, checked
# by the policy itself. Point fields they read with .get() are checked only when present.
_CALIBRATION_POINT_FIELDS = ("metric", "avg_exit_layer", "speedup", "layer_saving")
_CALIBRATION_OPTIONAL_NUMBERS = ("drop_std", "flops_ratio", "flops_speedup")


def check_calibration(calibration: dict, file: Path) -> None:
    """A stored sweep (:func:`eeengine.evaluation.sweep`) holds what the operating-point readers
    index: ``metric`` (a name), ``num_layers`` (a positive integer), ``full_depth`` (a finite
    number) and ``policies``, an object of policy name -> list of points, each an object with
    finite numbers ``metric``, ``avg_exit_layer`` (> 0: speed-ups divide by it), ``speedup`` and
    ``layer_saving``; ``metrics``, ``drop_std``, ``flops_ratio`` and ``flops_speedup`` are
    optional (an object, and finite numbers or null). An empty object (no calibration) passes.

    Args:
        calibration: the file's JSON object.
        file: ``calibration.json`` or ``calibration-<precision>.json``, named in errors.

    Raises:
        CheckpointError: names the file, the field path (``policies.entropy[3].speedup``) and
            what was expected.
    """
    if not calibration:
        return
    _require(calibration, "metric", file, "metric", str, "a metric name (string)")
    _require(calibration, "num_layers", file, "num_layers", _positive_int, "a positive integer")
    _require(calibration, "full_depth", file, "full_depth", _finite, "a finite number")
    if "num_examples" in calibration:
        _require(
            calibration, "num_examples", file, "num_examples", _positive_int, "a positive integer"
        )
    if "reference_full_depth" in calibration:
        _require(
            calibration, "reference_full_depth", file, "reference_full_depth", _finite,
            "a finite number",
        )  # fmt: skip
    policies = _require(
        calibration, "policies", file, "policies", dict, "an object of policy name -> points"
    )
    for name, points in policies.items():
        where = f"policies.{name}"
        if not isinstance(points, list):
            _refuse(file, where, points, "a list of sweep points")
        for i, point in enumerate(points):
            at = f"{where}[{i}]"
            if not isinstance(point, dict):
                _refuse(file, at, point, "an object (a sweep point)")
            for key in _CALIBRATION_POINT_FIELDS:
                _require(point, key, file, f"{at}.{key}", _finite, "a finite number")
            if point["avg_exit_layer"] <= 0:
                _refuse(file, f"{at}.avg_exit_layer", point["avg_exit_layer"], "a number > 0")
            if not isinstance(point.get("metrics", {}), dict):
                _refuse(file, f"{at}.metrics", point["metrics"], "an object of metric -> value")
            for key in _CALIBRATION_OPTIONAL_NUMBERS:
                if point.get(key) is not None and not _finite(point[key]):
                    _refuse(file, f"{at}.{key}", point[key], "a finite number or null")


def _require(
    data: dict,
    key: str,
    file: Path,
    path: str,
    expected: type | Callable[[object], bool],
    description: str,
) -> object:
    """``data[key]`` if present and of the ``expected`` type (or passing the ``expected``
    predicate); else :class:`CheckpointError` naming ``file``, the field ``path`` and
    ``description``."""
    if key not in data:
        raise CheckpointError(f"{file}: field {path!r} is missing, expected {description}")
    value = data[key]
    ok = isinstance(value, expected) if isinstance(expected, type) else expected(value)
    if not ok:
        _refuse(file, path, value, description)
    return value


def _refuse(file: Path, path: str, value: object, description: str) -> NoReturn:
    raise CheckpointError(f"{file}: field {path!r} = {value!r:.80}, expected {description}")


def _finite(value: object) -> bool:
    """A number (not a bool) that is a finite float (an integer of 400 digits is not)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
