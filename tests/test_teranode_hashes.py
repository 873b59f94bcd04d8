"""Hashes Teranode names files by, pinned with real Teranode files."""

from __future__ import annotations

import hashlib
import random
import struct

import pytest

from drtool.teranode import filetypes as ft
from drtool.teranode.blocks import BlockHeader, parse_block
from drtool.teranode.hashes import (
    COINBASE_PLACEHOLDER,
    block_hash,
    dsha256,
    hash_to_name,
    merkle_root,
    name_to_hash,
    parse_subtree,
    serialize_subtree,
    standard_tx,
    subtree_root,
    txid,
)
from drtool.teranode.sample import make_tx

# Bitcoin's genesis block: header and hash are public constants.
GENESIS_HEADER = bytes.fromhex(
    "0100000000000000000000000000000000000000000000000000000000000000000000003ba3edfd7a7b12b27ac72c3e"
    "67768f617fc81bc3888a51323a9fb8aa4b1e5e4a29ab5f49ffff001d1dac2b7c"
)
GENESIS_HASH = "000000000019d6689c085ae165831e934ff763ae46a2a6c172b3f1b60a8ce26f"
# Genesis coinbase: its txid is the genesis merkle root.
GENESIS_COINBASE = bytes.fromhex(
    "01000000010000000000000000000000000000000000000000000000000000000000000000ffffffff4d04ffff001d01"
    "04455468652054696d65732030332f4a616e2f32303039204368616e63656c6c6f72206f6e206272696e6b206f662073"
    "65636f6e64206261696c6f757420666f722062616e6b73ffffffff0100f2052a01000000434104678afdb0fe55482719"
    "67f1a67130b7105cd6a828e03909a67962e0ea1f61deb649f6bc3f4cef38c4f35504e51ec112de5c384df7ba0b8d578a"
    "4c702b6bf11d5fac00000000"
)
GENESIS_MERKLE = "4a5e1e4baab89f3a32518a88c31bc87f618f76673e2cc77ab2127b7afdeda33b"


def test_dsha256_and_names():
    assert dsha256(b"") == hashlib.sha256(hashlib.sha256(b"").digest()).digest()
    assert hash_to_name(block_hash(GENESIS_HEADER)) == GENESIS_HASH
    assert name_to_hash(GENESIS_HASH) == block_hash(GENESIS_HEADER)
    assert hash_to_name(name_to_hash(GENESIS_HASH)) == GENESIS_HASH
    with pytest.raises(ValueError):
        hash_to_name(b"\x00" * 31)
    with pytest.raises(ValueError):
        block_hash(GENESIS_HEADER[:79])


def test_txid_standard_and_extended():
    assert hash_to_name(txid(GENESIS_COINBASE)) == GENESIS_MERKLE
    rng = random.Random(7)
    ext, std = make_tx(rng, extended=True)
    assert ext != std and ext[4:10] == b"\x00\x00\x00\x00\x00\xef"
    assert standard_tx(ext) == std
    assert txid(ext) == txid(std) == dsha256(std)
    with pytest.raises(ValueError):
        txid(std + b"\x00")  # trailing bytes
    with pytest.raises(ValueError):
        txid(std[:-5])  # truncated


def test_txid_of_real_extended_transactions(fixtures_dir):
    """Teranode's subtree data holds extended transactions whose txids are the subtree's nodes."""
    d = fixtures_dir / "teranode/services/subtreevalidation/testdata/171"
    name = "003af6bba0bd26affe08f7d73560034a701c966a1ad8ffd41f557797e204bda5"
    data = (d / f"{name}.subtree_data").read_bytes()
    nodes = parse_subtree((d / f"{name}.subtree").read_bytes()).nodes
    from drtool.teranode.hashes import scan_tx

    std, end = scan_tx(data, 0)
    assert data[4:10] == b"\x00\x00\x00\x00\x00\xef"
    assert dsha256(std) == nodes[0]
    assert end < len(data)


def test_merkle_root_rules():
    a, b, c = (dsha256(bytes([i])) for i in range(3))
    assert merkle_root([a]) == a
    assert merkle_root([a, b]) == dsha256(a + b)
    # odd level: the last hash is paired with itself
    assert merkle_root([a, b, c]) == dsha256(dsha256(a + b) + dsha256(c + c))
    # the coinbase placeholder is an ordinary leaf
    assert merkle_root([COINBASE_PLACEHOLDER, a]) == dsha256(COINBASE_PLACEHOLDER + a)
    assert hash_to_name(merkle_root([name_to_hash(GENESIS_MERKLE)])) == GENESIS_MERKLE
    with pytest.raises(ValueError):
        merkle_root([])


def test_subtree_roots_of_every_fixture(fixtures_dir):
    """Both encodings, pinned with Teranode's files (35 plain, 1 full with magic)."""
    files = sorted((fixtures_dir / "teranode").rglob("*.subtree"))
    assert len(files) == 36
    encodings = {}
    for f in files:
        data = f.read_bytes()
        assert hash_to_name(subtree_root(data)) == f.stem, f.name
        _, off = ft.detect_magic(data[:8])
        st = parse_subtree(data[off:])
        encodings[st.encoding] = encodings.get(st.encoding, 0) + 1
        if st.encoding == "full":
            assert st.declared_root == merkle_root(st.nodes)
            assert st.nodes[0] == COINBASE_PLACEHOLDER
            assert len(st.nodes) == 32768
    assert encodings == {"plain": 35, "full": 1}


def test_subtree_serialization_round_trip():
    nodes = [COINBASE_PLACEHOLDER] + [dsha256(bytes([i])) for i in range(6)]
    fees, sizes = [0, 1, 2, 3, 4, 5, 6], [0, 100, 200, 300, 400, 500, 600]
    payload = serialize_subtree(nodes, fees, sizes, [nodes[2]])
    st = parse_subtree(payload)
    assert (st.encoding, st.nodes, st.fees, st.size_in_bytes) == ("full", nodes, 21, 2100)
    assert st.conflicting == (nodes[2],)
    assert subtree_root(b"S-1.0   " + payload) == merkle_root(nodes)
    assert subtree_root(b"".join(nodes)) == merkle_root(nodes)  # plain, no magic
    with pytest.raises(ValueError):
        parse_subtree(b"\x01" * 33)


def test_block_headers_of_fixtures(fixtures_dir):
    for f in sorted((fixtures_dir / "teranode").rglob("*.block")):
        data = f.read_bytes()
        assert hash_to_name(block_hash(data[:80])) == f.stem
        block = parse_block(data)
        assert block.hash_hex == f.stem
        assert len(block.subtrees) >= 1
    header = BlockHeader.parse(GENESIS_HEADER)
    assert (header.version, header.timestamp, header.bits, header.nonce) == (1, 1231006505, 0x1D00FFFF, 2083236893)
    assert header.serialize() == GENESIS_HEADER
    assert struct.unpack("<I", GENESIS_HEADER[:4])[0] == 1
