"""Engine: predictions, per-sample exit, and bad input (clear error, engine still usable)."""

import math
import warnings

import pytest
import torch

from eeengine import Engine, Prediction
from eeengine._custom_ops import HAS_C, LOAD_ERROR
from eeengine.batching import collate, encode, length_sorted_batches
from eeengine.checkpoint import load_checkpoint
from eeengine.device_loop import DeviceLoop
from eeengine.evaluation import all_exit_logits
from eeengine.policies import make_policy, run_policy
from tests.conftest import SENTENCES


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    return Engine(tiny_ckpt)


def test_single_and_list(engine):
    single = engine.predict(SENTENCES[0])
    assert isinstance(single, Prediction)
    assert single.label in ("negative", "positive")
    assert math.isclose(sum(single.probs.values()), 1.0, rel_tol=1e-6)
    assert single.score == max(single.probs.values())
    assert 1 <= single.exit_layer <= single.num_layers == 4
    many = engine.predict(SENTENCES)
    assert [p.label for p in many][0] == single.label
    assert engine.predict([]) == []


def test_predictions_match_the_reference(engine, tiny_ckpt, tokenizer):
    """Engine output equals the policy applied to the full-depth logits of each input."""
    ckpt = load_checkpoint(tiny_ckpt)
    batch = collate(encode(tokenizer, SENTENCES, None, 64), range(len(SENTENCES)), 0)
    with torch.inference_mode():
        all_logits = ckpt.model(*batch)
    exit_layer, logits = run_policy(make_policy("entropy", threshold=0.4), all_logits)
    predictions = engine.predict(SENTENCES, batch_size=3)
    assert [p.exit_layer for p in predictions] == exit_layer.tolist()
    torch.testing.assert_close(torch.tensor([p.logits for p in predictions]), logits)
    labels = ["negative", "positive"]
    assert [p.label for p in predictions] == [labels[i] for i in logits.argmax(-1).tolist()]


@pytest.mark.parametrize("batch_size", [1, 2, 5, 64])
def test_batch_size_does_not_change_results(engine, batch_size):
    expected = engine.predict(SENTENCES, batch_size=1)
    actual = engine.predict(SENTENCES, batch_size=batch_size)
    assert [(p.label, p.exit_layer) for p in actual] == [(p.label, p.exit_layer) for p in expected]


@pytest.fixture
def passes(monkeypatch):
    """Counts forward passes (calls of any engine's loop); ``passes[0]``."""
    count = [0]
    call = DeviceLoop.__call__

    def counted(self, *args):
        count[0] += 1
        return call(self, *args)

    monkeypatch.setattr(DeviceLoop, "__call__", counted)
    return count


LONG_AND_SHORT = [" ".join(["a gorgeous , witty film"] * 9), *SENTENCES[:6]]


def test_a_batch_cut_for_padding_gives_the_same_results(engine, tokenizer, passes):
    """Short sentences beside long ones: the engine runs them as separate passes on CPU (the
    cut saves more than the executor's ``split_cost`` padded tokens), each row's result the
    same as alone."""
    texts = LONG_AND_SHORT
    lengths = encode(tokenizer, texts, None, engine.max_length).lengths
    expected = length_sorted_batches(lengths, len(texts), engine.split_cost)
    assert len(expected) > 1
    batched = engine.predict(texts, batch_size=len(texts))
    assert passes[0] == len(expected)
    for text, p in zip(texts, batched, strict=True):
        alone = engine.predict(text)
        assert (p.label, p.exit_layer) == (alone.label, alone.exit_layer)
        assert p.logits == pytest.approx(alone.logits, abs=1e-5)


