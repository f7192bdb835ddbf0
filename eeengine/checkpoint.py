"""The checkpoint directory (DESIGN.md, "Checkpoint format").

::

    eeengine.json       format version, backbone, task, exit heads, default policy, max length,
                        token-pruning schedule, training recipe and per-exit dev metrics
    config.json         the Hugging Face backbone config (its model_type is the backbone)
    model.safetensors   backbone (``bert.*``, ``roberta.*`` or ``albert.*``), exit heads
                        (``exit_heads.*``, ``exit_pooler.*``) and the LTE module (``lte.*``)
    tokenizer files     as saved by the Hugging Face tokenizer
    calibration.json    per policy, threshold -> metric, average exit layer, speed-up, measured
                        on the calibration slice (fp32 layers)
    calibration-int8.json   the same sweep with int8 layers (:mod:`eeengine.precision`), when
                        the trainer could run them or ``eeengine calibrate --write`` measured it

Saving is atomic: everything is written to a temporary sibling directory that is renamed into
place, so a crash never leaves a half-written checkpoint where a good one was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from eeengine.checkpoint_checks import (
    CheckpointError,
    check_calibration,
    check_config_sizes,
    check_tensors,
    check_tokenizer,
    read_header,
    tokenizer_file,
)
from eeengine.heads import LAYOUTS, POOLINGS
from eeengine.meta_modules import meta_modules
from eeengine.modeling_multiexit import BACKBONES, MultiExitBert

FORMAT_VERSION = 1
MANIFEST = "eeengine.json"
CALIBRATION = "calibration.json"

# field -> required type(s) in eeengine.json
_REQUIRED = {
    "format_version": int,
    "backbone": str,
    "task": dict,
    "exit_heads": dict,
    "policy": dict,
    "max_seq_length": int,
}


@dataclass
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        model: the multi-exit model, in eval mode, on CPU.
        tokenizer: the Hugging Face tokenizer saved with it.
        manifest: the content of ``eeengine.json``.
        calibration: the content of ``calibration.json`` ({} when there is none).
    """

    model: MultiExitBert
    tokenizer: PreTrainedTokenizerBase
    manifest: dict
    calibration: dict = field(default_factory=dict)

    @property
    def label_names(self) -> list[str] | None:
        return self.manifest["task"].get("label_names")


