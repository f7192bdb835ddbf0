"""The calibration slice of phrase-tree data (SST-2): whole sentences, none of their phrases
trained on.

SST-2's training rows are every phrase of the parse trees of its training sentences, the
sentences among them (Socher et al. 2013; here 67,349 rows from 6,885 sentences), while its dev
set holds whole sentences (``data/README.md``). A slice of random training rows is then mostly
short phrases (median 7 words; dev's sentences: 19), and the phrases above and below each one
in its tree are trained on, so the slice scores what the model has seen: a run with trained word
embeddings scored 90.55 % at layer 1 on such a slice and 82.22 % on dev, where the same recipe
with frozen ones scored 85.55 / 79.47, and both 94.60 at full depth on the slice against
88.88 / 89.91 on dev (RESULTS.md, "A slice of whole sentences").

:func:`sentence_holdout_split` holds out whole sentences instead (rows no other row contains),
stratified and seeded as :func:`eeengine.data.holdout_split`, and drops from training every row
whose words are a contiguous part of a held-out sentence.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from eeengine.data import Split, calibration_size, held_out_rows, subset


def spans(words: Sequence[str]) -> Iterator[str]:
    """Every contiguous run of ``words`` (the whole included), joined by single spaces."""
    for start in range(len(words)):
        for stop in range(start + 1, len(words) + 1):
            yield " ".join(words[start:stop])


def whole_sentences(texts: Sequence[str]) -> list[int]:
    """Indices of the rows whose words are no contiguous part of another row's (the first of
    equal rows), in row order: the sentences of a phrase-tree data set. Words are split on
    whitespace; O(sum of squared row lengths) (SST-2's training rows: about 2 s)."""
    first: dict[str, int] = {}
    for i, text in enumerate(texts):
        first.setdefault(" ".join(text.split()), i)
    inside = set()
    for text in first:
        words = text.split()
        inside.update(span for span in spans(words) if span != text and span in first)
    return [i for text, i in first.items() if text not in inside]


def sentence_holdout_split(split: Split, seed: int, stratify: bool) -> tuple[Split, Split, int]:
    """(training rows, held-out sentences, training rows dropped) of a phrase-tree split.

    :func:`eeengine.data.calibration_size` of the sentences (:func:`whole_sentences`) are held
    out (stratified by class when ``stratify``, seeded), and every row whose words are a
    contiguous part of a held-out sentence (its phrases, and copies of it) leaves training.
    Both parts keep the original row order.

    Raises:
        ValueError: fewer than 4 whole sentences (none can be held out).
    """
    sentences = whole_sentences(split.texts)
    size = calibration_size(len(sentences))
    labels = [split.labels[i] for i in sentences]
    held = sorted(sentences[j] for j in held_out_rows(labels, size, seed, stratify))
    inside = {span for i in held for span in spans(split.texts[i].split())}
    train = [i for i, text in enumerate(split.texts) if " ".join(text.split()) not in inside]
    dropped = len(split.texts) - len(held) - len(train)
    return subset(split, train), subset(split, held), dropped
