"""Reliability run of ``eeengine serve``: many requests, some bad, some abandoned.

Starts ``eeengine serve`` in its own process on 127.0.0.1 and sends it ``--requests`` requests
from ``--concurrency`` concurrent clients (one connection per request):

- good (the rest): an SST-2 dev sentence, or a batch of 2-4, with ``truncate``; the answer
  must be 200 with the label ``Engine.predict`` gives (computed here, in this process);
- bad (``--bad``, 10 %): malformed JSON, empty text, wrong types, an input over the maximum
  length without ``truncate``, a batch over ``--max-client-batch-size``, in turn; the answer
  must be a 4xx with an error message;
- disconnects (``--disconnects``, 5 %): a good request whose client closes the connection
  0-20 ms after sending it, unanswered.

Checks: every good request answered with the right label, every bad one a 4xx, no 5xx at
all, the server's resident memory at the end within 10 % of its value after the warm-up (the
first 10 % of the requests), and a clean shutdown: SIGTERM while requests are in flight, every
one of them answered 200, exit status 0.

    python benchmarks/serve_reliability.py --ckpt ~/.cache/eeengine/sst2-minilm-l6-v1 \
        --requests 10000 --out benchmarks/results/serve_reliability.json
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import sys
import time
import urllib.request
from pathlib import Path

from serve_client import (
    eeengine_serve,
    free_port,
    post,
    post_and_leave,
    rss_mib,
    start_server,
    stop_server,
)

from eeengine import Engine
from eeengine.data import get_task, load_split

BAD_KINDS = ("malformed_json", "empty", "wrong_type", "over_long", "oversized_batch")


def bad_body(kind: str, rng: random.Random, text: str, max_client_batch_size: int) -> bytes:
    """A request the server must refuse with a 4xx."""
    if kind == "malformed_json":
        return json.dumps({"inputs": text})[: rng.randint(1, 12)].encode()
    if kind == "empty":
        return json.dumps({"inputs": rng.choice(["", "   ", [], [[""]]])}).encode()
    if kind == "wrong_type":
        return json.dumps({"inputs": rng.choice([42, None, [1, 2], {"text": text}])}).encode()
    if kind == "over_long":  # far over any max input length, truncate left false
        return json.dumps({"inputs": " ".join([text] * 200)}).encode()
    return json.dumps({"inputs": [[text]] * (max_client_batch_size + 1), "truncate": True}).encode()


def plan(
    n: int, bad: float, disconnects: float, texts: list[str], seed: int, max_client_batch_size: int
) -> list[tuple[str, bytes, list[str]]]:
    """(kind, body, texts of a good request) for each request: kind is "good", "disconnect"
    or one of :data:`BAD_KINDS`."""
    rng = random.Random(seed)
    requests = []
    for i in range(n):
        r = rng.random()
        sample = rng.sample(texts, rng.choice([1, 1, 2, 4]))
        if r < bad:
            kind = BAD_KINDS[i % len(BAD_KINDS)]
            requests.append((kind, bad_body(kind, rng, sample[0], max_client_batch_size), []))
            continue
        inputs = sample[0] if len(sample) == 1 else [[t] for t in sample]
        body = json.dumps({"inputs": inputs, "truncate": True}).encode()
        requests.append(("disconnect" if r < bad + disconnects else "good", body, sample))
    return requests


def labels_of(answer: object, texts: list[str]) -> list[str] | None:
    """The top label of each input in a /predict answer, None if it is not TEI's shape."""
    try:
        per_input = [answer] if len(texts) == 1 else answer
        return [predictions[0]["label"] for predictions in per_input]
    except (KeyError, IndexError, TypeError):
        return None


async def send_all(
    port: int,
    requests: list[tuple[str, bytes, list[str]]],
    expected: dict[str, str],
    concurrency: int,
    seed: int,
) -> collections.Counter:
    """Send ``requests`` from ``concurrency`` clients; count the outcomes."""
    counts: collections.Counter = collections.Counter()
    rng = random.Random(seed)
    queue: asyncio.Queue = asyncio.Queue()
    for request in requests:
        queue.put_nowait(request)

    async def client() -> None:
        while not queue.empty():
            kind, body, texts = queue.get_nowait()
            if kind == "disconnect":
                await post_and_leave(port, body, rng.uniform(0.0, 0.02))
                counts["disconnect_sent"] += 1
                continue
            status, answer = await post(port, body)
            counts[f"status_{status}"] += 1
            if status >= 500:
                counts["5xx"] += 1
            if kind == "good":
                right = labels_of(answer, texts) == [expected[t] for t in texts]
                counts["good_ok" if status == 200 and right else "good_failed"] += 1
            elif 400 <= status < 500 and isinstance(answer, dict) and answer.get("error"):
                counts["bad_4xx"] += 1
            else:
                counts[f"bad_failed_{kind}"] += 1

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return counts


