"""torch on one thread around the ONNX Runtime executor's layers (``host_ops``), restored
afterwards, also when contexts of several threads overlap."""

import threading

import pytest
import torch

from eeengine import Engine
from eeengine.executors.onnxruntime import OnnxRuntimeExecutor
from eeengine.executors.ort_environment import single_threaded_torch
from eeengine.executors.torch import TorchExecutor


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_one_thread_inside_restored_after_even_on_error(two_threads):
    with single_threaded_torch():
        assert torch.get_num_threads() == 1
        with single_threaded_torch():  # nested
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError, match="boom"), single_threaded_torch():
        raise RuntimeError("boom")
    assert torch.get_num_threads() == 2


def test_overlapping_contexts_of_two_threads_restore_the_count_once_both_end(two_threads):
    entered, release_first = threading.Event(), threading.Event()
    seen = {}

    def first() -> None:
        with single_threaded_torch():
            entered.set()
            release_first.wait(10)
        seen["after first"] = torch.get_num_threads()

    thread = threading.Thread(target=first)
    thread.start()
    assert entered.wait(10)
    with single_threaded_torch():  # opens while the first is open, closes after it
        release_first.set()
        thread.join(10)
        seen["inside second"] = torch.get_num_threads()
    assert seen["inside second"] == 1  # the second thread's own ops: one thread
    assert torch.get_num_threads() == 2  # both closed: the count from before in this thread
    fresh = []
    reader = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
    reader.start()
    reader.join()
    assert fresh == [2]  # and in a thread started afterwards


@pytest.mark.parametrize(("executor", "threads_inside"), [("onnxruntime", 1), ("torch", 2)])
def test_engine_runs_its_layers_inside_host_ops(
    tiny_ckpt, two_threads, executor, threads_inside, monkeypatch
):
    cls = {"onnxruntime": OnnxRuntimeExecutor, "torch": TorchExecutor}[executor]
    seen = []
    layer = cls.layer

    def recording(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return layer(self, *args, **kwargs)

    monkeypatch.setattr(cls, "layer", recording)
    engine = Engine(tiny_ckpt, executor=executor, policy="none")
    reference = Engine(tiny_ckpt, executor="torch", policy="none")
    texts = ["a gorgeous, witty, seductive movie.", "the plot is tedious."]
    predictions = engine.predict(texts)
    assert seen and set(seen) == {threads_inside}
    assert torch.get_num_threads() == 2
    for got, want in zip(predictions, reference.predict(texts), strict=True):
        assert got.label == want.label
        assert got.probs == pytest.approx(want.probs, abs=1e-4)
