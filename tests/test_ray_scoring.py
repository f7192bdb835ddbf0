"""eeengine score --ray: Ray Data with 2 actors on a local Ray instance writes the same rows as
the single-process run, and resumes its interrupted job.

"The same" is: row numbers, ids, labels and exit layers equal, scores equal to float32 rounding.
Not byte for byte: each actor runs torch on one thread, and a matrix product's rounding may
depend on the thread count together with the batch's shape (a one-row batch on 2 threads gave
0.959458239 where the same row on 1 thread gave 0.959458258)."""

from __future__ import annotations

import pytest

from eeengine.score_parts import Parts, parts_dir
from eeengine.scoring import ScoreJob, score_file
from tests.test_scoring import _read_output, _settings, _texts, _write_input

ray = pytest.importorskip("ray")
from eeengine.ray_scoring import score_file_ray  # noqa: E402


def _assert_same_rows(output, reference) -> None:
    rows, expected = _read_output(output), _read_output(reference)
    for column in ("row", "id", "label", "exit_layer"):
        assert [r[column] for r in rows] == [r[column] for r in expected], column
    assert [r["score"] for r in rows] == pytest.approx([r["score"] for r in expected], rel=1e-6)


@pytest.fixture(scope="module")
def local_ray():
    # 2 actors of 1 CPU each, and 1 CPU for the read tasks (the actors would otherwise hold
    # every slot and the read would wait forever); logical CPUs, CI's 2 cores run them all.
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize(("source", "target"), [("csv", "csv"), ("jsonl", "parquet")])
def test_ray_output_equals_single_process(local_ray, tiny_ckpt, tmp_path, source, target):
    texts = _texts(source)
    _write_input(tmp_path / f"in.{source}", source, texts)
    settings = _settings(tiny_ckpt, threshold=0.5)
    local = ScoreJob(tmp_path / f"in.{source}", tmp_path / f"local.{target}", "text", None, "id", 8)
    score_file(local, settings, batch_size=4, progress=False)
    job = ScoreJob(tmp_path / f"in.{source}", tmp_path / f"ray.{target}", "text", None, "id", 8)
    summary = score_file_ray(job, settings, batch_size=4, progress=False, actors=2)
    assert summary.rows == len(texts)
    _assert_same_rows(job.output, local.output)


def test_ray_resumes_a_single_process_job(local_ray, tiny_ckpt, tmp_path, monkeypatch):
    _write_input(tmp_path / "in.csv", "csv", _texts("csv"))
    whole = ScoreJob(tmp_path / "in.csv", tmp_path / "whole.csv", "text", None, "id", 8)
    score_file(whole, _settings(tiny_ckpt), progress=False)

    job = ScoreJob(tmp_path / "in.csv", tmp_path / "out.csv", "text", None, "id", 8)
    finish = Parts.finish
    monkeypatch.setattr(Parts, "finish", lambda self: None)  # stop before assembling
    score_file(job, _settings(tiny_ckpt), progress=False)
    monkeypatch.setattr(Parts, "finish", finish)
    parts = sorted(parts_dir(job.output).glob("part-*"))
    parts[-1].unlink()
    parts[-2].unlink()  # as if interrupted after 3 of 5 parts

    summary = score_file_ray(job, _settings(tiny_ckpt), progress=False, actors=2)
    assert summary.resumed_rows == 24
    _assert_same_rows(job.output, whole.output)
