"""What the server benchmarks share: start a server process and wait for /health, its
resident memory, stop it with SIGTERM, and a small HTTP/1.1 client over loopback.

The client speaks HTTP/1.1 over asyncio streams: :func:`post` opens one connection per
request (``Connection: close``), so a request can also be sent and abandoned (a client that
disconnects) and malformed bodies go out as they are; :class:`ConnectionPool` keeps
connections open and reuses them (keep-alive), as a service calling a model server does.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(command: list[str], port: int, timeout: float = 900.0, log: Path | None = None):
    """Start ``command`` (a server listening on ``port``) and wait until /health answers 200.

    Raises:
        RuntimeError: the process exited or never became healthy (its output is in the message
            or in ``log``).
    """
    out = open(log, "w") if log is not None else subprocess.PIPE  # noqa: SIM115
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            output = proc.stdout.read() if proc.stdout else Path(log).read_text()
            raise RuntimeError(f"server exited with {proc.returncode}:\n{output[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server on port {port} not healthy after {timeout} s")


def eeengine_serve(ckpt: str, port: int, *options: str) -> list[str]:
    """The command line of ``eeengine serve`` for ``ckpt`` on ``port``."""
    return [sys.executable, "-m", "eeengine.cli", "serve", "--ckpt", str(ckpt), "--port",
            str(port), "--log-level", "warning", *options]  # fmt: skip


def rss_mib(pid: int) -> float:
    """Resident memory of a process (VmRSS), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def stop_server(proc: subprocess.Popen, timeout: float = 300.0) -> int:
    """SIGTERM, then the exit status (killed after ``timeout`` s: returns -9)."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return -9


def request_bytes(
    port: int, body: bytes, path: str = "/predict", connection: str = "close"
) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: {connection}\r\n\r\n"
    ).encode() + body


class ConnectionPool:
    """Up to ``size`` keep-alive connections to the server on ``port``, each carrying one
    request at a time; a request waits for a free connection when all are busy (that wait
    counts in its latency). Connections open on demand and close when the server says so.
    """

    def __init__(self, port: int, size: int = 256) -> None:
        self.port = port
        self._slots = asyncio.Semaphore(size)
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, body: bytes, timeout: float = 60.0) -> tuple[int, object]:
        """POST ``body`` to /predict; (status, parsed JSON body or the raw text). A kept
        connection the server has closed meanwhile (its keep-alive timeout) is dropped and the
        request goes out again on the next one, or a new one, as HTTP client pools do."""
        async with self._slots:
            while self._idle:
                try:
                    return await self._exchange(*self._idle.pop(), body, timeout)
                except (asyncio.IncompleteReadError, ConnectionError):
                    continue  # closed by the server while idle
            connection = await asyncio.open_connection(HOST, self.port)
            return await self._exchange(*connection, body, timeout)

    async def _exchange(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        body: bytes,
        timeout: float,
    ) -> tuple[int, object]:
        try:
            writer.write(request_bytes(self.port, body, connection="keep-alive"))
            await writer.drain()
            head, payload = await asyncio.wait_for(_read_response(reader), timeout)
        except BaseException:
            writer.close()
            raise
        if b"connection: close" in head.lower():
            writer.close()
        else:
            self._idle.append((reader, writer))
        return _parsed(head, payload)

    def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


async def _read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One response's head and body, framed by ``Content-Length``, chunked encoding, or (with
    neither) the server closing the connection."""
    head = await reader.readuntil(b"\r\n\r\n")
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        body = b""
        while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
            body += (await reader.readexactly(size + 2))[:-2]
        await reader.readuntil(b"\r\n")
        return head, body
    length = next(
        (
            int(line.split(b":", 1)[1])
            for line in lower.split(b"\r\n")
            if line.startswith(b"content-length:")
        ),
        None,
    )
    return head, await (reader.read() if length is None else reader.readexactly(length))


def _parsed(head: bytes, payload: bytes) -> tuple[int, object]:
    status = int(head.split(b" ", 2)[1])
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, payload.decode(errors="replace")


async def post(port: int, body: bytes, timeout: float = 60.0) -> tuple[int, object]:
    """POST ``body`` to /predict; (status, parsed JSON body or the raw text)."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(request_bytes(port, body))
        await writer.drain()
        head, payload = await asyncio.wait_for(_read_response(reader), timeout)
    finally:
        writer.close()
    return _parsed(head, payload)


async def post_and_leave(port: int, body: bytes, after: float) -> None:
    """Send a request and close the connection ``after`` seconds, unanswered (a client that
    disconnects)."""
    _, writer = await asyncio.open_connection(HOST, port)
    writer.write(request_bytes(port, body))
    await writer.drain()
    await asyncio.sleep(after)
    writer.close()
