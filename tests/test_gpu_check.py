"""benchmarks/gpu_check.sh on a machine without a GPU: every GPU step is skipped with the
reason, the rest passes, one summary; and the fp16 checkpoint it carries
(benchmarks/export_fp16_checkpoint.py) predicts as the fp32 model on fp16-rounded weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eeengine import Engine
from eeengine._custom_ops import HAS_C, LOAD_ERROR
from eeengine.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
GPU_STEPS = [
    "build",
    "extension",
    "tests",
    "sst2",
    "memcheck",
    "racecheck",
    "compaction",
    "compare",
]

sys.path.insert(0, str(ROOT / "benchmarks"))
from export_fp16_checkpoint import export_fp16  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU run; a GPU runs the steps")
def test_gpu_check_skips_gpu_steps_on_cpu(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    steps = {line.split()[0]: line.split()[1] for line in summary[1:]}
    assert steps.pop("env") == "PASS"
    assert steps == dict.fromkeys(GPU_STEPS, "SKIP")
    assert all("no GPU: torch.cuda.is_available() is False" in line for line in summary[2:])
    assert "torch" in (tmp_path / "env.log").read_text()


def test_export_fp16_checkpoint(tiny_ckpt: Path, tmp_path: Path) -> None:
    fp16 = export_fp16(tiny_ckpt, tmp_path / "fp16")
    state = load_checkpoint(fp16).model.state_dict()
    original = load_checkpoint(tiny_ckpt).model
    for key, value in original.state_dict().items():
        expected = value.half().float() if value.is_floating_point() else value
        assert torch.equal(state[key], expected), key
    with torch.no_grad():
        for p in original.parameters():
            p.copy_(p.half().float())
    texts = ["a gorgeous, witty, seductive movie.", "dull and lifeless.", "it is a film."]
    got = Engine(fp16, executor="torch").predict(texts)
    engine = Engine(tiny_ckpt, executor="torch")
    engine.model.load_state_dict(original.state_dict())
    engine.model.backbone.fuse_qkv()  # the weights changed in place after load
    want = engine.predict(texts)
    assert [(p.label, p.exit_layer) for p in got] == [(p.label, p.exit_layer) for p in want]


@pytest.mark.skipif(not HAS_C, reason=f"C++ extension not available: {LOAD_ERROR}")
def test_sanitizer_workload_checks_pass_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/sanitize_ops.py (what compute-sanitizer runs) on CPU tensors, the Triton
    kernels interpreted: its checks against the reference pass, so on the GPU only a real
    kernel fault can fail it."""
    pytest.importorskip("triton", reason="triton is not installed")
    import sanitize_ops

    def copy(a: object) -> object:
        if isinstance(a, list):
            return [copy(x) for x in a]
        return a.clone() if torch.is_tensor(a) else a

    monkeypatch.setattr(sanitize_ops, "to_cuda", copy)
    assert sanitize_ops.check_exit_ops() >= 28
    assert sanitize_ops.check_token_prune() == 2
