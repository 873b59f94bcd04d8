"""Bandwidth limits and a cap on concurrent requests for object stores ([throttle] of a policy).

A backup must never starve the node it protects: `ThrottledStore` wraps any ObjectStore and
makes uploads and downloads wait on token buckets, and every request take a slot of a
concurrency cap.

The bucket lets a request overdraw it ("debt"): a 16 MiB pack at 4 MiB/s goes out at once
and the *next* request waits ~4 s. So one request never blocks forever on a bucket smaller
than itself, and the long-run rate is still the limit.
"""

from __future__ import annotations

import contextlib
import io
import threading
import time
from typing import Any, BinaryIO, Callable, Iterable, Iterator

from drtool.repo.objectstore import ObjectInfo, ObjectStore


class TokenBucket:
    """`rate` bytes per second, bursts up to `burst` bytes (default: one second's worth)."""

    def __init__(self, rate: float, burst: float | None = None, *,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        if rate <= 0:
            raise ValueError(f"rate must be above zero, got {rate}")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else rate)
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.burst
        self._last = clock()
        self._lock = threading.Lock()

    def reserve(self, nbytes: int) -> float:
        """Take `nbytes` from the bucket; the seconds the caller must wait before sending them."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= nbytes
            return max(0.0, -self._tokens / self.rate)

    def consume(self, nbytes: int) -> float:
        """Reserve and wait; returns the seconds waited."""
        wait = self.reserve(nbytes)
        if wait > 0:
            self._sleep(wait)
        return wait


class _Unlimited:
    def consume(self, nbytes: int) -> float:
        return 0.0


def _bucket(rate: int | None, **kw: Any) -> TokenBucket | _Unlimited:
    return TokenBucket(rate, **kw) if rate else _Unlimited()


class ThrottledStore(ObjectStore):
    """Any ObjectStore, with upload/download rates (bytes/s, None = unlimited) and at most
    `max_concurrent` requests in flight. Everything else is delegated unchanged."""

    def __init__(self, store: ObjectStore, upload_rate: int | None = None, download_rate: int | None = None,
                 max_concurrent: int | None = None, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.inner = store
        self.url = store.url
        self.upload = _bucket(upload_rate, clock=clock, sleep=sleep)
        self.download = _bucket(download_rate, clock=clock, sleep=sleep)
        self._slots = threading.BoundedSemaphore(max_concurrent) if max_concurrent else None

    def __repr__(self) -> str:
        return f"ThrottledStore({self.inner!r})"

    @property
    def forkable(self) -> bool:
        """A forked child with its own copy of the limits would double them."""
        unlimited = isinstance(self.upload, _Unlimited) and isinstance(self.download, _Unlimited)
        return unlimited and self._slots is None and self.inner.forkable

    def after_fork(self) -> None:
        self.inner.after_fork()

    def __getattr__(self, name: str) -> Any:  # stale_temp_files, abort_multipart_uploads, root, ...
        return getattr(self.inner, name)

    @contextlib.contextmanager
    def _slot(self) -> Iterator[None]:
        if self._slots is None:
            yield
            return
        with self._slots:
            yield

    # -- writes: wait for the tokens first, then send ------------------------------------------
    def put(self, key: str, data: bytes) -> None:
        self.upload.consume(len(data))
        with self._slot():
            self.inner.put(key, data)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        self.upload.consume(len(data))
        with self._slot():
            return self.inner.put_if_absent(key, data)

    def put_stream(self, key: str, chunks: Iterable[bytes]) -> int:
        def paced() -> Iterator[bytes]:
            for chunk in chunks:
                self.upload.consume(len(chunk))
                yield chunk

        with self._slot():
            return self.inner.put_stream(key, paced())

    # -- reads: the size is known after the fact; the debt delays the next read ----------------
    def get(self, key: str) -> bytes:
        with self._slot():
            data = self.inner.get(key)
        self.download.consume(len(data))
        return data

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        self.download.consume(length)
        with self._slot():
            return self.inner.get_range(key, offset, length)

    def open_read(self, key: str) -> BinaryIO:
        with self._slot():
            raw = self.inner.open_read(key)
        return _PacedReader(raw, self)

    # -- metadata: a slot, no bandwidth ----------------------------------------------------------
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        with self._slot():
            items = list(self.inner.list(prefix))
        return iter(items)

    def delete(self, key: str) -> None:
        with self._slot():
            self.inner.delete(key)

    def stat(self, key: str) -> ObjectInfo | None:
        with self._slot():
            return self.inner.stat(key)

    def close(self) -> None:
        self.inner.close()


class _PacedReader(io.RawIOBase):
    """A stream from open_read whose reads take a slot and are paced by the download bucket."""

    def __init__(self, raw: BinaryIO, store: ThrottledStore):
        self._raw = raw
        self._store = store

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._raw.seekable()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def readinto(self, b: Any) -> int:
        with self._store._slot():
            data = self._raw.read(len(b))
        n = len(data)
        b[:n] = data
        self._store.download.consume(n)
        return n

    def close(self) -> None:
        try:
            self._raw.close()
        finally:
            super().close()


def throttle_store(store: ObjectStore, policy_throttle: Any) -> ObjectStore:
    """Wrap `store` per a policy's ThrottlePolicy; the store itself when nothing is limited."""
    if policy_throttle is None or isinstance(store, ThrottledStore):
        return store
    up, down, cap = policy_throttle.upload, policy_throttle.download, policy_throttle.max_concurrent_requests
    if not (up or down or cap):
        return store
    return ThrottledStore(store, upload_rate=up, download_rate=down, max_concurrent=cap)
