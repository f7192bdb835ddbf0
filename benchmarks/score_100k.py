"""``eeengine score`` at 100,000 rows (issue 14): peak resident memory, resumption after
``kill -9``, and ``--ray`` with 2 actors, each output compared with an uninterrupted run.

The input is the 67,349 SST-2 train sentences of ``data/``, repeated to ``--rows`` rows, as a
CSV with columns ``id`` (``r0``, ``r1``, ...) and ``sentence``. Runs, each ``eeengine score``
in its own process under ``/usr/bin/time -v`` (peak RSS = its "Maximum resident set size"):

1. ``whole``: uninterrupted.
2. ``killed``: the same job into another output, killed with SIGKILL once ``--kill-after``
   parts are on disk, then rerun with the same command (``resumed``); its output must equal
   ``whole``'s byte for byte and hold rows 0..N-1 once each.
3. ``ray``: ``--ray --actors 2`` on a local Ray instance; its output must equal ``whole``'s.
   (Peak RSS is the driver's; the actors are Ray's processes.)

    nice -n 10 python benchmarks/score_100k.py --ckpt ~/.cache/eeengine/sst2-minilm-l6-v1 \
        --work /tmp/score100k --out benchmarks/results/score_100k.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.csv as pacsv

from eeengine.data import get_task, load_split
from eeengine.score_parts import parts_dir


def make_input(path: Path, rows: int) -> None:
    texts = load_split(get_task("sst2"), "train").texts
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "sentence"])
        writer.writerows([f"r{i}", texts[i % len(texts)]] for i in range(rows))


def command(args: argparse.Namespace, source: Path, output: Path, *extra: str) -> list[str]:
    return [
        "/usr/bin/time", "-v", sys.executable, "-m", "eeengine.cli", "score",
        "--ckpt", str(args.ckpt), "--input", str(source), "--output", str(output),
        "--text-column", "sentence", "--id-column", "id",
        "--chunk-rows", str(args.chunk_rows), "--batch-size", str(args.batch_size), *extra,
    ]  # fmt: skip


def run(cmd: list[str]) -> dict:
    """Run ``cmd`` to the end; its wall time (s), peak RSS (MiB) and last stdout line."""
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)[1])
    return {
        "seconds": round(time.perf_counter() - started, 1),
        "peak_rss_mib": round(rss_kib / 1024, 1),
        "stdout": done.stdout.strip().splitlines()[-1],
    }


def kill_midway(cmd: list[str], output: Path, parts: int) -> dict:
    """Start ``cmd``, SIGKILL its process group once ``parts`` parts are written."""
    directory = parts_dir(output)
    started = time.perf_counter()
    process = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    while len(list(directory.glob("part-*"))) < parts:
        if process.poll() is not None:
            raise RuntimeError("the run ended before it could be killed")
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return {
        "killed_after_s": round(time.perf_counter() - started, 1),
        "parts_on_disk": len(list(directory.glob("part-*"))),
        "temporary_files": len(list(directory.glob(".*.tmp-*"))),
        "output_exists": output.exists(),
    }


def check_rows(path: Path, rows: int) -> bool:
    """Rows 0..rows-1, each once, in order, with the matching id."""
    table = pacsv.read_csv(path)
    index = table.column("row").to_pylist()
    ids = table.column("id").to_pylist()
    return index == list(range(rows)) and ids == [f"r{i}" for i in range(rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True, help="a scratch directory")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--chunk-rows", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--kill-after", type=int, default=5, help="parts written before kill")
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    source = args.work / "input.csv"
    if not source.exists():
        make_input(source, args.rows)
    for name in ("whole", "killed", "ray"):
        (args.work / f"{name}.csv").unlink(missing_ok=True)
    results: dict = {"rows": args.rows, "input_mib": round(source.stat().st_size / 2**20, 1)}

    whole = args.work / "whole.csv"
    results["whole"] = run(command(args, source, whole))
    print("whole", results["whole"], flush=True)

    killed = args.work / "killed.csv"
    results["killed"] = kill_midway(command(args, source, killed), killed, args.kill_after)
    results["resumed"] = run(command(args, source, killed))
    results["resumed"]["identical"] = killed.read_bytes() == whole.read_bytes()
    results["resumed"]["rows_ok"] = check_rows(killed, args.rows)
    print("killed", results["killed"], "resumed", results["resumed"], flush=True)

    if not args.skip_ray:
        ray_out = args.work / "ray.csv"
        results["ray"] = run(command(args, source, ray_out, "--ray", "--actors", str(args.actors)))
        results["ray"]["identical"] = ray_out.read_bytes() == whole.read_bytes()
        print("ray", results["ray"], flush=True)

    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
