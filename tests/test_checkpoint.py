"""Checkpoint round trip, atomic saving, and clear errors for broken checkpoints."""

import json
import shutil

import pytest
import torch

import eeengine.checkpoint as checkpoint_module
from eeengine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tests.conftest import make_tiny_model, tiny_manifest


def test_round_trip_keeps_weights_and_manifest(tiny_ckpt, tiny_bert_dir):
    loaded = load_checkpoint(tiny_ckpt)
    original = make_tiny_model(tiny_bert_dir)
    for key, value in original.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[key], value, rtol=0, atol=0)
    assert loaded.manifest["policy"] == {"name": "entropy", "threshold": 0.4}
    assert loaded.manifest["format_version"] == 1
    assert loaded.label_names == ["negative", "positive"]
    for name in ("eeengine.json", "config.json", "model.safetensors", "tokenizer.json"):
        assert (tiny_ckpt / name).is_file()


def test_failed_save_keeps_the_existing_checkpoint(tiny_ckpt, tmp_path, monkeypatch, tokenizer):
    target = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, target)
    before = (target / "model.safetensors").read_bytes()
    model = load_checkpoint(target).model

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(target, model, tokenizer, tiny_manifest(policy={"name": "none"}))
    assert (target / "model.safetensors").read_bytes() == before
    assert json.loads((target / "eeengine.json").read_text())["policy"]["name"] == "entropy"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp dir left behind


def test_save_replaces_an_existing_checkpoint(tiny_ckpt, tmp_path, tokenizer):
    target = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, target)
    model = load_checkpoint(target).model
    save_checkpoint(target, model, tokenizer, tiny_manifest(policy={"name": "none"}))
    assert load_checkpoint(target).manifest["policy"] == {"name": "none"}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def _broken(tiny_ckpt, tmp_path, edit):
    target = tmp_path / "broken"
    shutil.copytree(tiny_ckpt, target)
    edit(target)
    return target


def _edit_manifest(change):
    def edit(path):
        manifest = json.loads((path / "eeengine.json").read_text())
        change(manifest)
        (path / "eeengine.json").write_text(json.dumps(manifest))

    return edit


@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [
        (lambda p: (p / "eeengine.json").unlink(), FileNotFoundError, "eeengine.json not found"),
        (lambda p: (p / "model.safetensors").unlink(), FileNotFoundError, "model.safetensors"),
        (lambda p: (p / "eeengine.json").write_text("{oops"), CheckpointError, "not valid JSON"),
        (_edit_manifest(lambda m: m.pop("task")), CheckpointError, "field 'task' is missing"),
        (
            _edit_manifest(lambda m: m.update(max_seq_length="64")),
            CheckpointError,
            "field 'max_seq_length' must be int",
        ),
        (
            _edit_manifest(lambda m: m["task"].update(label_names=["only"])),
            CheckpointError,
            "task.label_names",
        ),
        (
            _edit_manifest(lambda m: m["task"].update(label_names=["a", "b", "c"])),
            CheckpointError,
            "weights do not match",
        ),
        (
            _edit_manifest(lambda m: m.update(backbone="albert")),
            CheckpointError,
            "model_type 'bert' does not match field 'backbone' = 'albert'",
        ),
        (
            _edit_manifest(lambda m: m.update(backbone="gpt2")),
            CheckpointError,
            "field 'backbone' = 'gpt2', expected one of bert, roberta, albert",
        ),
        (
            _edit_manifest(lambda m: m["exit_heads"].update(layout="stacked")),
            CheckpointError,
            "exit_heads.layout",
        ),
        (
            _edit_manifest(lambda m: m["exit_heads"].update(lte=True)),
            CheckpointError,
            r"weights do not match.*missing \['lte.dense.bias'",
        ),
        (
            lambda p: (p / "model.safetensors").write_bytes(b"\x00" * 100),
            CheckpointError,
            "corrupt or unreadable safetensors",
        ),
    ],
)
def test_broken_checkpoint_names_file_and_field(tiny_ckpt, tmp_path, edit, error, message):
    with pytest.raises(error, match=message):
        load_checkpoint(_broken(tiny_ckpt, tmp_path, edit))


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
