"""Validation of what users pass to ``Engine.predict``, and the character cut that bounds the
cost of an input before it is tokenized.

The cut: a text is cut to :func:`char_limit` ``(max_length) = CHARS_PER_TOKEN * max_length``
characters before tokenization, so a 10 MB input costs what a text of that many characters
does instead of seconds of tokenizing tokens that truncation then drops. Every token spans at
least one character, and a tokenizer splits words at whitespace, so the tokens that end before
the last whitespace ahead of the cut are exactly those of the uncut text. The cut therefore
leaves the ``max_length`` tokens the engine keeps unchanged whenever the first
``CHARS_PER_TOKEN * max_length`` characters hold ``max_length`` such tokens, i.e. whenever they
average fewer than about ``CHARS_PER_TOKEN`` characters per token. English averages 4 to 5
(all-MiniLM-L6-v2's WordPiece on the SST-2 and IMDB files in ``data/``); only texts made of
long whitespace runs, characters the tokenizer drops, or words so long that they become one
[UNK] (over 100 characters for WordPiece) can lose tokens to the cut.

Pairs are truncated longest-first, and which text keeps the odd token of an odd split
(``max_length - 3`` tokens for two long texts) depends on which one has more tokens. When only
one text of a pair is over the limit, it keeps ``CHARS_PER_TOKEN`` more characters for each
UTF-8 byte of the other text (:func:`pair_char_limits`): no tokenizer here makes more tokens
than a text has bytes, so by the bound above the cut text still has more tokens than the other,
as it had uncut, and the pair keeps its tokens. A pair whose two texts are both cut keeps the
same number of tokens as uncut, but the odd token may move to the other text.
"""

from __future__ import annotations

Example = tuple[str, str | None]

# Characters kept per token of max_length (see the module docstring for the bound).
CHARS_PER_TOKEN = 16


def char_limit(max_length: int) -> int:
    """Characters of a text (of each text of a pair) read for ``max_length`` tokens."""
    return CHARS_PER_TOKEN * max_length


def pair_char_limits(first: str, second: str, max_chars: int) -> tuple[int, int]:
    """Characters read of each text of a pair, for a cut of ``max_chars`` per text.

    A text over ``max_chars`` beside one that is not keeps ``max_chars`` plus
    ``CHARS_PER_TOKEN`` per UTF-8 byte of the other, so that it stays the one with more
    tokens (module docstring); otherwise each keeps ``max_chars``.
    """
    if len(first) > max_chars >= len(second):
        return max_chars + CHARS_PER_TOKEN * _utf8_length(second), max_chars
    if len(second) > max_chars >= len(first):
        return max_chars, max_chars + CHARS_PER_TOKEN * _utf8_length(first)
    return max_chars, max_chars


def _utf8_length(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def check_batch_size(batch_size: object) -> None:
    """Raises ValueError unless ``batch_size`` is a positive int."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def normalize_inputs(inputs: object, max_chars: int | None = None) -> tuple[list[Example], bool]:
    """Turn ``str | (str, str) | list[str | (str, str)]`` into a list of (text, text_pair).

    Args:
        inputs: what the user passed.
        max_chars: cut each text to this many characters (:func:`char_limit`; the texts of a
            pair by :func:`pair_char_limits`); None: keep them whole.

    Returns:
        The examples and whether the caller passed a single input (so one Prediction, not a
        list, is returned).

    Raises:
        TypeError: an input that is not a string or a pair of strings (its index is named).
        ValueError: an empty or whitespace-only text, or one that is not valid Unicode (a lone
            surrogate such as "\\ud800" in the characters read; index and position named).
    """
    if isinstance(inputs, (str, tuple)):
        return [_example(inputs, None, max_chars)], True
    if not isinstance(inputs, list):
        raise TypeError(
            "inputs must be a str, a (str, str) pair or a list of them, "
            f"got {type(inputs).__name__}"
        )
    return [_example(item, index, max_chars) for index, item in enumerate(inputs)], False


def split_examples(examples: list[Example]) -> tuple[list[str], list[str] | None]:
    """The texts and the text pairs (None when no example has a pair) of ``examples``.

    Raises:
        ValueError: a mix of single texts and (text, text_pair) pairs.
    """
    texts = [text for text, _ in examples]
    pairs = [pair for _, pair in examples]
    if all(pair is None for pair in pairs):
        return texts, None
    if any(pair is None for pair in pairs):
        raise ValueError("mix of single texts and (text, text_pair) inputs in one call")
    return texts, pairs


def _example(item: object, index: int | None, max_chars: int | None) -> Example:
    where = "input" if index is None else f"inputs[{index}]"
    if isinstance(item, str):
        return _checked_text(item, where, max_chars), None
    if isinstance(item, tuple) and len(item) == 2:
        for part, text in enumerate(item):
            if not isinstance(text, str):
                raise TypeError(f"{where}[{part}] must be a str, got {type(text).__name__}")
        limits = (None, None) if max_chars is None else pair_char_limits(*item, max_chars)
        first, second = (
            _checked_text(text, f"{where}[{part}]", limit)
            for part, (text, limit) in enumerate(zip(item, limits, strict=True))
        )
        return first, second
    raise TypeError(f"{where} must be a str or a (str, str) pair, got {type(item).__name__}")


def _checked_text(text: str, where: str, max_chars: int | None) -> str:
    """The text cut to ``max_chars``; raises ValueError when it is empty or not Unicode."""
    if not text or text.isspace():  # isspace stops at the first other character: no copy
        raise ValueError(f"{where} is empty or whitespace-only")
    if max_chars is not None:
        text = text[:max_chars]
    if not text.isascii():  # a flag of the str object: free for ASCII text
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(
                f"{where} is not valid Unicode: {e.reason} U+{ord(text[e.start]):04X} at "
                f"character {e.start}"
            ) from None
    return text
