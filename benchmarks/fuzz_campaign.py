"""The long fuzz campaign of issue 16: the cases of ``tests/test_fuzz.py`` by the hundred
thousand, each checked against the property of :mod:`tests.fuzz_harness`.

Cases (their share of ``--cases``): random Python values and Unicode strings into
``Engine.predict`` (95 %), damaged checkpoints loaded and asked a known input (4 %: a file
missing, truncated at a random offset, bit-flipped, swapped with another checkpoint's, random
JSON edits of eeengine.json / config.json / calibration.json / tokenizer_config.json, a NaN or
infinity written into one tensor), and random ``eeengine predict`` command lines (1 %; loads
cost ~0.1-0.4 s each, predictions milliseconds).

Chunks of cases run in worker subprocesses, so an interpreter crash (a segfault, an abort)
is counted instead of ending the campaign. The harness also checks that a reference engine
still answers a known input exactly as before, and that no file under the checkpoints'
directory changed (see ``EVERY``; size and mtime, and SHA-256 after each chunk); the damaged
copy of every checkpoint case is compared before and after its load.

    nice -n 10 python benchmarks/fuzz_campaign.py --cases 100000 \\
        --out benchmarks/results/fuzz_campaign.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARES = {"predict": 0.95, "checkpoint": 0.04, "cli": 0.01}
CHUNK = {"predict": 1000, "checkpoint": 50, "cli": 25}
# The known-input and disk checks run after every checkpoint and CLI case and after every
# EVERY-th predict case (a request that left state behind would show at the next check), and
# once more at the end of each chunk, with a SHA-256 comparison of every checkpoint file.
EVERY = 25


def worker(kind: str, root: Path, start: int, count: int, seed: int) -> dict:
    """Run cases ``start .. start + count`` of ``kind``; outcome counts and every failure."""
    import warnings

    from eeengine import Engine
    from tests.fuzz_damage import damage
    from tests.fuzz_harness import DiskGuard, KnownAnswer, cli_case, load_case, predict_case
    from tests.fuzz_inputs import random_argv, random_input

    warnings.simplefilter("ignore")
    checkpoints = root / "checkpoints"
    main = checkpoints / "main"
    known = KnownAnswer(main)
    guard = DiskGuard(checkpoints)
    engine = Engine(main, executor="torch")
    outcomes: Counter[str] = Counter()
    details: Counter[str] = Counter()
    failures = []
    for case in range(start, start + count):
        rng = random.Random(f"{seed}-{kind}-{case}")
        if kind == "predict":
            inputs = rng.choice((random_input(rng), random_input(rng), [random_input(rng)]))
            batch_size = (
                rng.choice((32,) * 6 + (1, 3, 7))
                if rng.random() < 0.9
                else rng.choice((0, -1, 2.0, "8", None))
            )
            what = f"{inputs!r:.300} batch_size={batch_size!r}"
            outcome = predict_case(engine, inputs, batch_size)
            details[type(inputs).__name__] += 1
        elif kind == "checkpoint":
            target = root / f"case-{kind}-{case}"
            shutil.copytree(main, target)
            what = damage(target, [checkpoints / "roberta", checkpoints / "small_vocab"], rng)
            before = DiskGuard(target)
            outcome = load_case(target, rng)
            if before.changes():
                outcome = f"FAIL disk: the engine changed {before.changes()}"
            shutil.rmtree(target)
            details[":".join(what.split(":")[:2])] += 1
        else:
            argv = random_argv(rng, main)
            what = repr(argv)[:300]
            outcome = cli_case(argv, ["negative", "positive"])
        if kind != "predict" or case % EVERY == 0 or case == start + count - 1:
            for extra in (known.check(), *(f"FAIL disk: {c}" for c in guard.changes())):
                if extra is not None:
                    outcome = extra
        record(outcome, {"case": case, "what": what}, outcomes, failures)
    changed = guard.changes(content=True)
    return {
        "outcomes": dict(outcomes),
        "details": dict(details),
        "failures": failures,
        "disk_changes": changed,
    }


def record(outcome: str, case: dict, outcomes: Counter[str], failures: list[dict]) -> None:
    """Tally ``outcome`` under its kind and, when it breaks the property (``FAIL`` anywhere
    in it, a checkpoint case's ``"load: FAIL ..."`` included), add ``case`` with it to
    ``failures``."""
    from tests.fuzz_harness import is_failure, outcome_kind

    outcomes[outcome_kind(outcome)] += 1
    if is_failure(outcome):
        failures.append({**case, "outcome": outcome})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--jobs", type=int, default=2, help="worker processes at a time")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/fuzz_campaign.json")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, root, start, count = args.worker
        print(json.dumps(worker(kind, Path(root), int(start), int(count), args.seed)))
        return 0

    from tests.fuzz_harness import DiskGuard, build_checkpoints

    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="eeengine-fuzz-"))
    build_checkpoints(root / "checkpoints")
    guard = DiskGuard(root / "checkpoints")
    by_kind = []
    for kind, share in SHARES.items():
        total = round(args.cases * share)
        size = CHUNK[kind]
        by_kind.append([(kind, start, min(size, total - start)) for start in range(0, total, size)])
    # Interleaved, so that a campaign stopped early has run every kind in proportion.
    chunks = sorted(
        (chunk for chunks in by_kind for chunk in chunks),
        key=lambda chunk: (chunk[1] + chunk[2]) / round(args.cases * SHARES[chunk[0]]),
    )
    totals = {"cases": Counter(), "outcomes": Counter(), "details": Counter()}
    failures, crashes, disk = [], [], []
    running: list[tuple[tuple, subprocess.Popen]] = []
    pending = list(chunks)
    while pending or running:
        while pending and len(running) < args.jobs:
            chunk = pending.pop(0)
            command = [
                sys.executable,
                __file__,
                "--seed",
                str(args.seed),
                "--worker",
                chunk[0],
                str(root),
                str(chunk[1]),
                str(chunk[2]),
            ]
            running.append(
                (
                    chunk,
                    subprocess.Popen(
                        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                    ),
                )
            )
        time.sleep(0.5)
        for item in list(running):
            chunk, process = item
            if process.poll() is None:
                continue
            running.remove(item)
            stdout, stderr = process.communicate()
            kind, start, count = chunk
            if process.returncode != 0:
                crashes.append(
                    {"chunk": chunk, "returncode": process.returncode, "stderr": stderr[-2000:]}
                )
                print(f"CRASH {chunk}: {process.returncode}\n{stderr[-2000:]}", flush=True)
                continue
            result = json.loads(stdout.strip().splitlines()[-1])
            totals["cases"][kind] += count
            totals["outcomes"].update({f"{kind}: {k}": v for k, v in result["outcomes"].items()})
            totals["details"].update({f"{kind}: {k}": v for k, v in result["details"].items()})
            failures += [{"kind": kind, **f} for f in result["failures"]]
            disk += result["disk_changes"]
            done = sum(totals["cases"].values())
            print(
                f"{done:,} cases, {len(failures)} failures, {len(crashes)} crashes, "
                f"{time.perf_counter() - started:.0f} s",
                flush=True,
            )
            write_report(args.out, totals, failures, crashes, disk, started, finished=False)
    disk += guard.changes(content=True)
    disk += sorted(p.name for p in root.iterdir() if p.name != "checkpoints")
    report = write_report(args.out, totals, failures, crashes, disk, started, finished=True)
    shutil.rmtree(root)
    print(json.dumps({k: report[k] for k in list(report)[:9]}, indent=2))
    return 0 if not failures and not crashes and not disk else 1


def write_report(
    out: Path,
    totals: dict,
    failures: list,
    crashes: list,
    disk: list,
    started: float,
    finished: bool,
) -> dict:
    """Write the figures so far to ``out`` (after every chunk, so that a campaign stopped
    early still leaves its counts); returns them."""
    report = {
        "command": "python benchmarks/fuzz_campaign.py " + " ".join(sys.argv[1:]),
        "finished": finished,
        "cases": sum(totals["cases"].values()),
        "cases_by_kind": dict(totals["cases"]),
        "silent_garbage": sum(1 for f in failures if "garbage" in f["outcome"]),
        "failures": len(failures),
        "interpreter_crashes": len(crashes),
        "disk_changes": len(disk),
        "outcomes": dict(sorted(totals["outcomes"].items())),
        "case_kinds": dict(sorted(totals["details"].items())),
        "failure_examples": failures[:50],
        "crash_examples": crashes[:5],
        "disk_change_examples": disk[:20],
        "seconds": round(time.perf_counter() - started),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    sys.exit(main())
