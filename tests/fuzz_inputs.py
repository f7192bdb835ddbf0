"""Random inputs for the fuzz property (:mod:`tests.fuzz_harness`): texts from every corner of
Unicode, JSON values, anything a caller might pass to ``Engine.predict``, and ``eeengine
predict`` command lines."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from tests.conftest import SENTENCES

_RANGES = (
    (0x20, 0x7E),  # ASCII
    (0x00, 0x1F),  # control
    (0x80, 0x24F),  # Latin
    (0x300, 0x36F),  # combining marks
    (0x590, 0x6FF),  # Hebrew, Arabic
    (0x2000, 0x206F),  # punctuation, zero-width, bidi controls
    (0x3000, 0x30FF),  # CJK punctuation, kana
    (0x4E00, 0x9FFF),  # CJK
    (0xE000, 0xF8FF),  # private use
    (0xFFF0, 0xFFFF),  # specials, non-characters
    (0x1F300, 0x1FAFF),  # emoji
    (0x10000, 0x10FFFF),  # anything astral
)


def random_text(rng: random.Random, max_size: int = 40) -> str:
    """A random string: words, whitespace runs, code points from every corner of Unicode
    (a lone surrogate in one string of ten), or empty."""
    kind = rng.random()
    if kind < 0.05:
        return ""
    if kind < 0.1:
        return rng.choice((" ", "\t", "\n", "\u3000", "\u200b", "\x00")) * rng.randint(1, 5)
    if kind < 0.4:
        return " ".join(rng.choice(SENTENCES).split()[: rng.randint(1, 12)])
    chars = []
    for _ in range(rng.randint(1, max_size)):
        low, high = rng.choice(_RANGES)
        chars.append(chr(rng.randint(low, high)))
    if rng.random() < 0.1:  # a lone surrogate, invalid in UTF-8
        chars.insert(rng.randrange(len(chars) + 1), chr(rng.randint(0xD800, 0xDFFF)))
    return "".join(chars)


def random_input(rng: random.Random, depth: int = 0) -> object:
    """Anything a caller might pass to ``Engine.predict``: texts, pairs, lists of them, and
    values of every other Python type, nested."""
    kind = rng.random()
    if kind < 0.35:
        return random_text(rng)
    if kind < 0.45:
        return (random_text(rng), random_text(rng))
    if kind < 0.6 and depth == 0:
        return [random_input(rng, depth + 1) for _ in range(rng.randint(0, 12))]
    if kind < 0.63:
        return rng.choice(("word " * 20_000, "x" * 200_000, "\u00e9" * 50_000))
    return rng.choice(
        (
            None,
            True,
            0,
            -1,
            3.5,
            float("nan"),
            b"bytes",
            bytearray(b"x"),
            ("one",),
            ("a", "b", "c"),
            ("a", 1),
            {"text": "a"},
            {"a", "b"},
            object(),
            torch.tensor([1, 2]),
            range(3),
            iter(["a"]),
            [["nested"]],
            random_json_value(rng),
        )
    )


def random_argv(rng: random.Random, ckpt: Path) -> list[str]:
    """``eeengine predict`` arguments: random texts and options, some of them invalid."""
    argv = ["predict", "--ckpt", str(ckpt), "--executor", "torch"]
    if rng.random() < 0.5:
        argv.append("--json")
    for option, values in (
        ("--batch-size", ("1", "0", "-3", "2.5", "x", "100")),
        ("--threshold", ("0.3", "-1", "nan", "inf", "1e9", "abc", "0")),
        ("--policy", ("entropy", "pcee", "max_prob", "nope", "", "budget")),
        ("--patience", ("1", "0", "-2", "x")),
        ("--param", ("layer=2", "layer=99", "window=x", "=", "junk")),
    ):
        if rng.random() < 0.2:
            argv += [option, rng.choice(values)]
    texts = [random_text(rng).replace("\x00", "") for _ in range(rng.randint(0, 4))]
    # argv never holds NUL (the OS cannot pass it); a leading '-' is an option to argparse.
    return argv + ["--", *texts] if rng.random() < 0.5 else argv + texts


def random_json_value(rng: random.Random, depth: int = 0) -> object:
    """A JSON-representable value of a random kind (NaN and infinities included: Python's json
    writes them)."""
    kinds = ["null", "bool", "int", "big", "float", "special", "str"]
    if depth < 2:
        kinds += ["list", "dict"]
    kind = rng.choice(kinds)
    if kind == "null":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        return rng.randint(-3, 70)
    if kind == "big":
        return rng.choice((-1, 1)) * 10 ** rng.randint(3, 30)
    if kind == "float":
        return rng.uniform(-2, 2) * 10 ** rng.randint(-8, 8)
    if kind == "special":
        return rng.choice((float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e-300))
    if kind == "str":
        return random_text(rng, max_size=12)
    if kind == "list":
        return [random_json_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {
        random_text(rng, 6): random_json_value(rng, depth + 1) for _ in range(rng.randint(0, 3))
    }
