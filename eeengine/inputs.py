"""Validation of what users pass to ``Engine.predict``."""

from __future__ import annotations

Example = tuple[str, str | None]


def normalize_inputs(inputs: object) -> tuple[list[Example], bool]:
    """Turn ``str | (str, str) | list[str | (str, str)]`` into a list of (text, text_pair).

    Returns:
        The examples and whether the caller passed a single input (so one Prediction, not a
        list, is returned).

    Raises:
        TypeError: an input that is not a string or a pair of strings (its index is named).
        ValueError: an empty or whitespace-only text (its index is named).
    """
    if isinstance(inputs, (str, tuple)):
        return [_example(inputs, None)], True
    if not isinstance(inputs, list):
        raise TypeError(
            "inputs must be a str, a (str, str) pair or a list of them, "
            f"got {type(inputs).__name__}"
        )
    return [_example(item, index) for index, item in enumerate(inputs)], False


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


def _example(item: object, index: int | None) -> Example:
    where = "input" if index is None else f"inputs[{index}]"
    if isinstance(item, str):
        _check_text(item, where)
        return item, None
    if isinstance(item, tuple) and len(item) == 2:
        for part, text in enumerate(item):
            if not isinstance(text, str):
                raise TypeError(f"{where}[{part}] must be a str, got {type(text).__name__}")
            _check_text(text, f"{where}[{part}]")
        return item[0], item[1]
    raise TypeError(f"{where} must be a str or a (str, str) pair, got {type(item).__name__}")


def _check_text(text: str, where: str) -> None:
    if not text.strip():
        raise ValueError(f"{where} is empty or whitespace-only")
