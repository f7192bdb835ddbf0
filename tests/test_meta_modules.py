"""Models built as shapes only (the checkpoint loader's meta build), and weights loaded into
them."""

import shutil
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from eeengine.checkpoint import load_checkpoint
from eeengine.meta_modules import meta_modules
from eeengine.modeling_multiexit import MultiExitBert
from tests.conftest import make_tiny_model, tiny_config


def test_builds_on_meta_without_initializers(monkeypatch):
    called = []
    monkeypatch.setattr(torch.Tensor, "normal_", lambda self, *a, **k: called.append(1))
    with meta_modules():
        model = MultiExitBert(tiny_config(), 3)
    assert called == []  # nn.Embedding's init.normal_ never reached the tensor
    tensors = list(model.state_dict().values())
    assert tensors and all(t.is_meta for t in tensors)
    # the same shapes as a model built as usual
    plain = MultiExitBert(tiny_config(), 3).state_dict()
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in plain.items()
    }


def test_other_threads_build_and_initialize_as_usual():
    inside, built = threading.Event(), threading.Event()
    result = {}

    def other() -> None:
        inside.wait()
        torch.manual_seed(0)
        result["embedding"] = nn.Embedding(1000, 16)
        built.set()

    thread = threading.Thread(target=other)
    thread.start()
    with meta_modules():
        inside.set()
        assert built.wait(10)
    thread.join()
    weight = result["embedding"].weight
    assert not weight.is_meta
    torch.manual_seed(0)
    torch.testing.assert_close(weight, nn.Embedding(1000, 16).weight, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_load_as_float32(tiny_ckpt, tmp_path, dtype):
    target = tmp_path / "half"
    shutil.copytree(tiny_ckpt, target)
    state = load_file(target / "model.safetensors")
    save_file({k: v.to(dtype) for k, v in state.items()}, target / "model.safetensors")
    loaded = load_checkpoint(target).model.state_dict()
    for key, value in state.items():
        assert loaded[key].dtype == torch.float32
        torch.testing.assert_close(loaded[key], value.to(dtype).float(), rtol=0, atol=0)


def test_loaded_model_has_no_meta_tensors(tiny_ckpt, tiny_bert_dir):
    model = load_checkpoint(tiny_ckpt).model
    assert not any(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())
    original = make_tiny_model(tiny_bert_dir).state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, original[key], rtol=0, atol=0)
