"""A deterministic sample Teranode data directory, for tests, benchmarks and `drtool demo`.

Everything in it passes Teranode's own checks (drtool.teranode.checks): real
transactions named by their txids, subtrees named by their merkle roots (go-subtree
serialization behind the `S-1.0` magic, as Teranode writes them, plus a few in the plain
encoding of older files), a linked chain of blocks meeting their regtest proof of work,
`.sha256` and `.dah` sidecars -- and what a backup must skip: `*.tmp` temporaries and the
subtree quorum's lock. Same seed, same bytes.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from drtool.teranode import filetypes as ft
from drtool.teranode.blocks import BlockHeader, meets_target, serialize_block
from drtool.teranode.hashes import (
    COINBASE_PLACEHOLDER,
    EXTENDED_MARKER,
    dsha256,
    hash_to_name,
    merkle_root,
    serialize_subtree,
    varint,
)

GENESIS_TIME = 1_700_000_000
REGTEST_BITS = 0x207FFFFF
SHA256_SHARE = 0.10  # share of tx/subtree files given a .sha256 sidecar (blocks: all)
DAH_SHARE = 0.05  # share of tx files given a .dah sidecar (Teranode up to v0.13)
EXTENDED_SHARE = 0.20  # share of transactions stored in BIP-239 extended format
OLD_MAGIC_SHARE = 0.05  # NUL-padded magic, as older Teranode versions wrote
NO_MAGIC_SHARE = 0.03  # no magic at all, as test fixtures and older files
PLAIN_SUBTREE_SHARE = 0.15  # subtrees in the plain encoding (list of hashes, no magic)

_P2PKH_HEAD, _P2PKH_TAIL = b"\x76\xa9\x14", b"\x88\xac"


class ChainEntry(NamedTuple):
    height: int
    hash_hex: str
    prev_hash_hex: str
    header: bytes


@dataclass
class SampleNode:
    root: Path
    seed: int
    chain: list[ChainEntry] = field(default_factory=list)
    txids: list[str] = field(default_factory=list)  # names of the .tx files
    outputs_txids: list[str] = field(default_factory=list)  # names of the .outputs files
    subtree_roots: list[str] = field(default_factory=list)
    block_files: dict[str, Path] = field(default_factory=dict)  # block hash hex -> file
    block_subtrees: dict[str, list[str]] = field(default_factory=dict)  # block hash hex -> subtree roots
    file_counts: dict[str, int] = field(default_factory=dict)  # kind -> files written
    total_bytes: int = 0  # every file written
    data_files: int = 0  # files a backup carries (no temporaries, no quorum lock)
    data_bytes: int = 0

    @property
    def best_block(self) -> ChainEntry:
        return self.chain[-1]


class _Writer:
    """Writes files, remembering counts and sizes; creates folders once."""

    def __init__(self, node: SampleNode, sidecars: bool = True):
        self.node = node
        self.sidecars = sidecars
        self.dirs: set[Path] = set()

    def write(self, path: Path, data: bytes, kind: str, *, data_file: bool = True) -> Path:
        if path.parent not in self.dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.dirs.add(path.parent)
        with open(path, "wb") as f:
            f.write(data)
        n = self.node
        n.file_counts[kind] = n.file_counts.get(kind, 0) + 1
        n.total_bytes += len(data)
        if data_file:
            n.data_files += 1
            n.data_bytes += len(data)
        return path

    def sha256_sidecar(self, path: Path, data: bytes) -> None:
        if not self.sidecars:
            return
        text = ft.sha256_sidecar_text(hashlib.sha256(data).hexdigest(), path.name)
        self.write(path.with_name(path.name + ".sha256"), text.encode(), "sha256")


def _p2pkh(rng: random.Random) -> bytes:
    return _P2PKH_HEAD + rng.randbytes(20) + _P2PKH_TAIL


def make_tx(rng: random.Random, *, extended: bool = False, size_range=(200, 2048)) -> tuple[bytes, bytes]:
    """A well-formed transaction of about the size asked -> (file bytes, standard bytes).

    Inputs spend random outpoints with signature-sized unlocking scripts; outputs are
    P2PKH, padded to size with an OP_FALSE OP_RETURN data output.
    """
    target = rng.randrange(size_range[0], size_range[1] + 1)
    n_in, n_out = 1 + rng.randrange(3), 1 + rng.randrange(3)
    version = struct.pack("<I", 1)
    inputs, ext_inputs = [], []
    for _ in range(n_in):
        unlock = b"\x48" + rng.randbytes(72) + b"\x21" + rng.randbytes(33)
        txin = rng.randbytes(32) + struct.pack("<I", rng.randrange(8)) + varint(len(unlock)) + unlock + b"\xff\xff\xff\xff"
        inputs.append(txin)
        if extended:  # BIP-239: the spent output's satoshis and locking script
            ext_inputs.append(txin + struct.pack("<Q", rng.randrange(1, 10**8)) + b"\x19" + _p2pkh(rng))
    outputs = [struct.pack("<Q", rng.randrange(1, 10**8)) + b"\x19" + _p2pkh(rng) for _ in range(n_out)]
    size = 4 + 1 + sum(map(len, inputs)) + 1 + sum(map(len, outputs)) + 4
    filler = target - size - 8 - 3 - 4  # value, script length varint, OP_FALSE OP_RETURN PUSHDATA2 len
    if filler > 0:
        script = b"\x00\x6a\x4d" + struct.pack("<H", filler) + rng.randbytes(filler)
        outputs.append(struct.pack("<Q", 0) + varint(len(script)) + script)
    tail = varint(len(outputs)) + b"".join(outputs) + struct.pack("<I", rng.randrange(2))
    std = version + varint(n_in) + b"".join(inputs) + tail
    if not extended:
        return std, std
    return version + EXTENDED_MARKER + varint(n_in) + b"".join(ext_inputs) + tail, std


def _magic(rng: random.Random, ftype: str) -> bytes:
    r = rng.random()
    if r < NO_MAGIC_SHARE:
        return b""
    return ft.magic_for(ftype, nul_padded=r < NO_MAGIC_SHARE + OLD_MAGIC_SHARE)


def _write_tx_files(w: _Writer, root: Path, rng: random.Random, count: int) -> list[str]:
    names = []
    for _ in range(count):
        raw, std = make_tx(rng, extended=rng.random() < EXTENDED_SHARE)
        name = hash_to_name(dsha256(std))
        data = _magic(rng, "tx") + raw
        path = w.write(root / "external" / ft.relative_path(name, "tx", 2), data, "tx")
        if rng.random() < SHA256_SHARE:
            w.sha256_sidecar(path, data)
        height = 1000 + rng.randrange(10_000)  # drawn either way: same data files without sidecars
        if rng.random() < DAH_SHARE and w.sidecars:
            w.write(path.with_name(path.name + ".dah"), str(height).encode(), "dah")
        names.append(name)
    return names


def _outputs_file(rng: random.Random) -> tuple[str, bytes]:
    """An `.outputs` file: Teranode's UTXOWrapper (txid, height<<1|coinbase, live UTXOs)."""
    _, std = make_tx(rng)
    tid = dsha256(std)
    utxos = []
    for index in sorted(rng.sample(range(8), 1 + rng.randrange(3))):
        script = _p2pkh(rng)
        utxos.append(struct.pack("<IQI", index, rng.randrange(1, 10**8), len(script)) + script)
    body = tid + struct.pack("<II", (rng.randrange(1, 10_000) << 1), len(utxos)) + b"".join(utxos)
    return hash_to_name(tid), ft.magic_for("outputs") + body


