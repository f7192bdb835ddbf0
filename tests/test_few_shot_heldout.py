"""benchmarks/few_shot.py: the held-out sentences a few-shot change is chosen on are whole
training sentences (no other row's n-gram) that share no word n-gram with the trained rows."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import few_shot  # noqa: E402

from eeengine.data import Split  # noqa: E402

# Two parse trees as SST-2 stores them: every phrase is a row, the sentence is the root.
TRAIN = Split(
    texts=[
        "a gorgeous , witty film",
        "gorgeous , witty",
        "witty film",
        "a dull and tired plot",
        "dull and tired",
        "tired plot",
        "the best film of the year",
        "the best",
        "a gorgeous , witty film",  # a duplicate row
    ],
    text_pairs=None,
    labels=[1, 1, 1, 0, 0, 0, 1, 1, 1],
)


def test_only_whole_sentences_without_a_trained_phrase_qualify():
    subset = Split(["tired plot"], None, [0])
    # Roots: the three sentences; "a dull and tired plot" contains the trained "tired plot".
    held = few_shot.heldout_sentences(TRAIN, subset, 2, seed=0)
    assert held.texts == ["a gorgeous , witty film", "the best film of the year"]
    assert held.labels == [1, 1]


def test_a_trained_sentence_is_not_held_out():
    subset = Split(["the best film of the year"], None, [1])
    held = few_shot.heldout_sentences(TRAIN, subset, 2, seed=3)
    assert sorted(held.texts) == ["a dull and tired plot", "a gorgeous , witty film"]


def test_too_few_sentences_is_an_error():
    subset = Split(["film"], None, [1])  # in two of the three sentences
    with pytest.raises(ValueError, match="only 1 held-out sentences qualify, 2 asked"):
        few_shot.heldout_sentences(TRAIN, subset, 2, seed=0)


def test_pairs_exclude_the_trained_first_texts():
    train = Split(["p1", "p2", "p3"], ["h1", "h2", "h3"], [0, 1, 0])
    held = few_shot.heldout_sentences(train, Split(["p2"], ["h2"], [1]), 2, seed=0)
    assert held.texts == ["p1", "p3"] and held.text_pairs == ["h1", "h3"]
