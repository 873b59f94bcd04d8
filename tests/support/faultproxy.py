"""A TCP fault proxy between drtool and moto_server: real sockets, real HTTP, switchable faults.

    proxy = FaultProxy("http://127.0.0.1:PORT").start()   # or the `fault_proxy` fixture
    proxy.endpoint                                        # give this to drtool as endpoint_url
    proxy.fail(3, status=500, method="PUT", path="/data/")  # the next 3 matching requests: HTTP 500
    proxy.slow_down(2)                                    # 503 with S3's <Code>SlowDown</Code> body
    proxy.drop(after_bytes=100_000, direction="upload")   # cut the connection mid-body
    proxy.stall(seconds=5, method="GET")                  # hold the connection, then close it
    proxy.clear()

The proxy reads each HTTP/1.1 request head (keep-alive connections carry several), matches it
against the pending faults (method, and a regex searched in the request target), and either
answers itself, stalls, cuts the connection, or relays request and response to the upstream
server byte for byte (Content-Length and chunked bodies, `Expect: 100-continue`). Each fault
applies to the next `count` matching requests. `proxy.log` lists (method, path, outcome).
"""

from __future__ import annotations

import re
import socket
import threading
import time
from dataclasses import dataclass
from typing import Iterator
from urllib.parse import urlsplit

import pytest

_REASONS = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
            504: "Gateway Timeout", 400: "Bad Request", 403: "Forbidden"}
_S3_ERROR = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
             '<RequestId>faultproxy</RequestId></Error>')


@dataclass
class Fault:
    kind: str              # "status" | "drop" | "stall"
    count: int             # matching requests still to hit
    method: str | None     # "PUT", "GET", ... or any
    path: re.Pattern | None
    status: int = 500
    code: str = "InternalError"
    after_bytes: int = 0   # drop: body bytes relayed before the cut
    direction: str = "download"  # drop: "upload" (request body) or "download" (response body)
    seconds: float = 0.0   # stall

    def matches(self, method: str, target: str) -> bool:
        return (self.count > 0 and (self.method is None or self.method == method)
                and (self.path is None or bool(self.path.search(target))))


class _Closed(Exception):
    pass


