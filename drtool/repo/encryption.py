"""Client-side encryption: an ObjectStore wrapper that encrypts every object with AES-256-GCM.

Each object is stored as

    header   b"DRE\\x01" | segment size (u32 BE) | key id (8 bytes) | base nonce (12 random bytes)
    segments AES-GCM(segment of `segment size` plaintext bytes, the last one shorter) + 16-byte tag

Segment i is sealed with nonce = base nonce XOR (i as 4 bytes BE || final flag byte) in the
nonce's last 5 bytes, and with the header plus the object's key as associated data. So:
  - a flipped byte anywhere fails its segment's tag (the header is in every segment's AD);
  - an object moved or swapped to another key fails (the key is in the AD);
  - an object cut at a segment boundary fails (the last segment left lacks the final flag);
  - segments reordered fail (the counter is in the nonce).
put_stream encrypts segment by segment (memory: about two segments); open_read decrypts the
same way with one segment of look-ahead. The key id (a hash of the key, not the key) tells a
wrong key from a damaged object in the error message.

Object sizes reported by list/stat are the plaintext sizes (the repository compares them with
the sizes it recorded), computed from the ciphertext size and this store's segment size.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import secrets as _random
import stat as _stat
import struct
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

from drtool.errors import ConfigError, IntegrityError
from drtool.repo.objectstore import ObjectInfo, ObjectStore, _check_range

log = logging.getLogger(__name__)

MAGIC = b"DRE\x01"  # format and version
HEADER = struct.Struct(">4sI8s12s")  # magic, segment size, key id, base nonce
TAG = 16
SEGMENT_SIZE = 1 << 20
KEY_BYTES = 32


def key_id(key: bytes) -> bytes:
    """A short, non-secret fingerprint of a key (which key wrote an object)."""
    return hashlib.sha256(b"drtool encryption key id\0" + key).digest()[:8]


def _nonce(base: bytes, counter: int, final: bool) -> bytes:
    tail = int.from_bytes(base[7:], "big") ^ ((counter << 8) | int(final))
    return base[:7] + tail.to_bytes(5, "big")


def plaintext_size(stored: int, segment_size: int = SEGMENT_SIZE) -> int:
    """The plaintext size of an object of `stored` bytes (0 for something too short to be one)."""
    body = stored - HEADER.size
    if body < TAG:
        return 0
    segments = -(-body // (segment_size + TAG))
    return body - TAG * segments


class EncryptedStore(ObjectStore):
    """Every object of `store` encrypted with AES-256-GCM under `key` (32 bytes)."""

    def __init__(self, store: ObjectStore, key: bytes, segment_size: int = SEGMENT_SIZE):
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
            raise ConfigError(f"encryption key for {store.url}: must be {KEY_BYTES} bytes")
        if not 1 <= segment_size < 1 << 32:
            raise ConfigError(f"encryption segment size {segment_size}: out of range")
        self.inner = store
        self.url = store.url
        self.segment_size = segment_size
        self._aead = AESGCM(bytes(key))
        self._key_id = key_id(bytes(key))

    def __repr__(self) -> str:
        return f"EncryptedStore({self.inner!r})"

    def __getattr__(self, name: str) -> Any:  # stale_temp_files, abort_multipart_uploads, root, ...
        return getattr(self.inner, name)

    # -- sealing ----------------------------------------------------------------------------

    def _header(self) -> bytes:
        return HEADER.pack(MAGIC, self.segment_size, self._key_id, _random.token_bytes(12))

    def _seal(self, chunks: Iterable[bytes], key: str, counter: list[int]) -> Iterator[bytes]:
        """Header, then the sealed segments; counter[0] counts plaintext bytes."""
        header = self._header()
        ad = header + key.encode()
        base = header[-12:]
        seg = self.segment_size
        yield header
        buf = bytearray()
        index = 0
        for chunk in chunks:
            buf += chunk
            counter[0] += len(chunk)
            # Keep at least one byte back: the final segment must be the one sealed last.
            while len(buf) > seg:
                yield self._aead.encrypt(_nonce(base, index, False), bytes(buf[:seg]), ad)
                del buf[:seg]
                index += 1
        yield self._aead.encrypt(_nonce(base, index, True), bytes(buf), ad)

    def _encrypt(self, key: str, data: bytes) -> bytes:
        return b"".join(self._seal((data,), key, [0]))

    # -- opening ----------------------------------------------------------------------------

    def _failed(self, key: str, why: str = "") -> IntegrityError:
        return IntegrityError(f"cannot decrypt {key}: wrong encryption key or tampered object{why}")

    def _parse_header(self, key: str, header: bytes) -> tuple[int, bytes, bytes]:
        """(segment size, base nonce, associated data) of an object's header."""
        if len(header) < HEADER.size or header[:4] != MAGIC:
            raise IntegrityError(f"cannot decrypt {key}: not an encrypted drtool object "
                                 "(written without encryption, or damaged)")
        _magic, seg, kid, base = HEADER.unpack(header[:HEADER.size])
        if kid != self._key_id:
            raise self._failed(key, f" (written with key id {kid.hex()}, this key is {self._key_id.hex()})")
        if seg < 1:
            raise self._failed(key, " (bad segment size)")
        return seg, base, header[:HEADER.size] + key.encode()

    def _open(self, key: str, ct: bytes, base: bytes, ad: bytes, index: int, final: bool) -> bytes:
        from cryptography.exceptions import InvalidTag

        try:
            return self._aead.decrypt(_nonce(base, index, final), ct, ad)
        except InvalidTag:
            raise self._failed(key) from None

    def _decrypt(self, key: str, obj: bytes) -> bytes:
        seg, base, ad = self._parse_header(key, obj)
        view = memoryview(obj)[HEADER.size:]
        step = seg + TAG
        if len(view) < TAG:
            raise self._failed(key, " (truncated)")
        out = bytearray()
        index = 0
        while True:
            final = len(view) <= step
            out += self._open(key, view[:step], base, ad, index, final)
            if final:
                return bytes(out)
            view = view[step:]
            index += 1

    # -- the interface ------------------------------------------------------------------------

    def put(self, key: str, data: bytes) -> None:
        self.inner.put(key, self._encrypt(key, data))

    def put_if_absent(self, key: str, data: bytes) -> bool:
        return self.inner.put_if_absent(key, self._encrypt(key, data))

    def put_stream(self, key: str, chunks: Iterable[bytes]) -> int:
        plain = [0]
        self.inner.put_stream(key, self._seal(chunks, key, plain))
        return plain[0]

    def get(self, key: str) -> bytes:
        return self._decrypt(key, self.inner.get(key))

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        # Whole object, then the slice: every byte handed out has passed its tag.
        _check_range(key, offset, length)
        return self.get(key)[offset:offset + length]

    def open_read(self, key: str) -> BinaryIO:
        return io.BufferedReader(_DecryptingReader(self, key, self.inner.open_read(key)), buffer_size=1 << 20)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        for info in self.inner.list(prefix):
            yield ObjectInfo(info.key, plaintext_size(info.size, self.segment_size), info.mtime)

    def stat(self, key: str) -> ObjectInfo | None:
        info = self.inner.stat(key)
        return None if info is None else ObjectInfo(info.key, plaintext_size(info.size, self.segment_size), info.mtime)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def close(self) -> None:
        self.inner.close()

    @property
    def forkable(self) -> bool:
        return self.inner.forkable

    def after_fork(self) -> None:
        self.inner.after_fork()