@pytest.mark.parametrize("split_cost", [0.0, 40.0, math.inf])
def test_split_cost_sets_where_batches_are_cut(tiny_ckpt, tokenizer, passes, split_cost):
    """``Engine(split_cost=)`` and the settable attribute decide the passes (as
    :func:`length_sorted_batches` cuts), not the results."""
    engine = Engine(tiny_ckpt, split_cost=split_cost)
    assert engine.split_cost == engine._executor.split_cost == split_cost
    lengths = encode(tokenizer, LONG_AND_SHORT, None, engine.max_length).lengths
    cut = engine.predict(LONG_AND_SHORT, batch_size=len(LONG_AND_SHORT))
    assert passes[0] == len(length_sorted_batches(lengths, len(lengths), split_cost))
    assert passes[0] == {0.0: len(set(lengths)), math.inf: 1}.get(split_cost, 2)
    engine.split_cost = math.inf
    whole = engine.predict(LONG_AND_SHORT, batch_size=len(LONG_AND_SHORT))
    assert [(p.label, p.exit_layer) for p in cut] == [(p.label, p.exit_layer) for p in whole]


def test_full_depth_evaluation_cuts_batches_as_predict_does(tiny_ckpt, tokenizer, monkeypatch):
    """Evaluation and calibration (every exit at full depth through the engine's executor) cut
    where the engine's ``split_cost`` says, with the logits of the uncut batch."""
    lengths = encode(tokenizer, LONG_AND_SHORT, None, 64).lengths
    logits = {}
    for split_cost in (0.0, math.inf):
        engine = Engine(tiny_ckpt, split_cost=split_cost)
        executor, calls = engine._executor, []
        embed = executor.embed
        monkeypatch.setattr(executor, "embed", lambda *a, e=embed, c=calls: c.append(1) or e(*a))
        logits[split_cost] = all_exit_logits(
            engine.model, tokenizer, LONG_AND_SHORT, None, 64, executor=executor
        )
        assert len(calls) == len(length_sorted_batches(lengths, 64, split_cost))
    assert len(set(lengths)) > 1
    torch.testing.assert_close(logits[0.0], logits[math.inf], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad", [-1.0, math.nan, "many"])
def test_a_bad_split_cost_is_refused_and_the_engine_kept(tiny_ckpt, bad):
    with pytest.raises(ValueError, match=r"split_cost .* must be a number of padded tokens >= 0"):
        Engine(tiny_ckpt, split_cost=bad)
    engine = Engine(tiny_ckpt)
    default = engine.split_cost
    with pytest.raises(ValueError, match="split_cost"):
        engine.split_cost = bad
    assert engine.split_cost == default
    assert engine.predict(SENTENCES[0]).label in ("negative", "positive")


def test_sentence_pairs(engine):
    pair = ("a man is playing a guitar .", "someone plays an instrument .")
    one = engine.predict(pair)
    assert one.label in ("negative", "positive")
    assert engine.predict([pair, pair])[1].logits == pytest.approx(one.logits, abs=1e-5)


def test_policy_override_and_defaults(tiny_ckpt):
    assert Engine(tiny_ckpt).policy.threshold == 0.4  # the checkpoint's default
    assert Engine(tiny_ckpt, threshold=0.1).policy.threshold == 0.1
    full = Engine(tiny_ckpt, policy="none").predict(SENTENCES)
    assert {p.exit_layer for p in full} == {4}
    pcee = Engine(tiny_ckpt, policy="pcee", threshold=0.75, patience=2)
    assert pcee.policy.patience == 2
    with pytest.raises(ValueError, match="needs a threshold"):
        Engine(tiny_ckpt, policy="normalized_entropy")  # no calibration in the tiny checkpoint


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"policy": "fastest"}, ValueError, "unknown policy 'fastest'"),
        ({"threshold": 2.0}, ValueError, "out of range"),
        ({"threshold": -1.0}, ValueError, "out of range"),
        ({"device": "tpu"}, ValueError, "unknown device 'tpu'"),
        ({"device": "cuda:7"}, ValueError, "not available"),
        ({"max_length": 1000}, ValueError, "max_length=1000"),
    ],
)
def test_bad_engine_arguments(tiny_ckpt, kwargs, error, message):
    with pytest.raises(error, match=message):
        Engine(tiny_ckpt, **kwargs)


