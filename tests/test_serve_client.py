"""The load test's keep-alive client (benchmarks/serve_client.py) against a minimal HTTP/1.1
server written here: connections are reused, bodies framed by Content-Length and chunked
encoding are read whole, a server's ``Connection: close`` is honoured, and a connection the
server closed while idle is replaced."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from serve_client import HOST, ConnectionPool, post  # noqa: E402


def _response(body: bytes, chunked: bool, close: bool) -> bytes:
    head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    head += "Connection: close\r\n" if close else ""
    if not chunked:
        return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body
    halves = [body[: len(body) // 2], body[len(body) // 2 :]]
    chunks = b"".join(f"{len(c):x}\r\n".encode() + c + b"\r\n" for c in halves)
    return f"{head}Transfer-Encoding: chunked\r\n\r\n".encode() + chunks + b"0\r\n\r\n"


async def _exchange(requests: int, close_every: int, say_so: bool = True) -> tuple[list, int]:
    """Send ``requests`` sequential posts through one pool; the server echoes the body's
    ``n``, alternating chunked and Content-Length answers, and closes every
    ``close_every``-th connection after answering (``say_so``: with ``Connection: close``;
    else silently, as a keep-alive timeout does). Returns the answers and connections."""
    connections = 0
    answered = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections, answered
        connections += 1
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            request = json.loads(await reader.readexactly(length))
            answered += 1
            close = answered % close_every == 0
            body = json.dumps({"echo": request["n"]}).encode()
            writer.write(_response(body, chunked=answered % 2 == 0, close=close and say_so))
            await writer.drain()
            if close:
                break
        writer.close()

    server = await asyncio.start_server(handle, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    pool = ConnectionPool(port, size=4)
    answers = [await pool.post(json.dumps({"n": n}).encode(), timeout=10) for n in range(requests)]
    pool.close()
    server.close()
    await server.wait_closed()
    return answers, connections


def test_pool_reuses_connections_and_reads_both_framings() -> None:
    answers, connections = asyncio.run(_exchange(requests=12, close_every=100))
    assert answers == [(200, {"echo": n}) for n in range(12)]
    assert connections == 1


def test_pool_reconnects_after_the_server_closes() -> None:
    answers, connections = asyncio.run(_exchange(requests=12, close_every=4))
    assert answers == [(200, {"echo": n}) for n in range(12)]
    assert connections == 3


def test_pool_retries_a_connection_the_server_closed_silently() -> None:
    answers, connections = asyncio.run(_exchange(requests=12, close_every=4, say_so=False))
    assert answers == [(200, {"echo": n}) for n in range(12)]
    assert connections == 3


def test_one_shot_post_reads_every_framing() -> None:
    """:func:`post` (a connection per request) reads a Content-Length body, a chunked one, and
    one the server ends by closing the connection."""
    body = json.dumps({"echo": 1}).encode()
    framings = [
        _response(body, chunked=False, close=True),
        _response(body, chunked=True, close=True),
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + body,
    ]

    async def run() -> list:
        answers = []
        for raw in framings:

            async def handle(reader, writer, raw=raw) -> None:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(raw)
                await writer.drain()
                writer.close()

            server = await asyncio.start_server(handle, HOST, 0)
            answers.append(await post(server.sockets[0].getsockname()[1], b"{}", timeout=10))
            server.close()
            await server.wait_closed()
        return answers

    assert asyncio.run(run()) == [(200, {"echo": 1})] * 3