class _DecryptingReader(io.RawIOBase):
    """Plaintext of an encrypted object, one segment at a time (one segment of look-ahead tells
    the last segment, which must carry the final flag)."""

    def __init__(self, store: EncryptedStore, key: str, raw: BinaryIO):
        self._store, self._key, self._raw = store, key, raw
        try:
            header = self._read_exactly(HEADER.size)
            self._seg, self._base, self._ad = store._parse_header(key, header)
        except BaseException:
            raw.close()
            raise
        self._step = self._seg + TAG
        self._index = 0
        self._ahead = self._read_exactly(self._step)
        self._plain = memoryview(b"")
        self._done = False

    def _read_exactly(self, n: int) -> bytes:
        parts, got = [], 0
        while got < n:
            piece = self._raw.read(n - got)
            if not piece:
                break
            parts.append(piece)
            got += len(piece)
        return b"".join(parts)

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._plain and not self._done:
            current = self._ahead
            if len(current) < TAG:
                raise self._store._failed(self._key, " (truncated)")
            self._ahead = self._read_exactly(self._step) if len(current) == self._step else b""
            final = not self._ahead
            self._plain = memoryview(self._store._open(self._key, current, self._base, self._ad, self._index, final))
            self._index += 1
            self._done = final
        n = min(len(b), len(self._plain))
        b[:n] = self._plain[:n]
        self._plain = self._plain[n:]
        return n

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


# ---------------------------------------------------------------------------------------------
# Key files


def load_key(path: str | Path) -> bytes:
    """The 32-byte key in `path`: 32 raw bytes, or 64 hex characters (whitespace around is fine)."""
    path = Path(path).expanduser()
    try:
        raw = path.read_bytes()
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"encryption key file {path}: cannot read it: {exc.strerror or exc}") from None
    if mode & _stat.S_IROTH:
        log.warning("encryption key file %s is readable by every user (mode %o): chmod 600 it",
                    path, _stat.S_IMODE(mode))
    if len(raw) == KEY_BYTES:
        return raw
    text = raw.strip()
    if len(text) == 2 * KEY_BYTES:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    raise ConfigError(f"encryption key file {path}: expected 32 raw bytes or 64 hex characters, "
                      f"found {len(raw)} bytes that are neither")


def generate_key(path: str | Path) -> bytes:
    """Write a new random key to `path` (64 hex characters, mode 0600); refuses to overwrite."""
    path = Path(path).expanduser()
    key = _random.token_bytes(KEY_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"encryption key file {path}: exists (a new key would make the repository "
                          "unreadable; remove it yourself if you mean it)") from None
    except OSError as exc:
        raise ConfigError(f"encryption key file {path}: cannot create it: {exc.strerror or exc}") from None
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
        f.flush()
        os.fsync(f.fileno())
    return key
