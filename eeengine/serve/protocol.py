"""text-embeddings-inference's ``/predict`` request and response, and its errors.

Request (TEI's ``PredictRequest``): ``{"inputs": ..., "truncate": false, "raw_scores": false}``
where ``inputs`` is a text ``"a"``, one input given as a list (``["a"]``, or the pair
``["a", "b"]``), or a batch of them ``[["a"], ["a", "b"], ...]``.

Response (TEI's ``PredictResponse``): for one input, a list of ``{"score", "label"}``, one per
label, highest score first (softmax probabilities, or the raw logits with ``raw_scores``); for a
batch, one such list per input. eeengine adds ``"exit_layer"`` (1-based) to each element, so a
TEI client reads what it always reads.

Errors are TEI's ``{"error": message, "error_type": type}`` with TEI's status codes: 413
``validation`` (too many inputs, an input over ``--max-input-length`` without ``truncate``),
422 ``validation`` (a body that is not such JSON), 400 ``empty`` (no input, an empty text),
429 ``overloaded``, 503 ``unhealthy``.
"""

from __future__ import annotations

from pydantic import BaseModel, Field, StrictBool, StrictStr
from transformers import PreTrainedTokenizerBase

from eeengine.batching import encode
from eeengine.inputs import Example, char_limit, normalize_inputs
from eeengine.prediction import softmax


class ServeError(Exception):
    """A request the server answers with an error status and TEI's error body."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type

    def body(self) -> dict:
        return {"error": str(self), "error_type": self.error_type}


class PredictRequest(BaseModel):
    """TEI's ``/predict`` request."""

    inputs: StrictStr | list[StrictStr] | list[list[StrictStr]] = Field(
        description="a text, one input as a list ([text] or the pair [text, text_pair]), or a "
        "batch of such lists",
        examples=["a gorgeous, witty, seductive movie.", [["great"], ["premise", "hypothesis"]]],
    )
    truncate: StrictBool = Field(
        False, description="cut inputs longer than --max-input-length instead of refusing them"
    )
    raw_scores: StrictBool = Field(False, description="logits instead of probabilities")


class Prediction(BaseModel):
    """One label's score for one input (TEI's ``Prediction``), plus the input's exit layer."""

    score: float = Field(examples=[0.99])
    label: str = Field(examples=["positive"])
    exit_layer: int = Field(description="1-based layer whose exit answered", examples=[1])


class ErrorResponse(BaseModel):
    """TEI's error body."""

    error: str
    error_type: str


def parse_inputs(
    inputs: str | list, max_client_batch_size: int, max_chars: int | None = None
) -> tuple[list[Example], bool]:
    """TEI's ``inputs`` as a list of (text, text_pair or None), and whether it was one input.

    Args:
        inputs: the request's ``inputs``.
        max_client_batch_size: inputs one request may hold.
        max_chars: cut each text to this many characters, as ``Engine.predict`` does
            (:func:`eeengine.inputs.char_limit`); None to keep them whole.

    Raises:
        ServeError: 422 for a list of more than 2 strings (one input is a text or a pair) or a
            text that is not valid Unicode, 413 for a batch over ``max_client_batch_size``, 400
            for no input or an empty text.
    """
    if isinstance(inputs, str):
        items, single = [inputs], True
    elif inputs and all(isinstance(x, str) for x in inputs):
        if len(inputs) > 2:
            raise ServeError(
                422,
                "validation",
                f"a list of strings is one input, [text] or [text, text_pair]; got "
                f"{len(inputs)} strings (a batch is [[text], [text, text_pair], ...])",
            )
        items, single = [inputs], True
    else:
        items, single = inputs, False
    if not items:
        raise ServeError(400, "empty", "`inputs` cannot be empty")
    if len(items) > max_client_batch_size:
        raise ServeError(
            413,
            "validation",
            f"batch size {len(items)} > maximum allowed batch size {max_client_batch_size}",
        )
    examples = []
    for index, item in enumerate(items):
        if isinstance(item, str):
            examples.append(item)
        elif len(item) in (1, 2):
            examples.append(item[0] if len(item) == 1 else (item[0], item[1]))
        else:
            raise ServeError(
                422,
                "validation",
                f"inputs[{index}] has {len(item)} strings; an input is [text] or [text, text_pair]",
            )
    try:
        return normalize_inputs(examples, max_chars)[0], single
    except ValueError as error:  # an empty text, or a lone surrogate ("\ud800") in one
        empty = "empty" in str(error)
        status, kind = (400, "empty") if empty else (422, "validation")
        raise ServeError(status, kind, str(error)) from None


def tokenize(
    tokenizer: PreTrainedTokenizerBase, examples: list[Example], max_length: int, truncate: bool
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids and token type ids of each input, as ``Engine.predict`` encodes them.

    Args:
        examples: the inputs of :func:`parse_inputs` (cut to
            :func:`eeengine.inputs.char_limit` characters when ``truncate``).
        max_length: the server's ``--max-input-length`` (the engine's ``max_length``).
        truncate: cut longer inputs to ``max_length`` (longest-first for pairs); else refuse.

    Raises:
        ServeError: 413 for an input over ``max_length`` tokens without ``truncate``; a text
            over :func:`eeengine.inputs.char_limit` characters is refused so without being
            tokenized (its tokens would need over ``CHARS_PER_TOKEN`` characters each to fit).
    """
    if not truncate:
        limit = char_limit(max_length)
        for i, texts in enumerate(examples):
            if any(text is not None and len(text) > limit for text in texts):
                raise ServeError(
                    413,
                    "validation",
                    f"inputs[{i}] has over {limit} characters, more than the maximum input "
                    f'length {max_length} tokens can hold; send "truncate": true to cut it',
                )
    input_ids: list[list[int] | None] = [None] * len(examples)
    token_type_ids: list[list[int] | None] = [None] * len(examples)
    for has_pair in (False, True):
        index = [i for i, (_, pair) in enumerate(examples) if (pair is not None) == has_pair]
        if not index:
            continue
        texts = [examples[i][0] for i in index]
        pairs = [examples[i][1] for i in index] if has_pair else None
        encoded = encode(tokenizer, texts, pairs, max_length if truncate else None)
        for i, ids, types in zip(index, encoded.input_ids, encoded.token_type_ids, strict=True):
            if len(ids) > max_length:
                raise ServeError(
                    413,
                    "validation",
                    f"inputs[{i}] has {len(ids)} tokens, more than the maximum input length "
                    f'{max_length}; send "truncate": true to cut it',
                )
            input_ids[i], token_type_ids[i] = ids, types
    return input_ids, token_type_ids


def predictions(
    logits: list[list[float]],
    exit_layer: list[int],
    label_names: list[str] | None,
    raw_scores: bool,
) -> list[list[dict]]:
    """TEI's per-input prediction lists, each element with the input's exit layer.

    Args:
        logits: one row per input.
        exit_layer: one per input.
        label_names: the class names; None for a regression model (one element per input:
            ``{"score": value, "label": "value"}``).
        raw_scores: scores are the logits instead of softmax probabilities.
    """
    if label_names is None:
        return [
            [{"score": row[0], "label": "value", "exit_layer": layer}]
            for row, layer in zip(logits, exit_layer, strict=True)
        ]
    scores = logits if raw_scores else [softmax(row) for row in logits]
    return [
        sorted(
            (
                {"score": s, "label": name, "exit_layer": layer}
                for s, name in zip(row, label_names, strict=True)
            ),
            key=lambda p: -p["score"],
        )
        for row, layer in zip(scores, exit_layer, strict=True)
    ]