async def shutdown_while_busy(proc, port: int, texts: list[str], requests: int = 16) -> dict:
    """SIGTERM once ``requests`` batches are in flight (the server's
    ``eeengine_requests_in_flight`` says so): each must still be answered 200, and the process
    must exit 0."""
    body = json.dumps({"inputs": [[t] for t in texts[:32]], "truncate": True}).encode()
    pending = [asyncio.ensure_future(post(port, body)) for _ in range(requests)]
    in_flight = 0.0
    for _ in range(600):  # until the server holds them all, or some are done already
        in_flight = await asyncio.to_thread(_in_flight, port)
        if in_flight + sum(p.done() for p in pending) >= requests:
            break
        await asyncio.sleep(0.05)
    exit_status = await asyncio.to_thread(stop_server, proc)
    answers = await asyncio.gather(*pending, return_exceptions=True)
    statuses = [a[0] if isinstance(a, tuple) else type(a).__name__ for a in answers]
    return {
        "in_flight_at_sigterm": in_flight,
        "answered_200": statuses.count(200),
        "requests": requests,
        "statuses": statuses,
        "exit_status": exit_status,
    }


def _in_flight(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("eeengine_requests_in_flight "):
                return float(line.split()[1])
    return 0.0


def run(
    ckpt: str,
    requests: int,
    bad: float = 0.10,
    disconnects: float = 0.05,
    concurrency: int = 16,
    seed: int = 0,
    max_client_batch_size: int = 32,
    serve_options: tuple[str, ...] = (),
    texts: list[str] | None = None,
) -> dict:
    """The whole run; returns its report (see the module docstring for the checks)."""
    texts = texts or load_split(get_task("sst2"), "dev").texts
    engine = Engine(ckpt)
    expected = {
        t: p.label for t, p in zip(texts, engine.predict(texts, batch_size=64), strict=True)
    }
    del engine
    todo = plan(requests, bad, disconnects, texts, seed, max_client_batch_size)
    warmup = len(todo) // 10
    port = free_port()
    proc = start_server(
        eeengine_serve(ckpt, port, "--max-client-batch-size", str(max_client_batch_size),
                       *serve_options),
        port,
    )  # fmt: skip
    try:
        started = time.perf_counter()
        counts = asyncio.run(send_all(port, todo[:warmup], expected, concurrency, seed))
        rss_warm = rss_mib(proc.pid)
        counts += asyncio.run(send_all(port, todo[warmup:], expected, concurrency, seed + 1))
        seconds = time.perf_counter() - started
        rss_end = rss_mib(proc.pid)
        shutdown = asyncio.run(shutdown_while_busy(proc, port, texts))
    finally:
        if proc.poll() is None:
            proc.kill()
    kinds = collections.Counter(kind for kind, _, _ in todo)
    good = kinds["good"]
    bad_total = sum(kinds[k] for k in BAD_KINDS)
    report = {
        "requests": requests,
        "good": good,
        "bad": bad_total,
        "disconnects": kinds["disconnect"],
        "good_answered_right": counts["good_ok"],
        "bad_answered_4xx": counts["bad_4xx"],
        "5xx": counts["5xx"],
        "statuses": {k: v for k, v in sorted(counts.items()) if k.startswith("status_")},
        "rss_mib_after_warmup": round(rss_warm, 1),
        "rss_mib_end": round(rss_end, 1),
        "rss_growth": round(rss_end / rss_warm - 1, 4),
        "seconds": round(seconds, 1),
        "shutdown": shutdown,
    }
    report["passed"] = (
        counts["good_ok"] == good
        and counts["bad_4xx"] == bad_total
        and counts["5xx"] == 0
        and rss_end <= 1.10 * rss_warm
        and shutdown["answered_200"] == shutdown["requests"]
        and shutdown["exit_status"] == 0
    )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    report = run(args.ckpt, args.requests, concurrency=args.concurrency, seed=args.seed)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    sys.exit(0 if report["passed"] else 1)


if __name__ == "__main__":
    main()
