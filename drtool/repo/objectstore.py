"""Object stores: the seven calls every storage implements (restic's backend idea).

`open_store(url)` returns a LocalStore for file:// URLs (or plain paths) and an S3Store for
s3://bucket/prefix. Keys are '/'-separated relative names ("data/ab/abcd..."). Objects are
immutable once written; callers never rely on overwrite except for put().
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Iterator


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float  # seconds since the epoch (LastModified on S3)


class ObjectStore(abc.ABC):
    """put, put_if_absent, get, get_range, list, delete, put_stream (+ stat, open_read)."""

    url: str  # display form, never holding a secret

    @abc.abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Write (or overwrite) an object atomically: readers see all of it or nothing."""

    @abc.abstractmethod
    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Write only if no object has that key. True if written, False if it existed."""

    @abc.abstractmethod
    def get(self, key: str) -> bytes:
        """The whole object; raises ObjectNotFound."""

    @abc.abstractmethod
    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """`length` bytes from `offset` (fewer at the end); raises ObjectNotFound."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with prefix, in key order."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object; deleting a missing key is not an error."""

    @abc.abstractmethod
    def put_stream(self, key: str, chunks: Iterable[bytes]) -> int:
        """Write an object from an iterable of byte chunks with bounded memory (multipart on S3).
        The object appears only when the iterable is exhausted; on error nothing is left behind.
        Returns the number of bytes written."""

    def stat(self, key: str) -> ObjectInfo | None:
        for info in self.list(key):
            if info.key == key:
                return info
        return None

    def open_read(self, key: str) -> BinaryIO:
        """A readable stream of the object (default: the whole object in memory)."""
        import io

        return io.BytesIO(self.get(key))

    def close(self) -> None:
        pass
