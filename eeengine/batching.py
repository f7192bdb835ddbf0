"""Tokenization, length bucketing and padding shared by the engine, evaluation and training."""

from __future__ import annotations

import math
import random
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tokenizers
import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase


@dataclass
class Encoded:
    """Token ids of a list of inputs, unpadded (one list per input)."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]


def encode(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    text_pairs: Sequence[str] | None,
    max_length: int | None,
) -> Encoded:
    """Tokenize texts (and optional second segments) with [CLS]/[SEP], truncated to
    ``max_length`` tokens when it is given (longest-first for pairs).

    A fast tokenizer's Rust tokenizer runs directly (:func:`rust_tokenizer`), as
    ``tokenizer(...)`` would run it, without transformers' Python around it: 35 -> 20 us a
    sentence warm, about 70 us less at batch 1 right after a forward pass (BENCHMARKS.md).
    """
    rust = rust_tokenizer(tokenizer, max_length)
    if rust is not None:
        inputs = list(texts) if text_pairs is None else list(zip(texts, text_pairs, strict=True))
        encodings = rust.encode_batch(inputs)
        return Encoded([e.ids for e in encodings], [e.type_ids for e in encodings])
    enc = tokenizer(
        list(texts),
        list(text_pairs) if text_pairs is not None else None,
        truncation=max_length is not None,
        max_length=max_length,
        return_token_type_ids=True,
        return_attention_mask=False,
    )
    return Encoded(enc["input_ids"], enc["token_type_ids"])


_RUST_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def rust_tokenizer(
    tokenizer: PreTrainedTokenizerBase, max_length: int | None
) -> tokenizers.Tokenizer | None:
    """A copy of ``tokenizer``'s Rust tokenizer (``backend_tokenizer``, the tokenizers
    library) that truncates at ``max_length`` tokens, longest-first (None: never), and never
    pads, made once per tokenizer and length; None for a tokenizer without one (a slow one).

    A copy: transformers re-sets the original's truncation and padding at every call, so the
    original's settings belong to whoever called last; nothing changes the copy's.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    copies = _RUST_TOKENIZERS.setdefault(tokenizer, {})
    if max_length not in copies:
        copy = tokenizers.Tokenizer.from_str(backend.to_str())
        copy.no_padding()
        if max_length is None:
            copy.no_truncation()
        else:
            copy.enable_truncation(max_length, strategy="longest_first")
        copies[max_length] = copy
    return copies[max_length]


def encode_truncating(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    text_pairs: Sequence[str] | None,
    max_length: int,
    offset: int = 0,
) -> Encoded:
    """:func:`encode` without truncation, then the inputs longer than ``max_length`` tokens
    encoded again truncated (longest-first for pairs), with one warning naming them (their
    indices plus ``offset``), attributed to the caller of :meth:`eeengine.Engine.predict`.

    Returns:
        The encoded inputs, all at most ``max_length`` tokens.
    """
    encoded = encode(tokenizer, texts, text_pairs, None)
    too_long = [i for i, n in enumerate(encoded.lengths) if n > max_length]
    if too_long:
        truncated = encode(
            tokenizer,
            [texts[i] for i in too_long],
            [text_pairs[i] for i in too_long] if text_pairs is not None else None,
            max_length,
        )
        for j, i in enumerate(too_long):
            encoded.input_ids[i] = truncated.input_ids[j]
            encoded.token_type_ids[i] = truncated.token_type_ids[j]
        warnings.warn(
            f"{len(too_long)} input(s) longer than {max_length} tokens were truncated "
            f"(indices {[offset + i for i in too_long[:10]]})",
            stacklevel=4,
        )
    return encoded


def length_sorted_batches(
    lengths: Sequence[int], batch_size: int, split_cost: float = math.inf
) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), to limit padding.

    Args:
        lengths: tokens of each input.
        batch_size: the most rows of a batch.
        split_cost: what one more forward pass costs, in padded tokens (its fixed per-call
            work divided by the work of one token; the executor's
            :attr:`eeengine.executors.base.LayerExecutor.split_cost`). A batch is cut where
            that removes more padded tokens than this (:func:`split_padding`); ``math.inf``
            never cuts.

    Returns:
        Batches of indices into ``lengths``, each sorted longest first.
    """
    if len(lengths) == 1:  # batch 1: nothing to sort or cut (9 us saved right after a pass)
        return [[0]]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if split_cost == math.inf:
        return batches
    return [part for batch in batches for part in split_padding(batch, lengths, split_cost)]


def check_split_cost(split_cost: float) -> float:
    """``split_cost`` as a float, checked: a number of padded tokens >= 0 (``math.inf``: never
    cut).

    Raises:
        ValueError: negative, NaN or not a number.
    """
    try:
        value = float(split_cost)
    except (TypeError, ValueError):
        value = math.nan
    if not value >= 0:
        raise ValueError(
            f"split_cost ({split_cost!r}) must be a number of padded tokens >= 0 (inf: never cut)"
        )
    return value


def split_padding(batch: list[int], lengths: Sequence[int], split_cost: float) -> list[list[int]]:
    """Cut a longest-first batch in two where that saves the most padded tokens, while the
    saving exceeds ``split_cost`` tokens, then each part again (greedy).

    A batch of n rows padded to its longest, d_0, holds n * d_0 tokens; cutting before row i
    pads the rows from i on to d_i instead, saving (n - i) * (d_0 - d_i) tokens.
    """
    if len(batch) < 2:
        return [batch]
    first = lengths[batch[0]]
    saved, cut = max(
        ((len(batch) - i) * (first - lengths[batch[i]]), i) for i in range(1, len(batch))
    )
    if saved <= split_cost:
        return [batch]
    return split_padding(batch[:cut], lengths, split_cost) + split_padding(
        batch[cut:], lengths, split_cost
    )


def bucketed_batches(
    lengths: Sequence[int], batch_size: int, rng: random.Random
) -> list[list[int]]:
    """Training batches of indices: shuffle, sort by length inside pools of 50 batches (to
    limit padding), then shuffle the batch order; ``rng`` draws both shuffles."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    pool = 50 * batch_size
    batches = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lengths.__getitem__)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(
    encoded: Encoded, indices: Sequence[int], pad_token_id: int, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor, Tensor]:
    """Right-pad the selected inputs to their longest member.

    Returns:
        input_ids, attention_mask, token_type_ids: (len(indices), max_len) int64; the mask is
        1 for real tokens. On a CUDA device they are copied from pinned memory without
        blocking (a copy from pageable memory would synchronize the host).
    """
    lengths = [len(encoded.input_ids[i]) for i in indices]
    max_len = max(lengths)
    # Filled in numpy: at batch 1, right after a forward pass, a torch op costs 10-20 us.
    input_ids = np.full((len(lengths), max_len), pad_token_id, dtype=np.int64)
    token_type_ids = np.zeros((len(lengths), max_len), dtype=np.int64)
    for row, (i, n) in enumerate(zip(indices, lengths, strict=True)):
        input_ids[row, :n] = encoded.input_ids[i]
        token_type_ids[row, :n] = encoded.token_type_ids[i]
    attention_mask = (np.arange(max_len) < np.array(lengths)[:, None]).astype(np.int64)
    tensors = tuple(map(torch.from_numpy, (input_ids, attention_mask, token_type_ids)))
    kind = torch.device(device).type
    if kind == "cpu":
        return tensors
    if kind == "cuda":
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in tensors)
    return tuple(t.to(device) for t in tensors)
