"""Fuzzing (issue 16): broken checkpoints and random inputs end in a documented exception or a
valid prediction; the engine keeps answering; nothing on disk changes.

The property is in :mod:`tests.fuzz_harness`, the damage in :mod:`tests.fuzz_damage`, the inputs in
:mod:`tests.fuzz_inputs`; ``benchmarks/fuzz_campaign.py``
runs the same cases by the hundred thousand.
"""

import random
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from eeengine import Engine
from eeengine.checkpoint import CALIBRATION
from tests.fuzz_damage import damage, edit_json
from tests.fuzz_harness import (
    DiskGuard,
    KnownAnswer,
    build_checkpoints,
    cli_case,
    is_failure,
    load_case,
    outcome_kind,
    predict_case,
)
from tests.fuzz_inputs import random_argv, random_input


def fuzz(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
        database=None,
    )


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    checkpoints = build_checkpoints(root / "checkpoints")
    return root, checkpoints


@pytest.fixture(scope="module")
def known(fuzz_root):
    return KnownAnswer(fuzz_root[1]["main"])


@pytest.fixture(scope="module")
def guard(fuzz_root):
    return DiskGuard(fuzz_root[0] / "checkpoints")


def _check(outcome, known, guard, what):
    assert not is_failure(outcome), f"{what}: {outcome}"
    assert known.check() is None, what
    assert guard.changes() == [], what


def _damaged_case(fuzz_root, known, guard, seed, damage_fn):
    root, checkpoints = fuzz_root
    target = root / f"case-{seed}"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(checkpoints["main"], target)
    rng = random.Random(seed)
    what = damage_fn(target, rng)
    before = DiskGuard(target)
    outcome = load_case(target, rng)
    _check(outcome, known, guard, what)
    assert before.changes() == [], f"{what}: the engine wrote to the checkpoint"
    shutil.rmtree(target)
    return outcome


@fuzz(60)
@given(seed=st.integers(0, 2**32 - 1))
def test_damaged_checkpoint(fuzz_root, known, guard, seed):
    others = [fuzz_root[1]["roberta"], fuzz_root[1]["small_vocab"]]
    _damaged_case(fuzz_root, known, guard, seed, lambda path, rng: damage(path, others, rng))


@fuzz(40)
@given(
    seed=st.integers(0, 2**32 - 1),
    name=st.sampled_from(["eeengine.json", "config.json", CALIBRATION]),
)
def test_random_json_edits(fuzz_root, known, guard, seed, name):
    _damaged_case(
        fuzz_root, known, guard, seed, lambda path, rng: f"{name}: {edit_json(path / name, rng)}"
    )


@pytest.fixture(scope="module")
def engine(fuzz_root):
    return Engine(fuzz_root[1]["main"], executor="torch")


@fuzz(200)
@given(seed=st.integers(0, 2**32 - 1))
def test_random_python_values(engine, known, guard, seed):
    rng = random.Random(seed)
    inputs = random_input(rng)
    batch_size = rng.choice((32, 32, 1, 3, 0, -1, 2.0, "8", None))
    outcome = predict_case(engine, inputs, batch_size)
    _check(outcome, known, guard, f"{inputs!r:.200}, batch_size={batch_size!r}")


TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=60)


@fuzz(150)
@given(inputs=TEXT | st.tuples(TEXT, TEXT) | st.lists(TEXT | st.tuples(TEXT, TEXT), max_size=6))
def test_random_unicode(engine, known, guard, inputs):
    """Any code point (lone surrogates, controls, unassigned) in texts, pairs and lists."""
    _check(predict_case(engine, inputs), known, guard, repr(inputs))


@fuzz(25)
@given(seed=st.integers(0, 2**32 - 1))
@example(seed=33)  # texts holding \x0b and U+2028: answers are told apart by their prefix
def test_cli(fuzz_root, known, guard, seed):
    rng = random.Random(seed)
    argv = random_argv(rng, fuzz_root[1]["main"])
    _check(cli_case(argv, ["negative", "positive"]), known, guard, repr(argv))


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"label": "neutral"}, "label 'neutral' not in"),
        ({"probs": {"negative": float("nan"), "positive": 0.5}}, "probs"),
        ({"probs": {"negative": 0.7, "positive": 0.7}, "score": 0.7}, "probs sum to 1.4"),
        ({"logits": [float("inf"), 0.0]}, "logits"),
        ({"exit_layer": 5}, "exit_layer 5"),
    ],
)
def test_the_property_catches_garbage(engine, change, problem):
    """The checker the fuzz cases rely on rejects each kind of garbage."""
    from dataclasses import replace

    from tests.fuzz_harness import check_prediction

    good = engine.predict("a fine film")
    assert check_prediction(good, engine.label_names, engine.num_layers) == "prediction"
    outcome = check_prediction(replace(good, **change), engine.label_names, engine.num_layers)
    assert outcome.startswith("FAIL garbage") and problem in outcome


def test_nothing_on_disk_changed(guard):
    """Last: every fuzzed checkpoint's files are byte for byte what they were."""
    assert guard.changes(content=True) == []


@pytest.mark.parametrize(
    ("outcome", "kind"),
    [
        ("load: FAIL undocumented KeyError: 'avg_exit_layer'", "load: FAIL undocumented KeyError"),
        ("predict: FAIL unnamed CheckpointError: x: y", "predict: FAIL unnamed CheckpointError"),
        ("loaded: FAIL garbage: probs [nan] / prediction", "loaded: FAIL garbage"),
        ("FAIL garbage: label 'x' not in ['a']", "FAIL garbage"),
        ("FAIL known input: now ('a', 2, [0.5], {'a': 1.0})", "FAIL known input"),
    ],
)
def test_the_campaign_counts_every_failure(outcome, kind):
    """A FAIL after a stage prefix is a failure too: the campaign once reported "failures": 0
    over checkpoint cases whose outcomes were ``"load: FAIL undocumented ..."``."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from fuzz_campaign import record

    outcomes, failures = Counter(), []
    record(outcome, {"case": 7, "what": "calibration.json: json edit"}, outcomes, failures)
    record("load: named CheckpointError", {"case": 8, "what": "-"}, outcomes, failures)
    record("loaded: prediction", {"case": 9, "what": "-"}, outcomes, failures)
    assert is_failure(outcome)
    assert failures == [{"case": 7, "what": "calibration.json: json edit", "outcome": outcome}]
    assert outcomes == {kind: 1, "load: named CheckpointError": 1, "loaded: prediction": 1}
    assert outcome_kind(outcome) == kind
