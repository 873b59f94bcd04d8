"""Pack objects: many blobs in one zstd-compressed object.

    [zstd frame: the blobs' bytes, concatenated]
    [zstd frame: JSON header {"v": 1, "blobs": [[kind, id_hex, offset, length], ...]}]
    [u32 LE: length of the header frame] [b"DRP1"]

A pack's key is the SHA-256 of the whole object, so `verify --read-data` checks it without
any index. The trailing header lets a later run re-index packs that a killed backup
uploaded but never listed in an index object.
"""

from __future__ import annotations

import hashlib
import json
import struct
import threading

import zstandard

from drtool.errors import IntegrityError

MAGIC = b"DRP1"
TRAILER = struct.Struct("<I4s")
DATA, TREE = "d", "t"

_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_checksum=True)
    return cache[level]


class PackBuffer:
    """A pack being filled: the blobs' bytes copied into one buffer as they arrive, so the
    sealed pack is compressed in one call over contiguous bytes (zstd's fastest path, and no
    joined copy) and the caller's buffers are free as soon as add() returns."""

    __slots__ = ("body", "entries")

    def __init__(self) -> None:
        self.body = bytearray()
        self.entries: list[list] = []

    def add(self, kind: str, blob_id: str, data) -> None:
        self.entries.append([kind, blob_id, len(self.body), len(data)])
        self.body += data

    def __len__(self) -> int:
        return len(self.body)


def encode(blobs: list[tuple[str, str, bytes]], level: int) -> tuple[bytes, list[list]]:
    """blobs: (kind, id_hex, data). Returns the pack object and its header entries."""
    buf = PackBuffer()
    for kind, blob_id, data in blobs:
        buf.add(kind, blob_id, data)
    return seal(buf, level), buf.entries


def seal(buf: PackBuffer, level: int) -> bytes:
    """The pack object of a filled buffer."""
    cctx = _compressor(level)
    body = cctx.compress(buf.body)
    header = cctx.compress(json.dumps({"v": 1, "blobs": buf.entries}, separators=(",", ":")).encode())
    return b"".join((body, header, TRAILER.pack(len(header), MAGIC)))


def pack_key(obj: bytes) -> str:
    digest = hashlib.sha256(obj).hexdigest()
    return f"data/{digest[:2]}/{digest}"


def decode_body(obj: bytes, key: str) -> bytes:
    """The concatenated blob bytes of a pack, checked by zstd's frame checksum."""
    try:
        return zstandard.ZstdDecompressor().decompressobj().decompress(obj)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"pack {key}: cannot decompress: {exc}") from None


def read_header(tail: bytes, key: str) -> list[list]:
    """Header entries from the end of a pack (`tail` = enough trailing bytes)."""
    if len(tail) < TRAILER.size:
        raise IntegrityError(f"pack {key}: too short for a pack trailer")
    length, magic = TRAILER.unpack(tail[-TRAILER.size:])
    if magic != MAGIC or length + TRAILER.size > len(tail):
        raise IntegrityError(f"pack {key}: bad trailer")
    frame = tail[-TRAILER.size - length:-TRAILER.size]
    try:
        return json.loads(zstandard.ZstdDecompressor().decompressobj().decompress(frame))["blobs"]
    except (zstandard.ZstdError, ValueError, KeyError) as exc:
        raise IntegrityError(f"pack {key}: unreadable header: {exc}") from None
