"""eeengine.executors.host_memory.drop_file_pages, checked against the kernel's page table
(``/proc/self/pagemap``: bit 63 of a page's entry says it is resident)."""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from eeengine import Engine
from eeengine.checkpoint import save_checkpoint
from eeengine.executors.host_memory import drop_file_pages
from eeengine.modeling_multiexit import MultiExitBert
from tests.conftest import tiny_config, tiny_manifest

PAGE = mmap.PAGESIZE

try:
    with open("/proc/self/pagemap", "rb") as _probe:
        _probe.read(8)
except OSError:
    pytest.skip("needs Linux's /proc/self/pagemap", allow_module_level=True)


def resident_pages(start: int, end: int) -> tuple[int, int]:
    """(resident, all) whole pages inside [start, end) of this process's address space."""
    first, last = -(-start // PAGE), end // PAGE
    if last <= first:
        return 0, 0
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(first * 8)
        entries = struct.unpack(f"{last - first}Q", pagemap.read((last - first) * 8))
    return sum(entry >> 63 for entry in entries), last - first


def span(tensor: torch.Tensor) -> tuple[int, int]:
    return tensor.data_ptr(), tensor.data_ptr() + tensor.nbytes


@pytest.fixture
def mapped(tmp_path):
    """Three tensors loaded from one safetensors file (one private memory map), every page
    read once, and the values they must keep."""
    torch.manual_seed(0)
    values = {"a": torch.randn(5_000), "b": torch.randn(300_000), "c": torch.randn(7_000)}
    save_file(values, tmp_path / "w.safetensors")
    tensors = load_file(tmp_path / "w.safetensors")
    for tensor in tensors.values():
        tensor.sum()  # read: the pages become resident
    return tensors, values


def test_drops_the_pages_of_released_tensors_only(mapped):
    tensors, values = mapped
    resident, pages = resident_pages(*span(tensors["b"]))
    assert pages > 200 and resident == pages  # the control: read pages are resident
    dropped = drop_file_pages([tensors["b"]], keep=[tensors["a"], tensors["c"]])
    assert dropped == pages * PAGE
    assert resident_pages(*span(tensors["b"]))[0] == 0
    for name in "ac":  # their pages, the ones shared with b's ends included, stay
        start, end = span(tensors[name])
        low, high = start // PAGE * PAGE, -(-end // PAGE) * PAGE
        assert resident_pages(low, high)[0] == (high - low) // PAGE
    for name, value in values.items():  # b is read again from the file
        assert torch.equal(tensors[name], value)


def test_keeps_pages_that_a_kept_tensor_shares(mapped):
    tensors, values = mapped
    b = tensors["b"]
    assert drop_file_pages([b], keep=[b]) == 0
    assert drop_file_pages([b], keep=[b[::1000]]) == 0  # a strided view spans all of b
    head = b[: 100 * PAGE // 4]
    dropped = drop_file_pages([b], keep=[head])
    start, end = span(b)
    assert dropped == (end // PAGE - -(-span(head)[1] // PAGE)) * PAGE
    assert resident_pages(*span(head))[0] == resident_pages(*span(head))[1]
    assert torch.equal(b, values["b"])


def test_leaves_memory_that_is_not_a_file_map_alone():
    tensor = torch.randn(300_000)  # anonymous memory: dropping it would zero it
    copy = tensor.clone()
    assert drop_file_pages([tensor]) == 0
    assert torch.equal(tensor, copy)
    assert drop_file_pages([torch.empty(0), torch.empty(3, device="meta")]) == 0


def _file_spans(ckpt: Path, model: MultiExitBert) -> dict[str, tuple[int, int]]:
    """Address ranges of the checkpoint's tensors in ``model``'s memory map of
    ``model.safetensors``, from the file's header and the word embeddings' address."""
    raw = (ckpt / "model.safetensors").read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    embeddings = next(k for k in header if k.endswith("word_embeddings.weight"))
    base = model.backbone.embeddings.word_embeddings.weight.data_ptr()
    base -= header[embeddings]["data_offsets"][0]
    return {k: (base + v["data_offsets"][0], base + v["data_offsets"][1])
            for k, v in header.items() if k != "__metadata__"}  # fmt: skip


def test_onnxruntime_engine_keeps_no_page_of_the_torch_layers(tmp_path, tokenizer):
    """The ONNX Runtime executor reads the layers' weights to build its own copy; afterwards
    none of their pages of the checkpoint's memory map is resident, while a torch engine's
    are (the control), and both predict alike."""
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    config = tiny_config(hidden_size=128, intermediate_size=512, num_hidden_layers=2)
    ckpt = save_checkpoint(
        tmp_path / "ckpt", MultiExitBert(config, 2).eval(), tokenizer, tiny_manifest()
    )
    text = "a gorgeous, witty, seductive movie."
    engines = {name: Engine(ckpt, executor=name) for name in ("torch", "onnxruntime")}
    predictions = {name: engine.predict(text) for name, engine in engines.items()}
    for name, engine in engines.items():
        spans = _file_spans(Path(ckpt), engine.model)
        layers = [s for k, s in spans.items() if ".layer." in k or ".layers." in k]
        resident = [resident_pages(*s) for s in layers]
        assert sum(pages for _, pages in resident) > 300
        if name == "torch":
            assert all(r == pages for r, pages in resident)
        else:
            assert sum(r for r, _ in resident) == 0
    for key, value in predictions["torch"].probs.items():
        assert predictions["onnxruntime"].probs[key] == pytest.approx(value, abs=1e-5)
