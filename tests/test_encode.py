"""eeengine.batching.encode runs the Rust tokenizer directly: the same token ids and token
type ids as the transformers tokenizer call it replaces, for texts and pairs, with and without
truncation, one input or many; and a call of transformers in between does not change it."""

from __future__ import annotations

import pytest

from eeengine.batching import encode, rust_tokenizer
from eeengine.data import get_task, load_split
from tests.conftest import SENTENCES


def transformers_encode(tokenizer, texts, pairs, max_length):
    enc = tokenizer(
        list(texts),
        None if pairs is None else list(pairs),
        truncation=max_length is not None,
        max_length=max_length,
        return_token_type_ids=True,
        return_attention_mask=False,
    )
    return enc["input_ids"], enc["token_type_ids"]


@pytest.mark.parametrize("max_length", [None, 8, 64])
@pytest.mark.parametrize("task", ["sst2", "rte"])
@pytest.mark.parametrize("count", [1, 2, 40])
def test_encode_equals_the_transformers_call(tokenizer, task, max_length, count):
    split = load_split(get_task(task), "dev")
    texts = split.texts[:count]
    pairs = None if split.text_pairs is None else split.text_pairs[:count]
    encoded = encode(tokenizer, texts, pairs, max_length)
    expected = transformers_encode(tokenizer, texts, pairs, max_length)
    assert (encoded.input_ids, encoded.token_type_ids) == expected
    if max_length is not None:
        assert max(encoded.lengths) <= max_length
        assert max(len(ids) for ids in transformers_encode(tokenizer, texts, pairs, None)[0]) > 8


def test_the_copy_keeps_its_settings(tokenizer):
    long = " ".join(SENTENCES)
    untruncated = encode(tokenizer, [long], None, None)
    transformers_encode(tokenizer, [long], None, 8)  # leaves the original truncating at 8
    assert encode(tokenizer, [long], None, None) == untruncated
    assert len(untruncated.input_ids[0]) > 8
    assert rust_tokenizer(tokenizer, None) is rust_tokenizer(tokenizer, None)
    assert rust_tokenizer(tokenizer, 8) is not rust_tokenizer(tokenizer, None)
