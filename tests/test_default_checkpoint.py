"""Opt-in (``pytest -m slow``): the real default checkpoint, trained on first use (~10-15 min
on 2 CPU cores) and cached in $EEENGINE_HOME. Checks issue 3's acceptance criteria."""

import pytest

from eeengine import Engine
from eeengine.data import get_task, load_split
from eeengine.defaults import default_checkpoint
from eeengine.evaluation import all_exit_logits, evaluate, exit_metrics
from eeengine.executors import EXECUTORS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine():
    return Engine(default_checkpoint())


@pytest.fixture(scope="module")
def dev():
    return load_split(get_task("sst2"), "dev")


def test_sentences_we_wrote(engine):
    positive, negative = engine.predict(
        ["a gorgeous, witty, seductive movie.", "the plot is tedious and the acting is wooden."]
    )
    assert positive.label == "positive"
    assert negative.label == "negative"


def test_accuracy_and_speedup(engine, dev):
    # The torch executor keeps every layer's torch weights (the ONNX Runtime one drops them).
    reference = Engine(default_checkpoint(), executor="torch")
    full_depth = exit_metrics(
        all_exit_logits(
            reference.model, reference.tokenizer, dev.texts, None, reference.max_length
        ),
        dev.labels,
        "accuracy",
    )[-1]
    result = evaluate(engine, dev, "accuracy")
    assert full_depth >= 88.0
    assert result["value"] >= full_depth - 0.5
    budget = engine.manifest["training"]["schedule"].get("time_budget") or {}
    if budget.get("steps", 0) < budget.get("planned_steps", 0):
        # A CPU too slow for the 3-epoch recipe in 15 minutes trains about one epoch
        # (max_train_seconds), whose early exits are less sure: 3.85 layers on 2 AVX2 cores.
        assert result["avg_exit_layer"] <= 4.0
    else:
        assert result["avg_exit_layer"] <= 3.5


@pytest.mark.parametrize("executor", EXECUTORS)
def test_batched_equals_one_by_one_on_the_whole_dev_set(dev, executor):
    if executor == "onnxruntime":
        pytest.importorskip("onnxruntime")
    engine = Engine(default_checkpoint(), executor=executor)
    batched = engine.predict(dev.texts, batch_size=64)
    alone = [engine.predict(text) for text in dev.texts]
    assert [(p.label, p.exit_layer) for p in batched] == [(p.label, p.exit_layer) for p in alone]


def test_onnxruntime_executor_exits_as_torch_on_the_whole_dev_set(dev):
    pytest.importorskip("onnxruntime")
    ort = Engine(default_checkpoint(), executor="onnxruntime").predict(dev.texts)
    ref = Engine(default_checkpoint(), executor="torch").predict(dev.texts)
    assert [(p.label, p.exit_layer) for p in ort] == [(p.label, p.exit_layer) for p in ref]
