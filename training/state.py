"""The resumable training state: a side directory next to the output checkpoint.

``<out>/../.<out name>.train-state/state.pt`` holds everything needed to continue a run from
its last saved step exactly as if it had not stopped: the step, the epoch's batch order and the
position in it, the random states (batch shuffling, torch's dropout RNG), the model, recipe,
optimizer and schedule, the best evaluation so far, and the config that started the run.
It is written atomically (a temporary file, then ``os.replace``), so an interruption while
saving leaves the previous state intact; the trainer deletes the directory once the final
checkpoint is saved.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

STATE_FILE = "state.pt"


def state_dir(out: str | Path) -> Path:
    """The side directory of the checkpoint directory ``out``."""
    out = Path(out).resolve()
    return out.parent / f".{out.name}.train-state"


def save_state(out: str | Path, state: dict) -> None:
    """Write ``state`` (anything ``torch.save`` takes) atomically."""
    directory = state_dir(out)
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{STATE_FILE}.", dir=directory)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, directory / STATE_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_state(out: str | Path, config: dict, ignore: tuple[str, ...] = ()) -> dict | None:
    """The saved state of an interrupted run towards ``out``, or None when there is none.

    Args:
        config: the current run's config; it must equal the saved one.
        ignore: config fields that may differ (they do not change the result).

    Raises:
        ValueError: the state was written by a run with another config (names the directory).
    """
    file = state_dir(out) / STATE_FILE
    if not file.is_file():
        return None
    state = torch.load(file, map_location="cpu", weights_only=False)
    saved = {k: v for k, v in state["config"].items() if k not in ignore}
    current = {k: v for k, v in config.items() if k not in ignore}
    if saved != current:
        changed = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
        raise ValueError(
            f"{file.parent}: a training state of a run with another config (differs in "
            f"{', '.join(changed)}); rerun with the same config to resume, or delete the "
            "directory to start over"
        )
    return state


def remove_state(out: str | Path) -> None:
    """Delete the side directory (after the final checkpoint is saved)."""
    shutil.rmtree(state_dir(out), ignore_errors=True)
