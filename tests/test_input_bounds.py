"""Inputs are cut by characters before tokenization without changing the tokens the engine
keeps (checked against untruncated tokenization), and invalid Unicode is named (issue 16)."""

import csv

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from eeengine import Engine
from eeengine.batching import collate, encode
from eeengine.checkpoint import load_checkpoint
from eeengine.data import DATA_DIR
from eeengine.inputs import char_limit, normalize_inputs
from eeengine.runtime import early_exit_forward
from tests.conftest import SENTENCES


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    return Engine(tiny_ckpt, executor="torch")


def _truncated(tokenizer, texts, pairs, max_length):
    return tokenizer(texts, pairs, truncation=True, max_length=max_length)["input_ids"]


def _cut(texts, max_length):
    return [text[: char_limit(max_length)] for text in texts]


def _cut_pairs(first, second, max_length):
    """The texts and text pairs as ``Engine.predict`` cuts them."""
    examples, _ = normalize_inputs(list(zip(first, second, strict=True)), char_limit(max_length))
    return [text for text, _ in examples], [pair for _, pair in examples]


@pytest.mark.parametrize("max_length", [8, 64])
def test_cut_keeps_the_tokens_of_long_reviews(tokenizer, max_length):
    with open(DATA_DIR / "IMDB-long" / "reviews.tsv", newline="", encoding="utf-8") as f:
        texts = [row[0] for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)][1:301]
    assert sum(len(t) > char_limit(max_length) for t in texts) > 100  # the cut does happen
    full = _truncated(tokenizer, texts, None, max_length)
    assert _truncated(tokenizer, _cut(texts, max_length), None, max_length) == full


@pytest.mark.parametrize("max_length", [8, 16])
def test_cut_keeps_the_tokens_of_sentence_pairs(tokenizer, max_length):
    """Equal unless both texts are cut: then which one keeps the odd token of the split
    depends on which is longer uncut (see eeengine.inputs)."""
    with open(DATA_DIR / "RTE" / "dev.tsv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    limit = char_limit(max_length)
    rows = [row for row in rows if min(len(row[1]), len(row[2])) <= limit]
    first, second = [row[1] for row in rows], [row[2] for row in rows]
    cut_first, cut_second = _cut_pairs(first, second, max_length)
    assert cut_first != first  # the cut does happen
    full = _truncated(tokenizer, first, second, max_length)
    assert _truncated(tokenizer, cut_first, cut_second, max_length) == full


WORD = st.text(
    st.characters(codec="utf-8", categories=("L", "N", "P", "S")), min_size=1, max_size=12
)
SPACE = st.sampled_from([" ", "  ", "\n", " \t ", ". "])


@st.composite
def texts(draw):
    words = draw(st.lists(WORD, min_size=1, max_size=120))
    return "".join(word + draw(SPACE) for word in words)


@settings(max_examples=60, deadline=None)
@given(first=texts(), second=st.none() | texts(), max_length=st.integers(3, 24))
def test_cut_keeps_the_tokens_of_any_wordy_text(tokenizer, first, second, max_length):
    """Text of at most 12-character words and short separators averages well under
    CHARS_PER_TOKEN characters per token, so the cut never changes the kept tokens."""
    assume(second is None or min(len(first), len(second)) <= char_limit(max_length))
    if second is None:
        cut_first, pairs, cut_pairs = _cut([first], max_length), None, None
    else:
        pairs = [second]
        cut_first, cut_pairs = _cut_pairs([first], pairs, max_length)
    full = _truncated(tokenizer, [first], pairs, max_length)
    assert _truncated(tokenizer, cut_first, cut_pairs, max_length) == full


def test_a_cut_text_stays_the_longer_one_of_its_pair(tokenizer):
    """Cut to char_limit alone, the first text (29 tokens) would have as many tokens as the
    second (28), and the odd token of the split would move to the second."""
    first = ["0 0 0 0 0 0 0 0 0000000 0000000\u0193 000000002 0000000\u0193\u3400 0:0:00002:0: "]
    second = ["0 0 0 0:0: 0:0: 0:0:0 0:0:0:0 0000000000 "]
    assert len(first[0]) > char_limit(4) >= len(second[0])
    naive = _truncated(tokenizer, _cut(first, 4), _cut(second, 4), 4)
    full = _truncated(tokenizer, first, second, 4)
    assert naive != full  # the plain cut moves the odd token
    assert _truncated(tokenizer, *_cut_pairs(first, second, 4), 4) == full


def test_engine_predicts_on_the_untruncated_tokens(engine, tiny_ckpt, tokenizer):
    """A 30,000-character review: the engine's answer equals the model run on the untruncated
    tokenization truncated to max_length (64)."""
    text = " ".join(SENTENCES * 400)
    assert len(text) > 10 * char_limit(64)
    ckpt = load_checkpoint(tiny_ckpt)
    batch = collate(encode(tokenizer, [text], None, 64), [0], tokenizer.pad_token_id)
    expected = early_exit_forward(ckpt.model, engine.policy, *batch)
    with pytest.warns(UserWarning, match="truncated"):
        prediction = engine.predict(text)
    assert prediction.exit_layer == int(expected.exit_layer[0])
    torch.testing.assert_close(torch.tensor(prediction.logits), expected.logits[0])


@pytest.mark.parametrize("text", ["x" * 10_000_000, "ab " * 3_333_333])
def test_ten_megabyte_inputs_read_only_the_characters_they_need(engine, text):
    examples, _ = normalize_inputs([text], char_limit(engine.max_length))
    assert len(examples[0][0]) == char_limit(engine.max_length)
    with pytest.warns(UserWarning, match="truncated") if " " in text else _no_warning():
        prediction = engine.predict(text)
    assert prediction.label in engine.label_names


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ("\ud800", r"input is not valid Unicode: surrogates not allowed U\+D800 at character 0"),
        (["ok", "fine \udfff"], r"inputs\[1\] is not valid Unicode: .* U\+DFFF at character 5"),
        ([("ok", "ok \ud83d")], r"inputs\[0\]\[1\] is not valid Unicode: .* at character 3"),
    ],
)
def test_lone_surrogate_names_the_input(engine, inputs, message):
    with pytest.raises(ValueError, match=message):
        engine.predict(inputs)
    assert engine.predict("a gorgeous movie").label in engine.label_names


def test_valid_astral_characters_are_accepted(engine):
    assert engine.predict("great film \U0001f600 \u00e9t\u00e9").label in engine.label_names
