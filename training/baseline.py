"""The few-shot baseline fine-tuning has to beat: a linear model on frozen, mean-pooled
embeddings of the base encoder (logistic regression for classification, ridge regression for
regression), fitted with scikit-learn on the same training rows.

It shows what fine-tuning a multi-exit model buys on a small data set (issue 15): with a few
hundred rows, a run that trains too little is beaten by this baseline.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

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
    :data:`eeengine.metrics.METRICS`): logistic regression (scikit-learn defaults, up to 2,000
    iterations) on standardized embeddings, or ridge regression for a regression task.

    Raises:
        ImportError: scikit-learn is not installed (``pip install scikit-learn``).
    """
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_train = frozen_embeddings(base_model, train.texts, train.text_pairs).numpy()
    x_dev = frozen_embeddings(base_model, dev.texts, dev.text_pairs).numpy()
    head = Ridge() if regression else LogisticRegression(max_iter=2000)
    probe = make_pipeline(StandardScaler(), head).fit(x_train, train.labels)
    predictions = probe.predict(x_dev).tolist()
    return METRICS[metric](predictions, dev.labels)