def _coinbase(rng: random.Random, height: int) -> bytes:
    script = b"\x03" + height.to_bytes(3, "little") + b"/drtool-sample/"
    txin = b"\x00" * 32 + b"\xff\xff\xff\xff" + varint(len(script)) + script + b"\xff\xff\xff\xff"
    txout = struct.pack("<Q", 50 * 10**8) + b"\x19" + _p2pkh(rng)
    return struct.pack("<I", 1) + b"\x01" + txin + b"\x01" + txout + b"\x00\x00\x00\x00"


def _subtree_sizes(rng: random.Random, count: int, size_range: tuple[int, int]) -> list[int]:
    lo, hi = size_range
    if count == 1:
        return [hi]
    # spread log-uniformly, both ends included, then shuffled
    sizes = [round(math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * i / (count - 1))) for i in range(count)]
    rng.shuffle(sizes)
    return sizes


def build_sample_node(
    root: Path,
    *,
    seed: int = 1,
    tx_files: int = 2000,
    subtrees: int = 20,
    blocks: int = 10,
    subtree_size_range: tuple[int, int] = (100 * 1024, 4 * 1024 * 1024),
    with_sidecars: bool = True,
) -> SampleNode:
    """Write a sample data directory under `root` (external/, subtreestore/, blockstore/,
    p2p.key) and describe it. `blocks` counts the genesis block (height 0)."""
    root = Path(root)
    node = SampleNode(root, seed)
    w = _Writer(node, with_sidecars)
    rng = random.Random(seed)
    node.txids = _write_tx_files(w, root, rng, tx_files)
    for _ in range(max(1, tx_files // 50)):
        name, data = _outputs_file(rng)
        w.write(root / "external" / ft.relative_path(name, "outputs", 2), data, "outputs")
        node.outputs_txids.append(name)
    per_block = _write_subtrees(w, root, rng, node, subtrees, max(blocks - 1, 1), subtree_size_range)
    _write_chain(w, root, rng, node, blocks, per_block)
    _write_non_data(w, root, rng, node)
    return node


def _write_subtrees(w, root, rng, node, count, n_blocks, size_range) -> list[list[tuple[list[bytes], str]]]:
    """Subtrees listing the sample's txids, then random ones; the first subtree of each
    block starts with the coinbase placeholder. -> per block: [(nodes, root hex)]."""
    per_block: list[list[tuple[list[bytes], str]]] = [[] for _ in range(n_blocks)]
    pool = [bytes.fromhex(t)[::-1] for t in node.txids]
    taken = 0
    for j, size in enumerate(_subtree_sizes(rng, count, size_range)):
        plain = rng.random() < PLAIN_SUBTREE_SHARE
        n = max(2, size // 32 if plain else (size - 80) // 48)
        first_in_block = j < n_blocks
        nodes = [COINBASE_PLACEHOLDER] if first_in_block else []
        real = pool[taken : taken + min(n - len(nodes), max(1, len(pool) // count))]
        taken += len(real)
        nodes += real
        missing = n - len(nodes)
        blob = rng.randbytes(32 * missing)
        nodes += [blob[i : i + 32] for i in range(0, len(blob), 32)]
        mroot = merkle_root(nodes)
        root_hex = hash_to_name(mroot)
        if plain:
            data = b"".join(nodes)
        else:
            # fee 1..4096 and size 200..2247 per node, drawn in one go (the placeholder: 0, 0)
            r = rng.randbytes(4 * len(nodes))
            fees = [1 + (r[4 * i] | (r[4 * i + 1] & 0x0F) << 8) for i in range(len(nodes))]
            sizes = [200 + (r[4 * i + 2] | (r[4 * i + 3] & 0x07) << 8) for i in range(len(nodes))]
            if first_in_block:
                fees[0] = sizes[0] = 0
            data = ft.magic_for("subtree") + serialize_subtree(nodes, fees, sizes, root=mroot)
        path = w.write(root / "subtreestore" / ft.relative_path(root_hex, "subtree", 2), data, "subtree")
        if rng.random() < SHA256_SHARE:
            w.sha256_sidecar(path, data)
        node.subtree_roots.append(root_hex)
        per_block[j % n_blocks].append((nodes, root_hex))
    return per_block


def _write_chain(w, root, rng, node, blocks, per_block) -> None:
    prev = b"\x00" * 32
    for height in range(blocks):
        coinbase = _coinbase(rng, height)
        cb_id = dsha256(coinbase)
        mine = per_block[height - 1] if height >= 1 and height - 1 < len(per_block) else []
        if mine:
            # the block's merkle root: the coinbase txid takes the placeholder's place
            first_nodes = [cb_id] + mine[0][0][1:] if mine[0][0][0] == COINBASE_PLACEHOLDER else mine[0][0]
            roots = [merkle_root(first_nodes)] + [bytes.fromhex(r)[::-1] for _, r in mine[1:]]
            mroot = merkle_root(roots)
        else:
            mroot = cb_id
        nonce = rng.randrange(2**32)
        timestamp = GENESIS_TIME + height * 600 + rng.randrange(-120, 121) if height else GENESIS_TIME
        while True:  # regtest proof of work: about two tries
            header = BlockHeader(0x20000000, prev, mroot, timestamp, REGTEST_BITS, nonce).serialize()
            if meets_target(header):
                break
            nonce = (nonce + 1) % 2**32
        block_id = dsha256(header)
        name = hash_to_name(block_id)
        tx_count = max(1, sum(len(nodes) for nodes, _ in mine))
        size_in_bytes = 80 + len(coinbase) + sum(400 * (len(nodes) - 1) for nodes, _ in mine)
        subtree_ids = [bytes.fromhex(r)[::-1] for _, r in mine]
        data = ft.magic_for("block") + serialize_block(
            BlockHeader.parse(header), tx_count, size_in_bytes, subtree_ids, coinbase, height
        )
        path = w.write(root / "blockstore" / ft.relative_path(name, "block", -2), data, "block")
        w.sha256_sidecar(path, data)
        node.chain.append(ChainEntry(height, name, hash_to_name(prev), header))
        node.block_files[name] = path
        node.block_subtrees[name] = [r for _, r in mine]
        prev = block_id
    w.write(root / "blockstore" / "lastProcessed.dat", f"{blocks - 1}\n".encode(), "dat")


def _write_non_data(w, root, rng, node) -> None:
    """What a backup carries but cannot check (the node key), and what it must skip."""
    (root / "p2p.key").touch(mode=0o600)  # a secret: created owner-only, as Teranode does
    w.write(root / "p2p.key", rng.randbytes(64), "key")
    some_tx = node.txids[0] if node.txids else "00" * 32
    tx_dir = root / "external" / some_tx[:2]
    tmp = lambda path, data: w.write(path, data, "tmp", data_file=False)  # noqa: E731
    tmp(tx_dir / f"{some_tx}.tx.{rng.randrange(10**9)}.tmp", rng.randbytes(100))  # v0.14 temp name
    tmp(tx_dir / f"{some_tx}.tx.dah.tmp", b"123")
    if node.subtree_roots:
        r = node.subtree_roots[0]
        tmp(root / "subtreestore" / r[:2] / f".{r}.subtree.{rng.randrange(10**9)}.tmp", rng.randbytes(300))
    tmp(root / "blockstore" / f"health-check-{rng.randrange(10**9)}.tmp", b"ok")
    lock_name = (node.subtree_roots[0] if node.subtree_roots else "x") + ".lock"
    w.write(root / "subtreestore" / "subtree_quorum" / lock_name, b"", "lock", data_file=False)


# --- changing a sample between backups -------------------------------------------------


def add_files(root: Path, seed: int, count: int) -> list[Path]:
    """Add `count` new transaction files (with sidecars as usual) to the external store.
    Use a different `seed` for each increment. Returns the new data files."""
    root = Path(root)
    node = SampleNode(root, seed)
    rng = random.Random(f"drtool-sample-add:{seed}")
    names = _write_tx_files(_Writer(node), root, rng, count)
    return [root / "external" / ft.relative_path(n, "tx", 2) for n in names]


def delete_fraction(root: Path, seed: int, fraction: float) -> list[Path]:
    """Delete `fraction` of the transaction, outputs and subtree files (with their
    sidecars), as Teranode's pruner does; blocks stay so the chain stays whole.
    Returns the deleted data files."""
    root = Path(root)
    candidates = []
    for store in ("external", "subtreestore"):
        for dirpath, dirnames, filenames in os.walk(root / store):
            dirnames[:] = sorted(d for d in dirnames if d not in ft.IGNORED_DIRS)
            candidates += [Path(dirpath, f) for f in sorted(filenames) if ft.parse_name(f)]
    count = min(len(candidates), math.ceil(len(candidates) * fraction)) if fraction > 0 else 0
    victims = sorted(random.Random(f"drtool-sample-delete:{seed}").sample(candidates, count))
    for path in victims:
        path.unlink()
        for kind in ft.SIDECAR_EXTS:
            path.with_name(f"{path.name}.{kind}").unlink(missing_ok=True)
    return victims