@pytest.mark.parametrize(
    ("inputs", "error", "message"),
    [
        ("", ValueError, "input is empty or whitespace-only"),
        ("  \t\n", ValueError, "input is empty or whitespace-only"),
        (42, TypeError, "got int"),
        (["fine", None], TypeError, r"inputs\[1\] must be a str"),
        (["fine", "ok", " "], ValueError, r"inputs\[2\] is empty"),
        (("a", 3), TypeError, r"input\[1\] must be a str"),
        (("a", "b", "c"), TypeError, "pair"),
        ([("a", "b"), "c"], ValueError, "mix of single texts"),
    ],
)
def test_bad_input_then_engine_still_works(engine, inputs, error, message):
    with pytest.raises(error, match=message):
        engine.predict(inputs)
    assert engine.predict("still works").label in ("negative", "positive")


def test_bad_batch_size(engine):
    with pytest.raises(ValueError, match="batch_size"):
        engine.predict("x", batch_size=0)


def test_long_input_is_truncated_with_a_warning(engine):
    long_text = "good " * 500
    with pytest.warns(UserWarning, match=r"longer than 64 tokens were truncated \(indices \[1\]\)"):
        predictions = engine.predict(["short", long_text])
    truncated = engine.predict(" ".join(["good"] * 62))  # 62 words + [CLS] + [SEP] = 64
    assert predictions[1].logits == pytest.approx(truncated.logits, abs=1e-5)


def test_policy_keyword_parameters(tiny_ckpt):
    assert {
        p.exit_layer for p in Engine(tiny_ckpt, policy="budget", layer=2).predict(SENTENCES)
    } == {2}
    with pytest.raises(ValueError, match="does not take"):
        Engine(tiny_ckpt, policy="budget", layer=2, window=3)
    with pytest.raises(ValueError, match="LTE module"):
        Engine(tiny_ckpt, policy="lte", threshold=0.5)


POLICY_PARAMS = {
    "entropy": {"threshold": 0.5},
    "normalized_entropy": {"threshold": 0.8},
    "pcee": {"threshold": 0.75, "patience": 2},
    "max_prob": {"threshold": 0.75},
    "patience": {"patience": 1},
    "budget": {"layer": 3},
    "mpee": {"threshold": 0.3},
    "elbert": {"threshold": 0.3},
    "elbert-stable": {"threshold": 0.3, "window": 3, "window_test": "stable"},
    "elbert-range": {"threshold": 0.3, "window_test": "range", "window_range": 0.05},
    "none": {},
}


@pytest.mark.skipif(not HAS_C, reason=f"C++ extension not available: {LOAD_ERROR}")
@pytest.mark.parametrize("name", POLICY_PARAMS)
def test_every_policy_runs_the_compiled_op_without_warning(tiny_ckpt, name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine = Engine(tiny_ckpt, policy=name.split("-")[0], **POLICY_PARAMS[name])
        assert engine.backend == "cpp"
        assert Engine(tiny_ckpt).backend == "cpp"  # the checkpoint's default policy


@pytest.mark.parametrize("name", POLICY_PARAMS)
def test_backends_agree(tiny_ckpt, name):
    params = POLICY_PARAMS[name]
    name = name.split("-")[0]
    reference = Engine(tiny_ckpt, policy=name, backend="reference", **params)
    assert reference.backend == "reference"
    default = Engine(tiny_ckpt, policy=name, **params)  # the fused op
    expected = reference.predict(SENTENCES, batch_size=3)
    actual = default.predict(SENTENCES, batch_size=3)
    assert [p.exit_layer for p in actual] == [p.exit_layer for p in expected]
    torch.testing.assert_close(
        torch.tensor([p.logits for p in actual]), torch.tensor([p.logits for p in expected])
    )
