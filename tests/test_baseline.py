"""The few-shot baseline: frozen mean-pooled embeddings and a linear probe on them."""

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from eeengine.data import Split
from eeengine.training.baseline import fit_probe, frozen_embeddings, linear_probe
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


def _planted(rows: int, seed: int, signal: float) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` x 384 standard-normal features, class 1 shifted along the diagonal so that the
    two class means are ``signal`` apart (balanced labels): Bayes accuracy Phi(signal / 2)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(rows) % 2
    features = rng.normal(size=(rows, 384)) + signal * labels[:, None] / np.sqrt(384)
    return features, labels


def test_probe_learns_a_spread_signal_and_nothing_from_noise():
    """200 rows, 384 dimensions, class means 3 apart (Bayes accuracy Phi(1.5) = 93.3 %): the
    cross-validated probe is well above chance and no worse than scikit-learn's default C = 1
    on the same rows; on labels that carry no signal it stays at chance."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_train, y_train = _planted(200, 0, signal=3.0)
    x_test, y_test = _planted(2000, 1, signal=3.0)
    tuned = fit_probe(x_train, y_train).score(x_test, y_test)
    default = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    assert tuned > 0.8
    assert tuned >= default.fit(x_train, y_train).score(x_test, y_test) - 0.01
    x_noise, y_noise = _planted(200, 2, signal=0.0)
    assert 0.4 < fit_probe(x_noise, y_noise).score(x_test, y_test) < 0.6
