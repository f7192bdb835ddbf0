"""The few-shot baseline: frozen mean-pooled embeddings and a linear probe on them."""

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from eeengine.data import Split
from eeengine.training.baseline import frozen_embeddings, linear_probe
from tests.conftest import SENTENCES

pytest.importorskip("sklearn")


def test_embeddings_are_the_mean_of_real_tokens(tiny_bert_dir):
    """Batched with padding equals each text alone, where the mean is over every token."""
    batched = frozen_embeddings(tiny_bert_dir, SENTENCES, batch_size=8)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    model = AutoModel.from_pretrained(tiny_bert_dir).eval()
    assert batched.shape == (len(SENTENCES), model.config.hidden_size)
    with torch.inference_mode():
        for i, text in enumerate(SENTENCES):
            alone = model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0].mean(0)
            torch.testing.assert_close(batched[i], alone, rtol=1e-4, atol=1e-5)


def test_linear_probe_fits_what_it_can_separate(tiny_bert_dir):
    """Eight distinct texts in 32 dimensions are linearly separable: scored on its own training
    rows the probe is perfect, and a regression probe gets a positive correlation."""
    labels = [i % 2 for i in range(len(SENTENCES))]
    split = Split(list(SENTENCES), None, labels)
    assert linear_probe(tiny_bert_dir, split, split, "accuracy") == 100.0
    values = Split(list(SENTENCES), None, [float(i) for i in range(len(SENTENCES))])
    assert linear_probe(tiny_bert_dir, values, values, "pearson", regression=True) > 50.0
