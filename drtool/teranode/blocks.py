"""Teranode's `.block` files and 80-byte block headers.

A `.block` file (after the optional `B-1.0` magic) is Teranode's model.Block bytes:
header(80) | varint tx count | varint size in bytes | varint subtree count |
subtree roots (32 each) | coinbase tx | varint height -- as the fixture blocks in
model/testdata show.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from drtool.teranode.hashes import HASH_LEN, HEADER_LEN, block_hash, hash_to_name, read_varint, scan_tx, varint


@dataclass(frozen=True)
class BlockHeader:
    version: int
    prev_hash: bytes  # internal order
    merkle_root: bytes
    timestamp: int
    bits: int
    nonce: int

    def serialize(self) -> bytes:
        return (
            struct.pack("<I", self.version)
            + self.prev_hash
            + self.merkle_root
            + struct.pack("<III", self.timestamp, self.bits, self.nonce)
        )

    @property
    def hash(self) -> bytes:
        return block_hash(self.serialize())

    @classmethod
    def parse(cls, header80: bytes) -> BlockHeader:
        if len(header80) < HEADER_LEN:
            raise ValueError(f"a block header is 80 bytes, got {len(header80)}")
        (version,) = struct.unpack_from("<I", header80, 0)
        timestamp, bits, nonce = struct.unpack_from("<III", header80, 68)
        return cls(version, header80[4:36], header80[36:68], timestamp, bits, nonce)


def bits_to_target(bits: int) -> int:
    """The proof-of-work target a compact `bits` value encodes."""
    exponent, mantissa = bits >> 24, bits & 0x007FFFFF
    return mantissa << (8 * (exponent - 3)) if exponent > 3 else mantissa >> (8 * (3 - exponent))


def meets_target(header80: bytes) -> bool:
    """Whether the header's hash satisfies its own `bits`."""
    bits = struct.unpack_from("<I", header80, 72)[0]
    return int.from_bytes(block_hash(header80), "little") <= bits_to_target(bits)


@dataclass(frozen=True)
class BlockFile:
    header: BlockHeader
    tx_count: int
    size_in_bytes: int
    subtrees: list[bytes]
    coinbase_tx: bytes  # standard serialization
    height: int

    @property
    def hash_hex(self) -> str:
        return hash_to_name(self.header.hash)


def serialize_block(
    header: BlockHeader, tx_count: int, size_in_bytes: int, subtrees: list[bytes], coinbase_tx: bytes, height: int
) -> bytes:
    """A `.block` file's content without the magic."""
    return b"".join(
        [header.serialize(), varint(tx_count), varint(size_in_bytes), varint(len(subtrees)), *subtrees,
         coinbase_tx, varint(height)]
    )


def parse_block(payload: bytes) -> BlockFile:
    """A `.block` file's content (magic removed). Raises ValueError when malformed."""
    try:
        header = BlockHeader.parse(payload[:HEADER_LEN])
        tx_count, pos = read_varint(payload, HEADER_LEN)
        size, pos = read_varint(payload, pos)
        n_subtrees, pos = read_varint(payload, pos)
        subtrees = [payload[pos + i * HASH_LEN : pos + (i + 1) * HASH_LEN] for i in range(n_subtrees)]
        pos += n_subtrees * HASH_LEN
        coinbase, pos = scan_tx(payload, pos)
        height, pos = read_varint(payload, pos)
    except (IndexError, ValueError) as exc:
        raise ValueError(f"not a Teranode block: {exc}") from exc
    if pos != len(payload):
        raise ValueError(f"not a Teranode block: {len(payload) - pos} bytes after it")
    return BlockFile(header, tx_count, size, subtrees, coinbase, height)
