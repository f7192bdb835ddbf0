"""The few-shot baseline fine-tuning has to beat: a linear model on frozen, mean-pooled
embeddings of the base encoder (logistic regression for classification, ridge regression for
regression), fitted with scikit-learn on the same training rows.

It shows what fine-tuning a multi-exit model buys on a small data set (issue 15): with a few
hundred rows, a run that trains too little is beaten by this baseline.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from eeengine.data import Split
from eeengine.metrics import METRICS


@torch.inference_mode()
def frozen_embeddings(
    base_model: str | Path,
    texts: Sequence[str],
    text_pairs: Sequence[str] | None = None,
    max_length: int = 128,
    batch_size: int = 64,
) -> torch.Tensor:
    """Mean-pooled last hidden states of the base encoder (Hugging Face ``AutoModel``, eval
    mode, real tokens only).

    Returns:
        (len(texts), hidden_size) float32.
    """
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model = AutoModel.from_pretrained(base_model).eval()
    out = []
    for start in range(0, len(texts), batch_size):
        end = start + batch_size
        batch = tokenizer(
            list(texts[start:end]),
            list(text_pairs[start:end]) if text_pairs is not None else None,
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.cat(out).float()


def linear_probe(
    base_model: str | Path, train: Split, dev: Split, metric: str, regression: bool = False
) -> float:
    """Fit the baseline on ``train`` and score it on ``dev`` by ``metric`` (a key of
    :data:`eeengine.metrics.METRICS`): logistic regression on standardized embeddings, or ridge
    regression for a regression task, with the L2 strength chosen by 5-fold cross-validation on
    the training rows (:func:`fit_probe`).

    Raises:
        ImportError: scikit-learn is not installed (``pip install scikit-learn``).
    """
    x_train = frozen_embeddings(base_model, train.texts, train.text_pairs).numpy()
    x_dev = frozen_embeddings(base_model, dev.texts, dev.text_pairs).numpy()
    probe = fit_probe(x_train, train.labels, regression)
    return METRICS[metric](probe.predict(x_dev).tolist(), dev.labels)


def fit_probe(features: np.ndarray, labels: Sequence, regression: bool = False):
    """A scikit-learn pipeline, standardization then logistic (or ridge) regression, fitted on
    ``features`` (rows, dims) float32. Its L2 strength is the best of a grid (C from 1e-6 to
    1e2; ridge alpha from 1e-3 to 1e5) by 5-fold cross-validation on these rows (stratified for
    classes): with a few hundred rows and 384 dimensions, scikit-learn's default C = 1
    overfits (600 SST-2 rows: 71.4 on dev at C = 1, 77.8 with C chosen this way). With fewer
    than 10 rows of some class there is nothing to cross-validate on: C = 1 (alpha = 1)."""
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    head = Ridge() if regression else LogisticRegression(max_iter=2000)
    pipeline = make_pipeline(StandardScaler(), head)
    if regression:
        grid, folds = {"ridge__alpha": np.logspace(-3, 5, 17)}, 5
    else:
        smallest = min(np.unique(np.asarray(labels), return_counts=True)[1])
        grid = {"logisticregression__C": np.logspace(-6, 2, 17)}
        folds = StratifiedKFold(5, shuffle=True, random_state=0) if smallest >= 10 else None
    if folds is None or len(labels) < 10:
        return pipeline.fit(features, labels)
    return GridSearchCV(pipeline, grid, cv=folds).fit(features, labels)
