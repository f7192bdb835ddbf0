"""The reliability run of benchmarks/serve_reliability.py, small: a real ``eeengine serve``
process on a tiny checkpoint, 300 requests with 10 % bad ones and 5 % client disconnects,
then SIGTERM with requests in flight."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import serve_reliability  # noqa: E402


def test_reliability_run(tiny_ckpt) -> None:
    report = serve_reliability.run(str(tiny_ckpt), requests=300, seed=1)
    assert report["bad"] > 0 and report["disconnects"] > 0
    assert report["good_answered_right"] == report["good"], report
    assert report["bad_answered_4xx"] == report["bad"], report
    assert report["5xx"] == 0, report
    assert report["shutdown"]["answered_200"] == report["shutdown"]["requests"], report
    assert report["shutdown"]["exit_status"] == 0, report
    assert report["passed"], report
