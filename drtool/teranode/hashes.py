"""The hashes Teranode names its files by: block hash, txid, merkle root, subtree root.

Hashes are handled as raw 32-byte values in internal byte order; `hash_to_name` gives
the byte-reversed hex that Teranode uses in file names and that explorers show.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from drtool.teranode.filetypes import detect_magic

HASH_LEN = 32
HEADER_LEN = 80
# The coinbase placeholder Teranode puts as the first leaf of a block's first subtree
# (go-subtree CoinbasePlaceholder). It takes part in the subtree's merkle root as is.
COINBASE_PLACEHOLDER = b"\xff" * HASH_LEN
# BIP-239 extended format: this follows the 4-byte version instead of the input count.
EXTENDED_MARKER = b"\x00\x00\x00\x00\x00\xef"

_sha256 = hashlib.sha256


def dsha256(b: bytes) -> bytes:
    """Double SHA-256."""
    return _sha256(_sha256(b).digest()).digest()


def hash_to_name(h32: bytes) -> str:
    """Internal-order 32-byte hash -> byte-reversed hex (Teranode's file names)."""
    if len(h32) != HASH_LEN:
        raise ValueError(f"a hash is 32 bytes, got {len(h32)}")
    return h32[::-1].hex()


def name_to_hash(name: str) -> bytes:
    """Byte-reversed hex (a file name's hash part) -> internal-order 32-byte hash."""
    b = bytes.fromhex(name)
    if len(b) != HASH_LEN:
        raise ValueError(f"a hash name is 64 hex characters, got {len(name)}")
    return b[::-1]


def block_hash(header80: bytes) -> bytes:
    """Hash of an 80-byte block header (longer input: its first 80 bytes)."""
    if len(header80) < HEADER_LEN:
        raise ValueError(f"a block header is 80 bytes, got {len(header80)}")
    return dsha256(header80[:HEADER_LEN])


# --- transactions --------------------------------------------------------------------


def read_varint(b: bytes | memoryview, pos: int) -> tuple[int, int]:
    """Bitcoin CompactSize at `pos` -> (value, position after it)."""
    first = b[pos]
    if first < 0xFD:
        return first, pos + 1
    size = {0xFD: 2, 0xFE: 4, 0xFF: 8}[first]
    end = pos + 1 + size
    if end > len(b):
        raise ValueError("truncated varint")
    return int.from_bytes(b[pos + 1 : end], "little"), end


def varint(n: int) -> bytes:
    """Bitcoin CompactSize encoding of `n`."""
    if n < 0xFD:
        return bytes((n,))
    if n <= 0xFFFF:
        return b"\xfd" + n.to_bytes(2, "little")
    if n <= 0xFFFFFFFF:
        return b"\xfe" + n.to_bytes(4, "little")
    return b"\xff" + n.to_bytes(8, "little")


def is_extended(tx_bytes: bytes) -> bool:
    """Whether a serialized transaction is in BIP-239 extended format."""
    return tx_bytes[4:10] == EXTENDED_MARKER


def scan_tx(buf: bytes, pos: int = 0) -> tuple[bytes, int]:
    """The transaction starting at `pos` in `buf` (standard or extended format) ->
    (its standard serialization, position after it). Raises ValueError when truncated."""
    b = memoryview(buf)
    extended = buf[pos + 4 : pos + 10] == EXTENDED_MARKER
    try:
        pieces = [buf[pos : pos + 4]]
        start = pos = pos + (10 if extended else 4)
        n_in, pos = read_varint(b, pos)
        for _ in range(n_in):
            pos += 36  # previous txid + output index
            script_len, pos = read_varint(b, pos)
            pos += script_len + 4  # unlocking script + sequence
            if extended:
                pieces.append(buf[start:pos])
                pos += 8  # previous output's satoshis
                prev_len, pos = read_varint(b, pos)
                start = pos = pos + prev_len  # previous output's locking script
        n_out, pos = read_varint(b, pos)
        for _ in range(n_out):
            script_len, pos = read_varint(b, pos + 8)
            pos += script_len
        pos += 4  # lock time
    except (IndexError, KeyError) as exc:
        raise ValueError("truncated transaction") from exc
    if pos > len(buf):
        raise ValueError("truncated transaction")
    pieces.append(buf[start:pos])
    return b"".join(pieces), pos


def standard_tx(tx_bytes: bytes) -> bytes:
    """The standard serialization of exactly one transaction in standard or extended format.

    Raises ValueError when the bytes are not exactly one well-formed transaction.
    """
    std, end = scan_tx(tx_bytes)
    if end != len(tx_bytes):
        raise ValueError(f"{len(tx_bytes) - end} bytes after the transaction")
    return std


def txid(tx_bytes: bytes) -> bytes:
    """Transaction id (internal order) of a standard or extended-format transaction."""
    return dsha256(standard_tx(tx_bytes))


# --- merkle roots --------------------------------------------------------------------


def merkle_root(hashes: list[bytes]) -> bytes:
    """Merkle root of internal-order hashes: pairwise double SHA-256, the last hash of an
    odd level paired with itself; one hash is its own root.

    This equals go-subtree's BuildMerkleTreeStoreFromBytes, which pads to a power of two
    with empty hashes and hashes a node with an empty sibling with itself; the coinbase
    placeholder (32 x 0xff) is an ordinary leaf there, so it is one here too.
    """
    if not hashes:
        raise ValueError("merkle root of no hashes")
    level = list(hashes)
    while len(level) > 1:
        if len(level) % 2:
            level.append(level[-1])
        level = [
            _sha256(_sha256(level[i] + level[i + 1]).digest()).digest() for i in range(0, len(level), 2)
        ]
    return level[0]


# --- subtrees ------------------------------------------------------------------------

# go-subtree serialization: root(32) | fees u64 | sizeInBytes u64 | numNodes u64 |
# numNodes x [hash(32) | fee u64 | size u64] | numConflicting u64 | numConflicting x hash(32)
_FULL_HEAD = HASH_LEN + 24
_NODE_LEN = HASH_LEN + 16


@dataclass(frozen=True)
class Subtree:
    encoding: str  # "full" (go-subtree serialization) or "plain" (list of 32-byte hashes)
    nodes: list[bytes]
    declared_root: bytes | None = None  # the root the full encoding carries
    fees: int = 0
    size_in_bytes: int = 0
    conflicting: tuple[bytes, ...] = ()


def _parse_full(p: bytes) -> Subtree | None:
    if len(p) < _FULL_HEAD + 8:
        return None
    fees, size, n = struct.unpack_from("<QQQ", p, HASH_LEN)
    tail = _FULL_HEAD + n * _NODE_LEN
    if n == 0 or tail + 8 > len(p):
        return None
    (n_conf,) = struct.unpack_from("<Q", p, tail)
    if tail + 8 + n_conf * HASH_LEN != len(p):
        return None
    nodes = [p[o : o + HASH_LEN] for o in range(_FULL_HEAD, tail, _NODE_LEN)]
    conf = tuple(p[o : o + HASH_LEN] for o in range(tail + 8, len(p), HASH_LEN))
    return Subtree("full", nodes, p[:HASH_LEN], fees, size, conf)


def parse_subtree(payload: bytes) -> Subtree:
    """A subtree file's content (magic already removed) in either encoding.

    Raises ValueError when it is neither.
    """
    full = _parse_full(payload)
    if full is not None:
        return full
    if payload and len(payload) % HASH_LEN == 0:
        return Subtree("plain", [payload[o : o + HASH_LEN] for o in range(0, len(payload), HASH_LEN)])
    raise ValueError(f"not a subtree: {len(payload)} bytes fit neither encoding")


def serialize_subtree(
    nodes: list[bytes], fees: list[int], sizes: list[int], conflicting: list[bytes] = (), root: bytes | None = None
) -> bytes:
    """go-subtree's full serialization of `nodes` (without the file magic); `root`, when
    given, is their merkle root already computed."""
    out = [root or merkle_root(nodes), struct.pack("<QQQ", sum(fees), sum(sizes), len(nodes))]
    out += [h + struct.pack("<QQ", f, s) for h, f, s in zip(nodes, fees, sizes, strict=True)]
    out.append(struct.pack("<Q", len(conflicting)))
    out += list(conflicting)
    return b"".join(out)


def subtree_root(file_bytes: bytes) -> bytes:
    """Merkle root (internal order) of a subtree file's nodes: magic optional, either encoding."""
    _, offset = detect_magic(file_bytes[:8])
    return merkle_root(parse_subtree(file_bytes[offset:]).nodes)
