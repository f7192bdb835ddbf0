"""Load test of ``eeengine serve``: open-loop Poisson arrivals at rising offered load.

Servers, each its own process on 127.0.0.1, the same FastAPI app, the same limits:

- ``eeengine``: ``eeengine serve`` (layer-wise continuous batching);
- ``uncut``: the same with ``--split-cost inf``: inputs of one depth always run as one
  layer call, padded to the longest (opt in with ``--servers``);
- ``static``: ``eeengine serve --batching static`` (a batch runs to completion, TEI's scheme);
- ``hf``: ``benchmarks/serve_hf.py``, Hugging Face transformers at full depth with TEI-style
  dynamic batching (what a user writes today).

This process is the client: for each offered load (requests/s) it sends one-input requests
(``truncate: true``) at exponential inter-arrival times, never waiting for answers (open
loop), for ``--seconds`` or ``--max-requests``, whichever ends first. Requests go over a pool
of keep-alive connections (``--connection keep-alive``, the default: what a service calling
the model server does; a request waits for a free connection when 256 are busy) or each on a
new connection (``--connection close``: connection set-up then costs both processes CPU).
Latency runs from a request's scheduled arrival to its full answer. At each load the servers
take turns in a rotating order, so drifts of a shared CPU hit them alike; a server
leaves the ramp once its p99 passes ``--give-up-ms`` or an answer fails. Inputs: SST-2 dev
sentences (``sst2``) and the long IMDB reviews of ``data/IMDB-long`` (``imdb``, served with
``--max-input-length`` 512).

Per server and load: p50 / p99 latency (ms), throughput (answers/s) and failures; per server:
the largest load held with p99 <= 100 ms and no failure. Then the ratios of the issue's targets.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/serve_load.py \
        --ckpt ~/.cache/eeengine/sst2-minilm-l6-v1 --out benchmarks/results/serve_load
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from functools import partial
from pathlib import Path

from results_io import markdown_table, write_results
from serve_client import (
    ConnectionPool,
    eeengine_serve,
    free_port,
    post,
    start_server,
    stop_server,
)

from eeengine.data import file_split, get_task, load_split

SERVERS = ("eeengine", "static", "hf", "uncut")
LOADS = {
    "sst2": [2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384],
    "imdb": [0.5, 1, 2, 4, 8, 16],
}
MAX_INPUT_LENGTH = {"sst2": None, "imdb": 512}


def server_command(name: str, ckpt: str, port: int, data: str, precision: str) -> list[str]:
    """The command line of server ``name``; eeengine's servers run ``precision`` layers (the
    Hugging Face server stays fp32 eager, what a user writes today)."""
    options = []
    if MAX_INPUT_LENGTH[data] is not None:
        options += ["--max-input-length", str(MAX_INPUT_LENGTH[data])]
    if name == "hf":
        script = Path(__file__).with_name("serve_hf.py")
        return [sys.executable, str(script), "--ckpt", ckpt, "--port", str(port), *options]
    options += ["--precision", precision]
    if name == "static":
        options += ["--batching", "static"]
    if name == "uncut":
        options += ["--split-cost", "inf"]
    return eeengine_serve(ckpt, port, *options)


def texts_of(data: str) -> list[str]:
    if data == "sst2":
        return load_split(get_task("sst2"), "dev").texts
    path = Path(__file__).resolve().parents[1] / "data" / "IMDB-long" / "reviews.tsv"
    return file_split(path, "sentence", "label").texts


async def open_loop(
    port: int,
    texts: list[str],
    rate: float,
    seconds: float,
    max_requests: int,
    seed: int,
    keep_alive: bool = True,
) -> dict:
    """Poisson arrivals at ``rate`` requests/s; latencies (ms) of the answers. ``keep_alive``:
    over a :class:`ConnectionPool`, else one connection per request."""
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    while len(arrivals) < max_requests:
        t += rng.expovariate(rate)
        if t > seconds:
            break
        arrivals.append(t)
    bodies = [
        json.dumps({"inputs": rng.choice(texts), "truncate": True}).encode() for _ in arrivals
    ]
    start = time.perf_counter() + 0.05
    latencies: list[float] = []
    failures: dict[str, int] = {}
    done_at: list[float] = []
    pool = ConnectionPool(port) if keep_alive else None
    send = pool.post if pool is not None else partial(post, port)

    async def one(at: float, body: bytes) -> None:
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        try:
            status, _ = await send(body, timeout=120)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as error:
            status = type(error).__name__
        end = time.perf_counter()
        if status == 200:
            latencies.append((end - start - at) * 1000)
            done_at.append(end)
        else:
            failures[str(status)] = failures.get(str(status), 0) + 1

    await asyncio.gather(*(one(at, body) for at, body in zip(arrivals, bodies, strict=True)))
    if pool is not None:
        pool.close()
    span = (max(done_at) - start) if done_at else float("nan")
    latencies.sort()
    return {
        "offered": rate,
        "requests": len(arrivals),
        "answered": len(latencies),
        "failures": failures,
        "p50_ms": _quantile(latencies, 0.50),
        "p99_ms": _quantile(latencies, 0.99),
        "mean_ms": statistics.fmean(latencies) if latencies else float("nan"),
        "throughput": len(latencies) / span if done_at else 0.0,
    }


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]


def held(rows: list[dict], p99_ms: float = 100.0) -> float:
    """The largest offered load with p99 <= ``p99_ms`` and every request answered."""
    ok = [r["offered"] for r in rows if not r["failures"] and r["p99_ms"] <= p99_ms]
    return max(ok, default=0.0)


def run(args: argparse.Namespace) -> dict:
    report: dict = {"environment": _environment(), "args": vars(args) | {"out": str(args.out)}}
    for data in args.data:
        texts = texts_of(data)
        ports = {name: free_port() for name in args.servers}
        procs = {}
        try:
            for name in args.servers:  # started one after the other: loading is CPU-bound
                procs[name] = start_server(
                    server_command(name, args.ckpt, ports[name], data, args.precision), ports[name]
                )
            rows: dict[str, list[dict]] = {name: [] for name in args.servers}
            live = list(args.servers)
            for k, rate in enumerate(args.loads or LOADS[data]):
                order = live[k % len(live) :] + live[: k % len(live)] if live else []
                for name in order:
                    row = asyncio.run(
                        open_loop(
                            ports[name],
                            texts,
                            rate,
                            args.seconds,
                            args.max_requests,
                            k,
                            keep_alive=args.connection == "keep-alive",
                        )
                    )
                    rows[name].append(row)
                    print(f"{data} {name:9s} {json.dumps(row)}", flush=True)
                    if row["failures"] or row["p99_ms"] > args.give_up_ms:
                        live.remove(name)
                if not live:
                    break
        finally:
            shutdown = {name: stop_server(proc) for name, proc in procs.items()}
        report[data] = {
            "rows": rows,
            "held_p99_100ms": {name: held(rows[name]) for name in args.servers},
            "exit_status": shutdown,
        }
        report[data]["ratios"] = _ratios(rows, report[data]["held_p99_100ms"])
    return report


def _ratios(rows: dict[str, list[dict]], held_loads: dict[str, float]) -> dict:
    """The issue's targets: held-load ratios, and p50 ratio at the largest load both eeengine
    and the HF server held."""
    out = {}
    if {"eeengine", "hf"} <= held_loads.keys() and held_loads["hf"]:
        out["held_eeengine_over_hf"] = held_loads["eeengine"] / held_loads["hf"]
    if {"eeengine", "static"} <= held_loads.keys() and held_loads["static"]:
        out["held_eeengine_over_static"] = held_loads["eeengine"] / held_loads["static"]
    if {"eeengine", "hf"} <= rows.keys():
        both = min(held_loads["eeengine"], held_loads["hf"])
        p50 = {
            name: next((r["p50_ms"] for r in rows[name] if r["offered"] == both), None)
            for name in ("eeengine", "hf")
        }
        if both and None not in p50.values():
            out["p50_at_load"] = both
            out["p50_eeengine_over_hf"] = p50["eeengine"] / p50["hf"]
    return out


def _environment() -> dict:
    return {
        "cpus": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def markdown(report: dict) -> str:
    lines = []
    for data in (d for d in ("sst2", "imdb") if d in report):
        part = report[data]
        lines += [
            f"**{data}** (largest load with p99 <= 100 ms: "
            + ", ".join(f"{n} {v:g} req/s" for n, v in part["held_p99_100ms"].items())
            + ")",
            "",
        ]
        header = ["offered req/s", *(f"{n} p50 / p99 ms, req/s" for n in part["rows"])]
        body = []
        loads = sorted({r["offered"] for rows in part["rows"].values() for r in rows})
        for load in loads:
            cells = [f"{load:g}"]
            for rows in part["rows"].values():
                r = next((r for r in rows if r["offered"] == load), None)
                if r is None:
                    cells.append("")
                    continue
                failed = f", {sum(r['failures'].values())} failed" if r["failures"] else ""
                cells.append(
                    f"{r['p50_ms']:.0f} / {r['p99_ms']:.0f}, {r['throughput']:.0f}{failed}"
                )
            body.append(cells)
        lines += [markdown_table(header, body), "ratios: " + json.dumps(part["ratios"]), ""]
    loadavg = report["environment"]["loadavg_at_start"]
    lines.append(f"load average at start: {loadavg[0]:.1f} on {report['environment']['cpus']} CPUs")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--data", nargs="+", choices=list(LOADS), default=list(LOADS))
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS[:3]))
    parser.add_argument(
        "--precision", default="fp32", help="eeengine's layers (both batchers): fp32 or int8"
    )
    parser.add_argument("--loads", nargs="+", type=float, help="req/s (default: LOADS)")
    parser.add_argument("--seconds", type=float, default=10.0, help="per server and load")
    parser.add_argument("--max-requests", type=int, default=1500, help="per server and load")
    parser.add_argument(
        "--connection",
        choices=["keep-alive", "close"],
        default="keep-alive",
        help="a pool of kept connections, or a new connection per request",
    )
    parser.add_argument("--give-up-ms", type=float, default=1000.0, help="p99 that ends a ramp")
    parser.add_argument("--out", type=Path, help="writes OUT.json and OUT.md")
    args = parser.parse_args()
    report = run(args)
    text = markdown(report)
    print(text)
    if args.out:
        write_results(args.out, report, text)


if __name__ == "__main__":
    main()
