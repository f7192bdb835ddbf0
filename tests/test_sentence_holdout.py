"""The calibration slice of phrase-tree data (SST-2): whole sentences, and none of their phrases
trained on; checked against plain substring tests, on a hand-made tree and on SST-2 itself."""

import random
import statistics

import pytest

from eeengine.data import Split, calibration_size
from eeengine.training import TrainConfig
from eeengine.training.calibration_slice import calibration_slice
from eeengine.training.plan import load_dataset, split_calibration
from eeengine.training.sentence_holdout import sentence_holdout_split, whole_sentences

# Eight sentences (4 per class) with some of their phrases, as SST-2 lists them; "film" is
# in two trees, "filmmaker" contains "film" only as characters, not as a word.
TREES = [
    ("the film is good", 1, ["the film", "is good", "good", "film"]),
    ("a dull and long movie", 0, ["a dull", "dull and long", "long movie", "movie"]),
    ("the filmmaker is clever", 1, ["the filmmaker", "clever"]),
    ("a film without a point", 0, ["without a point", "a point", "film"]),
    ("warm and funny", 1, ["warm", "funny"]),
    ("too slow to care about", 0, ["too slow", "care about"]),
    ("one of the best of the year", 1, ["the best", "of the year"]),
    ("nothing works here", 0, ["nothing works", "works here"]),
]


def _tree_split() -> Split:
    texts, labels = [], []
    for sentence, label, phrases in TREES:
        for text in [*phrases, sentence + " "]:  # SST-2's rows end with a space
            texts.append(text)
            labels.append(label)
    return Split(texts, None, labels)


def _inside(phrase: str, sentence: str) -> bool:
    """``phrase``'s words are a contiguous part of ``sentence``'s: the plain substring test."""
    return f" {' '.join(phrase.split())} " in f" {' '.join(sentence.split())} "


def test_whole_sentences_are_the_rows_no_other_row_contains():
    split = _tree_split()
    found = [split.texts[i].strip() for i in whole_sentences(split.texts)]
    assert found == [sentence for sentence, _, _ in TREES]
    # and by the plain test, on every row
    expected = [
        i
        for i, text in enumerate(split.texts)
        if not any(_inside(text, other) and text != other for other in split.texts)
    ]
    assert whole_sentences(split.texts) == expected
    assert whole_sentences(["a b", "a b ", "c"]) == [0, 2]  # equal rows: the first


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_held_out_sentences_take_their_phrases_out_of_training(seed):
    split = _tree_split()
    train, held, dropped = sentence_holdout_split(split, seed, stratify=True)
    assert len(held.texts) == calibration_size(len(TREES)) == 2
    assert sorted(held.labels) == [0, 1]  # stratified
    sentences = {sentence for sentence, _, _ in TREES}
    assert {text.strip() for text in held.texts} <= sentences
    for text in train.texts:
        assert not any(_inside(text, sentence) for sentence in held.texts)
    # every other row stays, in order, with its label
    expected = [
        (text, label)
        for text, label in zip(split.texts, split.labels, strict=True)
        if not any(_inside(text, sentence) for sentence in held.texts)
    ]
    assert list(zip(train.texts, train.labels, strict=True)) == expected
    assert dropped == len(split.texts) - len(train.texts) - len(held.texts) > 0
    assert sentence_holdout_split(split, seed, stratify=True) == (train, held, dropped)


def test_too_few_sentences_to_hold_out():
    with pytest.raises(ValueError, match="cannot hold out 0 of 3"):
        sentence_holdout_split(Split(["a", "b", "c"], None, [0, 1, 0]), 0, stratify=True)


def _sst2_config(**overrides) -> TrainConfig:
    return TrainConfig(base_model="unused", task="sst2", **overrides)


def test_sst2_calibrates_on_whole_sentences_it_never_trained_on():
    """SST-2's slice: whole training sentences (as long as dev's, unlike its phrases), none of
    whose phrases is a training row; the other tasks still hold out rows."""
    config = _sst2_config()
    data = load_dataset(config)
    train, held, source = split_calibration(config, data)
    sentences = whole_sentences(data.train.texts)
    assert len(held.texts) == calibration_size(len(sentences)) == 688
    assert source.startswith("688 whole training sentences held out (stratified, seed 42)")
    dropped = len(data.train.texts) - len(train.texts) - len(held.texts)
    assert f"{dropped} training phrases inside them not trained on" in source
    words = statistics.mean(len(text.split()) for text in held.texts)
    assert 17 < words < 23  # dev's sentences: 19.5 words; the training rows: 9.4
    assert statistics.mean(len(t.split()) for t in data.train.texts) < 10
    for sentence in random.Random(0).sample(held.texts, 40):  # the plain test, on a sample
        padded = f" {' '.join(sentence.split())} "
        assert not any(f" {' '.join(t.split())} " in padded for t in train.texts)
        assert not any(padded in f" {' '.join(t.split())} " for t in train.texts)
    rows = split_calibration(_sst2_config(calibration_holdout="rows"), data)
    assert len(rows[1].texts) == 2000 and len(rows[0].texts) == len(data.train.texts) - 2000
    mrpc = split_calibration(TrainConfig(base_model="unused", task="mrpc"), _load("mrpc"))
    assert mrpc[2].startswith("367 training rows held out")


def _load(task: str):
    return load_dataset(TrainConfig(base_model="unused", task=task))


def test_unknown_holdout_is_refused():
    config = _sst2_config(calibration_holdout="phrases")
    with pytest.raises(ValueError, match="unknown calibration_holdout 'phrases'"):
        split_calibration(config, _load("sst2"))


def test_checkpoints_from_before_the_sentence_slice_rebuild_their_rows():
    """A manifest whose training config predates ``calibration_holdout`` held out rows."""
    stored = {k: v for k, v in vars(_sst2_config()).items() if k != "calibration_holdout"}
    manifest = {
        "training": {
            "config": stored,
            "calibration_data": {
                "source": "2000 training rows held out (stratified, seed 42)",
                "examples": 2000,
            },
        }
    }
    rebuilt, source = calibration_slice(manifest, "old-ckpt")
    assert source == "2000 training rows held out (stratified, seed 42)"
    assert len(rebuilt.texts) == 2000
