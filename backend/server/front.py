"""The server's public port: a small HTTP/1.1 front (standard-library asyncio) before Ray Serve's proxy.

Serve's proxy (uvicorn under it, Ray 2.60) offers only an idle keep-alive timeout, started after a response, and an
end-to-end request timeout that would also cut a generation's stream: nothing limits how long a client may take to
send its headers or its body, and the token is seen only once Serve has the request. So the proxy listens on
127.0.0.1 alone, and this front holds the public port (``--host:--port``). For each connection:

- the first byte within ``idle_s``, the request line and headers within ``header_s`` of it (at most MAX_HEAD_BYTES);
- the token checked as soon as the headers are complete, before any byte of the body is read (401, then closed);
- the declared body size checked against the upload limit (413), then the body read within ``body_s`` plus its size
  at ``min_rate`` bytes/s, with no pause longer than ``body_s``;
- at most ``max_unauthenticated`` connections that have not shown the token yet: one more closes the oldest of
  them (503), so that a flood can hold no slot for long and a client with the token still gets in;
- then the whole request goes to Serve's proxy on a loopback connection of its own (``Connection: close``), and its
  answer streams back as it comes, with no time limit: a generation streams for minutes (a keep-alive event every
  few seconds). A client that takes no byte of it for ``write_stall_s``, or closes its connection, ends the
  request (Serve then cancels the job). The client's connection stays open for its next request (``idle_s``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import socket
import threading

from ..protocol import SERVICE
from . import requests as serve_request
from .requests import Refusal

MAX_HEAD_BYTES = 32 * 2**10
# Hop-by-hop headers: this front speaks for the connection (RFC 9110 7.6.1); Expect is answered here.
HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"upgrade", b"expect"}
REASONS = {400: "Bad Request", 401: "Unauthorized", 408: "Request Timeout", 411: "Length Required",
           413: "Content Too Large", 431: "Request Header Fields Too Large", 502: "Bad Gateway",
           503: "Service Unavailable"}

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Limits:
    """The front's timeouts and caps (the defaults are the server's; README: A shared GPU server)."""
    idle_s: float = 5.0  # a new connection's first byte: a client about to ask sends it at once
    header_s: float = 10.0  # the headers (a few hundred bytes) from then: generous over any real network
    body_s: float = 10.0  # the body: this much plus its size at min_rate; also its longest pause
    min_rate: float = 2**20  # bytes/s: a 64 MB upload within 74 s (8 Mbit/s)
    write_stall_s: float = 60.0  # a client that takes nothing of the answer for this long is gone
    max_unauthenticated: int = 64  # connections that have not shown the token yet
    linger_s: float = 1.0  # after a refusal, the unread request is discarded this long, so the refusal arrives


class Front:
    def __init__(self, upstream: tuple, token_digest: bytes, max_body: int, limits: Limits = Limits()):
        self.upstream, self.token_digest, self.max_body, self.limits = upstream, token_digest, max_body, limits
        self.unauthenticated: collections.OrderedDict = collections.OrderedDict()  # task -> writer, oldest first

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self.unauthenticated[task] = writer
        while len(self.unauthenticated) > self.limits.max_unauthenticated:
            oldest, its_writer = self.unauthenticated.popitem(last=False)
            _send_refusal(its_writer, Refusal(503, "busy", "The server has too many connections waiting to send "
                                                           "their request", "Try again in a moment"))
            oldest.cancel()
        try:
            first = b""
            while (request := await self._request(reader, writer, task, first)) is not None:
                head, body, keep = request
                first = await self._forward(head + body, reader, writer)
                if first is None or not keep:
                    break
        except Refusal as refusal:
            _send_refusal(writer, refusal)
            await self._linger(reader, writer)
        except (asyncio.CancelledError, ConnectionError, OSError):
            pass
        except Exception:  # noqa: BLE001 - a bug here must not end the server: this connection goes
            logger.exception("the front failed on a connection")
        finally:
            self.unauthenticated.pop(task, None)
            writer.close()

    async def _request(self, reader, writer, task, first: bytes = b"") -> tuple | None:
        """The request to pass on: (its head, rewritten; its body, whole; whether the client keeps the connection
        for another); None: the client sent nothing for idle_s (or closed the connection); or :class:`Refusal`.
        ``first``: the request's first byte, already read."""
        limits = self.limits
        try:
            first = first or await asyncio.wait_for(reader.read(1), limits.idle_s)
        except asyncio.TimeoutError:
            return None
        if not first:
            return None
        try:
            head = first + await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), limits.header_s)
        except asyncio.TimeoutError:
            raise Refusal(408, "bad_request", "The request's headers did not arrive in time") from None
        except asyncio.LimitOverrunError:
            raise Refusal(431, "bad_request", f"The request's headers exceed {MAX_HEAD_BYTES // 1024} KB") from None
        except asyncio.IncompleteReadError:
            raise ConnectionResetError from None
        line, headers = _parse_head(head)

        refusal = serve_request.unauthorized(self.token_digest, _header(headers, b"authorization"))
        if refusal is not None:  # before any byte of the body
            raise refusal
        self.unauthenticated.pop(task, None)

        if _header(headers, b"transfer-encoding") is not None:
            raise Refusal(411, "bad_request", "Send the request body with a Content-Length, not chunked")
        declared = _header(headers, b"content-length") or "0"
        if not declared.isdigit() or len({v for k, v in headers if k == b"content-length"}) > 1:
            raise Refusal(400, "bad_request", "The request's Content-Length is not a number")
        size = int(declared)
        if size > self.max_body:
            raise serve_request.too_large(size, self.max_body)
        if size and (_header(headers, b"expect") or "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = await self._body(reader, size)
        kept = b"".join(k + b": " + v.encode("latin-1") + b"\r\n" for k, v in headers if k not in HOP_BY_HOP)
        keep = line.endswith(b"HTTP/1.1") and "close" not in (_header(headers, b"connection") or "").lower()
        return line + b"\r\n" + kept + b"Connection: close\r\n\r\n", body, keep

    async def _body(self, reader, size: int) -> bytes:
        limits = self.limits
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limits.body_s + size / limits.min_rate
        chunks, left = [], size
        try:
            while left:
                wait = min(limits.body_s, deadline - loop.time())
                if wait <= 0:
                    raise asyncio.TimeoutError
                chunk = await asyncio.wait_for(reader.read(min(left, 2**20)), wait)
                if not chunk:
                    raise ConnectionResetError
                chunks.append(chunk)
                left -= len(chunk)
        except asyncio.TimeoutError:
            raise Refusal(408, "bad_request", f"The request's body did not arrive in time ({size - left:,} of "
                                              f"{size:,} bytes)", "Check the network to the server") from None
        return b"".join(chunks)

    async def _forward(self, request: bytes, reader, writer) -> bytes | None:
        """The request to Serve's proxy (one connection each); its answer back as it comes, until it ends or the
        client goes (then the proxy's connection closes: Serve cancels the request). None where the client's
        connection is done; else the first byte of its next request, if it came already (b"" if not)."""
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream, limit=MAX_HEAD_BYTES)
        except OSError:
            raise Refusal(502, "server_error", "The server is not ready (its Ray Serve proxy cannot be reached)",
                          "Try again in a moment; the server's log says more") from None
        try:
            up_writer.write(request)
            down = asyncio.ensure_future(self._pipe(up_reader, writer))
            heard = asyncio.ensure_future(reader.read(1))  # b"": the client closed its connection (a cancel)
            try:
                done, _ = await asyncio.wait({down, heard}, return_when=asyncio.FIRST_COMPLETED)
                if heard in done and not heard.exception() and heard.result():
                    await down  # the client's next request (sent once it had this whole answer): this one first
                    return heard.result()
                return b"" if down in done and not down.exception() else None
            finally:
                down.cancel()
                heard.cancel()
                await asyncio.gather(down, heard, return_exceptions=True)
        finally:
            up_writer.close()

    async def _pipe(self, source: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The proxy's answer, its ``Connection: close`` (asked of it by this front) left out: the client's
        connection stays open for its next request, as it would have with the proxy itself."""
        head = await source.readuntil(b"\r\n\r\n")
        lines = head[:-4].split(b"\r\n")
        kept = [line for line in lines[1:] if line.partition(b":")[0].strip().lower() not in HOP_BY_HOP]
        writer.write(b"\r\n".join([lines[0], *kept]) + b"\r\n\r\n")
        while chunk := await source.read(2**16):
            writer.write(chunk)
            await asyncio.wait_for(writer.drain(), self.limits.write_stall_s)
        await writer.drain()

    async def _linger(self, reader, writer) -> None:
        """After a refusal, read (and drop) what the client still sends, a short while: closing a socket with unread
        data resets the connection, and the client might then never read the refusal."""
        with contextlib.suppress(Exception):
            writer.write_eof()
            await asyncio.wait_for(_until_closed(reader), self.limits.linger_s)


async def _until_closed(reader: asyncio.StreamReader) -> None:
    while await reader.read(2**16):
        pass


def _parse_head(head: bytes) -> tuple:
    """(the request line, [(lower-case name, value)]), or :class:`Refusal`."""
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or not parts[0].isalpha() or not parts[1]:
        raise Refusal(400, "bad_request", "This is not an HTTP/1.1 request")
    headers = []
    for raw in lines[1:]:
        name, colon, value = raw.partition(b":")
        if not colon or not name or name != name.strip() or raw[:1] in (b" ", b"\t"):
            raise Refusal(400, "bad_request", "A request header is malformed")
        headers.append((name.lower(), value.strip().decode("latin-1")))
    return lines[0], headers


def _header(headers: list, name: bytes) -> str | None:
    return next((v for k, v in headers if k == name), None)


def _send_refusal(writer: asyncio.StreamWriter, refusal: Refusal) -> None:
    body = json.dumps({**refusal.body(), "service": SERVICE}).encode()
    head = [f"HTTP/1.1 {refusal.status} {REASONS.get(refusal.status, 'Error')}", "Content-Type: application/json",
            f"Content-Length: {len(body)}", "Cache-Control: no-store", "Connection: close",
            *(["WWW-Authenticate: Bearer"] if refusal.status == 401 else [])]
    with contextlib.suppress(Exception):
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)


class Running:
    """The front on its own thread and event loop; :meth:`stop` ends it (and every connection)."""

    def __init__(self, sock: socket.socket, front: Front):
        self.loop = asyncio.new_event_loop()
        self.front = front
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="front")
        self.thread.start()

        async def listen():
            return await asyncio.start_server(front.handle, sock=sock, limit=MAX_HEAD_BYTES)

        self.server = asyncio.run_coroutine_threadsafe(listen(), self.loop).result(timeout=30)

    def stop(self) -> None:
        async def close():
            self.server.close()
            tasks = asyncio.all_tasks() - {asyncio.current_task()}
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=2)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self.loop).result(timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


def listen(host: str, port: int, family=socket.AF_INET) -> socket.socket:
    """The public socket, bound now (a taken port fails here)."""
    return socket.create_server((host, port), family=family, backlog=1024)


def start(sock: socket.socket, upstream: tuple, token_digest: bytes, max_body: int,
          limits: Limits = Limits()) -> Running:
    return Running(sock, Front(upstream, token_digest, max_body, limits))
