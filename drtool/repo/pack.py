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
import mmap
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


BUFFER_SIZE = 16 << 20  # a pack's raw bytes (8 MiB) plus the blob that tips it over (<= 8 MiB)
_idle_max = 1          # idle buffers kept (keep_idle): more only hold memory
_pool: list[mmap.mmap] = []
_pool_lock = threading.Lock()


def private_memory(size: int) -> mmap.mmap:
    """Anonymous memory private to this process. mmap's default, MAP_SHARED, would be shared
    with a forked child (repo/forked.py), both then filling the same pack buffers."""
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def take_buffer() -> mmap.mmap:
    """A BUFFER_SIZE buffer from the pool (or a new one). Pack bytes pass through these again
    and again (filled, compressed into, decompressed into): a fresh allocation per
    pack costs 2,048 page faults to fill and an munmap to free, for every 8 MiB moved (the
    sample node's backup: 700k faults, 15 % of its CPU time)."""
    with _pool_lock:
        if _pool:
            return _pool.pop()
    # Anonymous memory: pages are only backed once written, and a buffer that comes back from a
    # sealed pack is reused as it is, with no fresh page faults and no munmap for the next one.
    return private_memory(BUFFER_SIZE)


def give_back(buf: mmap.mmap) -> None:
    """Return a take_buffer() buffer: nothing may use it any more, views included."""
    with _pool_lock:
        if len(buf) == BUFFER_SIZE and len(_pool) < _idle_max:
            _pool.append(buf)


def keep_idle(count: int) -> None:
    """How many idle buffers the pool keeps: about what the running pipeline has in flight
    (a restore's packs fetched ahead), so buffers given back in a burst serve the next packs
    rather than being unmapped and mapped again. No more: each holds up to 16 MiB (a
    1.17M-file restore peaked 30 MiB higher with 8 per process, where 2 serve as well)."""
    global _idle_max
    with _pool_lock:
        _idle_max = count
        del _pool[count:]  # unmapped as their last reference goes


class PackBuffer:
    """A pack being filled: the blobs' bytes copied into one buffer as they arrive, so the
    sealed pack is compressed in one call over contiguous bytes (zstd's fastest path, and no
    joined copy) and the caller's buffers are free as soon as add() returns. Buffers are
    reused from pack to pack (release())."""

    __slots__ = ("body", "size", "entries")

    def __init__(self) -> None:
        self.body: mmap.mmap | None = None
        self.size = 0
        self.entries: list[list] = []

    def add(self, kind: str, blob_id: str, data) -> None:
        n = len(data)
        end = self.size + n
        if self.body is None:
            self.body = take_buffer()
        if end > len(self.body):  # a blob bigger than the room left (a huge tree): a bigger buffer
            bigger = private_memory(max(end, 2 * len(self.body)))
            bigger[:self.size] = self.body[:self.size]
            give_back(self.body)
            self.body = bigger
        self.body[self.size:end] = data
        self.entries.append([kind, blob_id, self.size, n])
        self.size = end

    def view(self) -> memoryview:
        return memoryview(self.body)[:self.size] if self.body is not None else memoryview(b"")

    def release(self) -> None:
        """The raw bytes are no longer needed (the pack is sealed): the buffer serves another."""
        if self.body is not None:
            give_back(self.body)
            self.body = None

    def __len__(self) -> int:
        return self.size


def encode(blobs: list[tuple[str, str, bytes]], level: int) -> tuple[bytes, list[list]]:
    """blobs: (kind, id_hex, data). Returns the pack object and its header entries."""
    buf = PackBuffer()
    for kind, blob_id, data in blobs:
        buf.add(kind, blob_id, data)
    with seal(buf, level) as obj:
        data = bytes(obj.view)
    buf.release()
    return data, buf.entries


class Sealed:
    """A pack object in pooled memory (`view`), until close(): compressed straight into a
    reused buffer, header and trailer after it, rather than into a new object and then joined
    into another (two fresh 8 MiB allocations per pack)."""

    __slots__ = ("view", "_memory")

    def __init__(self, memory: mmap.mmap, size: int) -> None:
        self._memory = memory
        self.view = memoryview(memory)[:size]

    def __len__(self) -> int:
        return len(self.view)

    def close(self) -> None:
        if self._memory is not None:
            self.view.release()
            give_back(self._memory)  # a bigger one of its own is left to be unmapped
            self._memory = None

    def __enter__(self) -> "Sealed":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()


def _compress_bound(n: int) -> int:
    """ZSTD_COMPRESSBOUND: the most one frame of n bytes can take."""
    return n + (n >> 8) + (((128 << 10) - n) >> 11 if n < (128 << 10) else 0)