def save_checkpoint(
    path: str | Path,
    model: MultiExitBert,
    tokenizer: PreTrainedTokenizerBase,
    manifest: dict,
    calibration: dict | None = None,
    extra_json: Mapping[str, dict] | None = None,
    extra_files: Mapping[str, bytes] | None = None,
) -> Path:
    """Write a checkpoint directory atomically (temp dir, then rename).

    An existing checkpoint at ``path`` is replaced only once the new one is complete.

    Args:
        calibration: the content of ``calibration.json`` (None: no such file).
        extra_json: more JSON files, file name -> content (e.g. ``calibration-int8.json``),
            written into the same temporary directory before the rename.
        extra_files: more files, file name -> bytes (e.g. ``int8-activations.safetensors``),
            likewise.

    Returns:
        The checkpoint path.
    """
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    manifest = {"format_version": FORMAT_VERSION, **manifest}
    _validate_manifest(manifest, path / MANIFEST)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if calibration is not None:
            (tmp / CALIBRATION).write_text(json.dumps(calibration, indent=2) + "\n")
        for name, content in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
            path.rename(old)
        tmp.rename(path)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def update_checkpoint(path: str | Path, policy: dict, calibration: dict) -> None:
    """Set a checkpoint's default policy (``eeengine.json`` field ``policy``) and replace its
    ``calibration.json``, leaving the weights alone.

    Each file is replaced atomically (:func:`write_json_atomic`); ``calibration.json`` first,
    so an interruption can leave the new sweep with the old default, never a half-written file.

    Args:
        path: the checkpoint directory.
        policy: ``{"name": policy name, **its parameters}``.
        calibration: the sweep (:func:`eeengine.evaluation.sweep`).

    Raises:
        FileNotFoundError: the directory or its ``eeengine.json`` does not exist.
        CheckpointError: ``eeengine.json`` is corrupt, or the new policy has no name.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    manifest = _read_json(path / MANIFEST)
    manifest["policy"] = policy
    _validate_manifest(manifest, path / MANIFEST)
    write_json_atomic(path / CALIBRATION, calibration)
    write_json_atomic(path / MANIFEST, manifest)


def read_safetensors(file: Path) -> dict[str, Tensor]:
    """The tensors of a safetensors ``file`` of a checkpoint.

    Raises:
        CheckpointError: the file is corrupt or unreadable (the file named).
    """
    try:
        return load_file(file)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: corrupt or unreadable safetensors file: {e}") from None


def write_json_atomic(file: Path, data: dict) -> None:
    """Write ``data`` as indented JSON to ``file`` with :func:`write_atomic`."""
    write_atomic(file, lambda f: f.write((json.dumps(data, indent=2) + "\n").encode()))


def write_atomic(file: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write`` on a temporary sibling of ``file`` opened for binary writing, flush it to
    disk, then rename it over ``file``: readers see the old content or the new, never a mix,
    and an interruption leaves no partial ``file``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{file.name}.tmp-", dir=file.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load and validate a checkpoint directory.

    Besides the format, the files must agree with the model they describe (see
    :mod:`eeengine.checkpoint_checks`): sizes in ``config.json`` that the weights can hold,
    finite floating-point weights, a tokenizer that fits the embeddings, a ``max_seq_length``
    the position embeddings cover, distinct label names, a ``calibration.json`` (optional)
    with the fields operating points are picked by.

    Raises:
        FileNotFoundError: the directory or one of its files does not exist (named).
        CheckpointError: a file is corrupt or a field is missing or wrong (file and field named).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    manifest = _read_json(path / MANIFEST)
    _validate_manifest(manifest, path / MANIFEST)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # transformers raises many kinds on a corrupt config
        raise CheckpointError(
            f"{config_file}: cannot read the backbone config: {type(e).__name__}: {e}"
        ) from None
    if config.model_type != manifest["backbone"]:
        raise CheckpointError(
            f"{config_file}: model_type {config.model_type!r} does not match field "
            f"'backbone' = {manifest['backbone']!r} of {MANIFEST}"
        )
    task = manifest["task"]
    num_labels = len(task["label_names"]) if task["type"] == "classification" else 1
    heads = manifest["exit_heads"]

    def build(config: PretrainedConfig) -> MultiExitBert:
        return MultiExitBert(
            config,
            num_labels,
            pooling=heads["pooling"],
            layout=heads.get("layout", "per_layer"),
            lte=heads.get("lte", False),
        )

    weights = path / "model.safetensors"
    check_config_sizes(config, build, read_header(weights), config_file, weights)
    with meta_modules():  # the weights come from the file: no memory or init until then
        model = build(config)
    limit = model.backbone.max_positions
    if not 2 < manifest["max_seq_length"] <= limit:
        raise CheckpointError(
            f"{path / MANIFEST}: field 'max_seq_length' = {manifest['max_seq_length']}, expected "
            f"[3, {limit}] (the position embeddings of {config_file})"
        )
    state = read_safetensors(weights)
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    mismatched = sorted(
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    )
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"{weights}: weights do not match config.json and {MANIFEST}: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, shape mismatch {mismatched[:3]}"
        )
    check_tensors(state, weights)
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, assign=True)
    model.eval()
    vocabulary = tokenizer_file(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # tokenizers raises a bare Exception on a corrupt tokenizer.json
        raise CheckpointError(
            f"{path}: cannot load the tokenizer files: {type(e).__name__}: {e}"
        ) from None
    check_tokenizer(tokenizer, config, manifest["backbone"], vocabulary, config_file)
    calibration = read_sweep(path / CALIBRATION) if (path / CALIBRATION).exists() else {}
    return Checkpoint(model, tokenizer, manifest, calibration)


def read_sweep(file: Path) -> dict:
    """A stored calibration sweep (``calibration.json`` or ``calibration-<precision>.json``),
    checked by :func:`eeengine.checkpoint_checks.check_calibration`.

    Raises:
        FileNotFoundError: ``file`` does not exist.
        CheckpointError: not a JSON object, or a field missing or wrong (file and field named).
    """
    calibration = _read_json(file)
    check_calibration(calibration, file)
    return calibration


def _read_json(file: Path) -> dict:
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: not an eeengine checkpoint")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def _validate_manifest(manifest: dict, file: Path) -> None:
    for name, kind in _REQUIRED.items():
        if name not in manifest:
            raise CheckpointError(f"{file}: field {name!r} is missing")
        if not isinstance(manifest[name], kind):
            raise CheckpointError(
                f"{file}: field {name!r} must be {kind.__name__}, "
                f"got {type(manifest[name]).__name__}"
            )
    if manifest["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{file}: format_version {manifest['format_version']} is newer than this eeengine "
            f"understands ({FORMAT_VERSION})"
        )
    if manifest["backbone"] not in BACKBONES:
        raise CheckpointError(
            f"{file}: field 'backbone' = {manifest['backbone']!r}, expected one of "
            f"{', '.join(BACKBONES)}"
        )
    task = manifest["task"]
    if task.get("type") not in ("classification", "regression"):
        raise CheckpointError(f"{file}: field 'task.type' must be 'classification' or 'regression'")
    if task["type"] == "classification":
        names = task.get("label_names")
        if not (
            isinstance(names, list) and len(names) >= 2 and all(isinstance(n, str) for n in names)
        ):
            raise CheckpointError(f"{file}: field 'task.label_names' must list >= 2 label names")
        if len(set(names)) != len(names):
            raise CheckpointError(f"{file}: field 'task.label_names' = {names} repeats a name")
    heads = manifest["exit_heads"]
    if heads.get("pooling") not in POOLINGS:
        raise CheckpointError(f"{file}: field 'exit_heads.pooling' must be one of {POOLINGS}")
    if heads.get("layout", "per_layer") not in LAYOUTS:
        raise CheckpointError(f"{file}: field 'exit_heads.layout' must be one of {LAYOUTS}")
    if not isinstance(heads.get("lte", False), bool):
        raise CheckpointError(f"{file}: field 'exit_heads.lte' must be true or false")
    if not isinstance(manifest["policy"].get("name"), str):
        raise CheckpointError(f"{file}: field 'policy.name' is missing")
