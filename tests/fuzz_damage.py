"""Checkpoint damage for the fuzz property (:mod:`tests.fuzz_harness`): one file of a checkpoint
missing, truncated, bit-flipped, swapped with another checkpoint's, edited as JSON, or given a
non-finite weight."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from eeengine.checkpoint import CALIBRATION
from tests.fuzz_inputs import random_json_value, random_text

FILES = (
    "eeengine.json",
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    CALIBRATION,
)
KINDS = ("missing", "truncated", "bit-flipped", "swapped", "json-edit", "non-finite")
JSON_EDITED = ("eeengine.json", "config.json", CALIBRATION, "tokenizer_config.json")


def damage(path: Path, others: list[Path], rng: random.Random) -> str:
    """Damage the checkpoint at ``path`` in one of :data:`KINDS` (one file); returns what was
    done, as ``"file: kind: detail"``. ``others``: checkpoints to take a file from for a swap."""
    kind = rng.choice(KINDS)
    if kind == "json-edit":
        name = rng.choice(JSON_EDITED[:2] * 3 + JSON_EDITED)
        return f"{name}: json edit: " + edit_json(path / name, rng)
    if kind == "non-finite":
        state = load_file(path / "model.safetensors")
        key = rng.choice(sorted(state))
        value = rng.choice((float("nan"), float("inf"), float("-inf")))
        state[key].view(-1)[rng.randrange(state[key].numel())] = value
        save_file(state, path / "model.safetensors")
        return f"model.safetensors: non-finite: {value} in {key}"
    name = rng.choice(FILES)
    file = path / name
    if kind == "missing":
        file.unlink()
        return f"{name}: missing:"
    if kind == "swapped":
        other = rng.choice(others)
        if (other / name).exists():
            shutil.copyfile(other / name, file)
        else:
            file.unlink()
        return f"{name}: swapped: with {other.name}'s"
    data = file.read_bytes()
    if kind == "truncated":
        offset = rng.randrange(len(data))
        file.write_bytes(data[:offset])
        return f"{name}: truncated: at {offset} of {len(data)}"
    flipped = bytearray(data)
    flips = []
    for _ in range(rng.randint(1, 8)):
        # Half the flips in the first 16 KiB: the safetensors header, the JSON structure.
        end = min(len(data), 16384) if rng.random() < 0.5 else len(data)
        offset = rng.randrange(end)
        bit = rng.randrange(8)
        flipped[offset] ^= 1 << bit
        flips.append(f"{offset}:{bit}")
    file.write_bytes(bytes(flipped))
    return f"{name}: bit-flipped: at {' '.join(flips)}"


def edit_json(file: Path, rng: random.Random) -> str:
    """1 to 3 random edits of a JSON file (set a value, delete a key, add a key, replace the
    whole document); a missing or non-JSON file gets random JSON."""
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        data = random_json_value(rng)
        file.write_text(json.dumps(data))
        return "replaced by random JSON"
    done = []
    for _ in range(rng.randint(1, 3)):
        containers = _containers(data)
        parent, key = rng.choice(containers) if containers else (None, None)
        action = rng.choice(("set", "set", "set", "delete", "add", "document"))
        if parent is None or action == "document":
            data = random_json_value(rng)
            done.append("document replaced")
            continue
        if action == "delete" and isinstance(parent, dict):
            del parent[key]
            done.append(f"deleted {key!r}")
        elif action == "add" and isinstance(parent, dict):
            new = random_text(rng, 8)
            parent[new] = random_json_value(rng)
            done.append(f"added {new!r}")
        else:
            parent[key] = random_json_value(rng)
            done.append(f"set {key!r} = {parent[key]!r}"[:80])
    file.write_text(json.dumps(data))
    return ", ".join(done)


def _containers(data: object) -> list[tuple[object, object]]:
    """(container, key) of every value in a JSON tree; big lists (tokenizer vocabularies)
    contribute a sample of their entries."""
    found = []
    stack = [data]
    while stack:
        node = stack.pop()
        items = (
            list(node.items())
            if isinstance(node, dict)
            else list(enumerate(node))
            if isinstance(node, list)
            else []
        )
        for key, value in items[:50]:
            found.append((node, key))
            stack.append(value)
    return found