def seal(buf: PackBuffer, level: int) -> Sealed:
    """The pack object of a filled buffer, in pooled memory: close() it when written."""
    cctx = _compressor(level)
    header = cctx.compress(json.dumps({"v": 1, "blobs": buf.entries}, separators=(",", ":")).encode())
    room = _compress_bound(len(buf)) + len(header) + TRAILER.size
    memory = take_buffer() if room <= BUFFER_SIZE else private_memory(room)
    size = 0
    try:
        with buf.view() as raw, memoryview(memory) as out:
            # A reader over the raw bytes compresses into the caller's buffer (readinto),
            # leaving the interpreter lock free; one call unless the output fills.
            if len(raw):
                with cctx.stream_reader(raw) as reader:
                    while n := reader.readinto(out[size:room]):
                        size += n
            else:  # the reader never ends on an empty source (python-zstandard 0.25)
                frame = cctx.compress(b"")
                out[:len(frame)] = frame
                size = len(frame)
            out[size:size + len(header)] = header
            size += len(header)
            out[size:size + TRAILER.size] = TRAILER.pack(len(header), MAGIC)
            size += TRAILER.size
    except BaseException:
        give_back(memory)
        raise
    return Sealed(memory, size)


def pack_key(obj) -> str:
    digest = hashlib.sha256(obj).hexdigest()
    return f"data/{digest[:2]}/{digest}"


ONE_CALL_MAX = 256 << 20  # a frame that says it holds more is decompressed in pieces


def decompress_frame(data) -> bytes:
    """The first zstd frame of `data` (what follows it is ignored), checked by its checksum.

    One call, which leaves the interpreter lock free throughout, where the frame says its size
    (every frame drtool writes with compress() does). decompressobj() takes the lock back for
    every 128 KiB it produces, and each time waits behind the busy Python threads: with a
    restore's walker and writers running, its pack fetchers were 30x slower."""
    size = zstandard.frame_content_size(data)
    if 0 <= size <= ONE_CALL_MAX:
        return zstandard.ZstdDecompressor().decompress(data)
    return zstandard.ZstdDecompressor().decompressobj().decompress(data)  # no size said, or a huge one


def decode_body(obj: bytes, key: str) -> bytes:
    """The concatenated blob bytes of a pack, checked by zstd's frame checksum."""
    try:
        return decompress_frame(obj)
    except zstandard.ZstdError as exc:
        raise _undecodable(key, exc) from None


def _undecodable(key: str, why: object) -> IntegrityError:
    return IntegrityError(f"pack {key}: cannot decompress: {why}")


def decode_pooled(obj, key: str) -> tuple[memoryview | bytes, mmap.mmap | None]:
    """decode_body() into a pooled buffer: (the body, the buffer to give_back() when no view
    of the body is left), or (bytes, None) for a frame too large for one. The whole frame in
    one call (zstd's single-pass path, checksum checked) with the interpreter lock free."""
    try:
        size = zstandard.frame_content_size(obj)
    except zstandard.ZstdError as exc:  # not a zstd frame at all
        raise _undecodable(key, exc) from None
    if not 0 < size <= BUFFER_SIZE:  # an empty frame: nothing to put anywhere
        return decode_body(obj, key), None
    memory = take_buffer()
    body = memoryview(memory)[:size]
    try:
        with zstandard.ZstdDecompressor().stream_reader(obj) as reader:
            got = reader.readinto(body)
    except zstandard.ZstdError as exc:
        give_back(memory)
        raise _undecodable(key, exc) from None
    except BaseException:
        give_back(memory)
        raise
    if got != size:  # cut short (every blob is checked by its id besides)
        give_back(memory)
        raise _undecodable(key, f"frame holds {got} of {size} bytes")
    return body, memory


def read_header(tail: bytes, key: str) -> list[list]:
    """Header entries from the end of a pack (`tail` = enough trailing bytes)."""
    if len(tail) < TRAILER.size:
        raise IntegrityError(f"pack {key}: too short for a pack trailer")
    length, magic = TRAILER.unpack(tail[-TRAILER.size:])
    if magic != MAGIC or length + TRAILER.size > len(tail):
        raise IntegrityError(f"pack {key}: bad trailer")
    frame = tail[-TRAILER.size - length:-TRAILER.size]
    try:
        return json.loads(decompress_frame(frame))["blobs"]
    except (zstandard.ZstdError, ValueError, KeyError) as exc:
        raise IntegrityError(f"pack {key}: unreadable header: {exc}") from None