class _Conn:
    """A socket with a read buffer: heads by line, bodies by length."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()

    def _fill(self) -> None:
        data = self.sock.recv(256 * 1024)
        if not data:
            raise _Closed()
        self.buf += data

    def read_head(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self.buf[:end + 4])
                del self.buf[:end + 4]
                return head
            if len(self.buf) > 1 << 20:
                raise _Closed()
            self._fill()

    def read_line(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buf[:end + 2])
                del self.buf[:end + 2]
                return line
            self._fill()

    def read_some(self, limit: int) -> bytes:
        if not self.buf:
            self._fill()
        piece = bytes(self.buf[:limit])
        del self.buf[:limit]
        return piece


def _parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return lines[0], headers


class FaultProxy:
    def __init__(self, upstream: str):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.faults: list[Fault] = []
        self.log: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self.endpoint = ""

    # ---- switching faults ---------------------------------------------------------------------
    def _add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    @staticmethod
    def _pattern(path: str | None) -> re.Pattern | None:
        return re.compile(path) if path else None

    def fail(self, count: int = 1, status: int = 500, *, method: str | None = None, path: str | None = None,
             code: str | None = None) -> Fault:
        """Answer the next `count` matching requests with HTTP `status` and an S3 XML error body."""
        code = code or {500: "InternalError", 503: "ServiceUnavailable"}.get(status, "InternalError")
        return self._add(Fault("status", count, method, self._pattern(path), status=status, code=code))

    def slow_down(self, count: int = 1, *, method: str | None = None, path: str | None = None) -> Fault:
        """S3's throttling answer: 503 with <Code>SlowDown</Code>."""
        return self.fail(count, 503, method=method, path=path, code="SlowDown")

    def drop(self, after_bytes: int = 0, count: int = 1, *, direction: str = "download",
             method: str | None = None, path: str | None = None) -> Fault:
        """Cut the connection after `after_bytes` bytes of the request body ("upload") or of the
        response body ("download") have passed; after_bytes=-1 with "download": the server
        handles the request but the answer's head never reaches the client."""
        assert direction in ("upload", "download")
        return self._add(Fault("drop", count, method, self._pattern(path), after_bytes=after_bytes,
                               direction=direction))

    def stall(self, seconds: float, count: int = 1, *, method: str | None = None, path: str | None = None) -> Fault:
        """Hold the matching request's connection, saying nothing, for `seconds`; then close it."""
        return self._add(Fault("stall", count, method, self._pattern(path), seconds=seconds))

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def injected(self) -> int:
        """How many requests met a fault so far."""
        hit = sum(1 for _m, _p, outcome in self.log if outcome.startswith(("status", "stall", "drop")))
        return hit - sum(1 for _m, _p, outcome in self.log if outcome.startswith("not cut"))

    def _take(self, method: str, target: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.matches(method, target):
                    fault.count -= 1
                    return fault
        return None

    # ---- running ------------------------------------------------------------------------------
    def start(self) -> "FaultProxy":
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.endpoint = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, name="faultproxy", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._listener:
            self._listener.close()
        with self._lock:
            for s in list(self._sockets):
                _close(s)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _track(self, s: socket.socket) -> socket.socket:
        with self._lock:
            self._sockets.add(s)
        return s

    def _serve(self, client_sock: socket.socket) -> None:
        client = _Conn(self._track(client_sock))
        upstream: _Conn | None = None
        try:
            while not self._stop.is_set():
                head = client.read_head()
                line, headers = _parse_head(head)
                method, target = (line.split(" ") + ["", ""])[:2]
                fault = self._take(method, target)
                expect = headers.get("expect", "").lower() == "100-continue"
                if fault and fault.kind == "status":
                    self.log.append((method, target, f"status {fault.status} {fault.code}"))
                    if not expect:
                        self._discard_body(client, headers)
                    body = _S3_ERROR.format(code=fault.code, message="injected by faultproxy").encode()
                    client.sock.sendall(
                        f"HTTP/1.1 {fault.status} {_REASONS.get(fault.status, 'Error')}\r\n"
                        f"Content-Type: application/xml\r\nContent-Length: {len(body)}\r\n"
                        "Connection: close\r\n\r\n".encode() + body)
                    return
                if fault and fault.kind == "stall":
                    self.log.append((method, target, f"stall {fault.seconds}s"))
                    self._stop.wait(fault.seconds)
                    return
                cut_up = fault.after_bytes if fault and fault.direction == "upload" else None
                cut_down = fault.after_bytes if fault and fault.direction == "download" else None
                self.log.append((method, target, f"drop {fault.direction} after {fault.after_bytes}" if fault
                                 else "relayed"))
                if upstream is None:
                    upstream = _Conn(self._track(socket.create_connection(self.upstream, timeout=120)))
                if expect:
                    # Answer the client's wait ourselves and ask the server for no interim
                    # response: one request-response exchange per request upstream.
                    head = re.sub(rb"(?im)^expect:[^\r\n]*\r\n", b"", head)
                    client.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                upstream.sock.sendall(head)
                if not self._relay_body(client, upstream, headers, cut_up):
                    return
                self._relay_response(upstream, client, upstream.read_head(), method, cut_down, fault)
        except (_Closed, OSError):
            pass
        finally:
            for conn in (client, upstream):
                if conn is not None:
                    _close(conn.sock)
                    with self._lock:
                        self._sockets.discard(conn.sock)

    @staticmethod
    def _discard_body(client: _Conn, headers: dict[str, str]) -> None:
        left = int(headers.get("content-length", "0") or 0)
        while left > 0:
            left -= len(client.read_some(left))

    def _relay_body(self, src: _Conn, dst: _Conn, headers: dict[str, str], cut: int | None) -> bool:
        """Relay a message body; False if the connection was cut on purpose."""
        sent = 0
        if "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                size_line = src.read_line()
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                block = size_line
                left = size + 2 if size else 0
                while left > 0:
                    block += src.read_some(left)
                    left = size + 2 - (len(block) - len(size_line))
                if size == 0:  # trailers up to the blank line
                    while True:
                        line = src.read_line()
                        block += line
                        if line == b"\r\n":
                            break
                if cut is not None and sent + len(block) > cut:
                    dst.sock.sendall(block[:max(0, cut - sent)])
                    return False
                dst.sock.sendall(block)
                sent += len(block)
                if size == 0:
                    return True
        left = int(headers.get("content-length", "0") or 0)
        while left > 0:
            piece = src.read_some(min(left, 256 * 1024))
            if cut is not None and sent + len(piece) > cut:
                dst.sock.sendall(piece[:max(0, cut - sent)])
                return False
            dst.sock.sendall(piece)
            sent += len(piece)
            left -= len(piece)
        return cut is None  # a cut set beyond the body: the connection closes right after it

    def _relay_response(self, upstream: _Conn, client: _Conn, head: bytes, method: str, cut: int | None,
                        fault: Fault | None = None) -> None:
        line, headers = _parse_head(head)
        status = int(line.split(" ", 2)[1])
        if cut is not None and cut < 0:  # the request was served, the answer never arrives
            raise _Closed()
        client.sock.sendall(head)
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            if cut is not None:
                raise _Closed()
            return
        if "content-length" not in headers and "chunked" not in headers.get("transfer-encoding", "").lower():
            while True:  # body until the server closes
                client.sock.sendall(upstream.read_some(256 * 1024))
        if cut is not None and int(headers.get("content-length", cut + 1)) <= cut:
            # Too short to cut: relay it and leave the fault for the next matching request.
            with self._lock:
                fault.count += 1
                self.log.append((method, "", "not cut: response too short"))
            cut = None
        if not self._relay_body(upstream, client, headers, cut):
            raise _Closed()
        if headers.get("connection", "").lower() == "close":
            raise _Closed()


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


@pytest.fixture
def fault_proxy(moto_server: str) -> Iterator[FaultProxy]:
    """A FaultProxy in front of the session's moto_server, with no faults set."""
    proxy = FaultProxy(moto_server).start()
    try:
        yield proxy
    finally:
        proxy.stop()


def wait_for(predicate, timeout: float = 30.0, every: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return False
