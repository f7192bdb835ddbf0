"""Save a checkpoint with its weights in fp16, to carry to the lent GPU machine (half the size:
the SST-2 MiniLM-L6 checkpoint is ~45 MB; at most 64 MiB travel with the repository).

The copy is a normal checkpoint (:func:`eeengine.checkpoint.save_checkpoint`, written to a
temporary directory and renamed); loading casts the weights back into the fp32 model, so the
engine computes in fp32 on weights rounded to fp16. ``benchmarks/gpu_check.sh`` compares the
GPU against the CPU on this same copy, so the rounding does not enter the comparison.

    python benchmarks/export_fp16_checkpoint.py [SRC] [--out gpu_ckpt/sst2-minilm-l6-fp16]

SRC defaults to the cached default checkpoint (``~/.cache/eeengine/sst2-minilm-l6-v1``);
``gpu_ckpt/`` is ignored by git and carried to the device machine (the run tool's ``carry``).
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

from eeengine.checkpoint import load_checkpoint, save_checkpoint

DEFAULT_OUT = Path("gpu_ckpt/sst2-minilm-l6-fp16")


def export_fp16(src: str | Path, dst: str | Path) -> Path:
    """Copy the checkpoint ``src`` to ``dst`` with every floating-point weight in fp16.

    Raises:
        FileNotFoundError, eeengine.checkpoint.CheckpointError: ``src`` is not a valid
            checkpoint.
    """
    ckpt = load_checkpoint(src)
    model = copy.deepcopy(ckpt.model).half()
    return save_checkpoint(dst, model, ckpt.tokenizer, ckpt.manifest, ckpt.calibration or None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", nargs="?", help="checkpoint (default: the cached SST-2 model)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if args.src is None:
        from eeengine.defaults import DEFAULT_CHECKPOINT, home

        args.src = home() / DEFAULT_CHECKPOINT
    path = export_fp16(args.src, args.out)
    size = sum(f.stat().st_size for f in path.iterdir()) / 2**20
    print(f"wrote {path} ({size:.1f} MiB)")


if __name__ == "__main__":
    main()
