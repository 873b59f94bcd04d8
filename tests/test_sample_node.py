"""The deterministic sample node: real hashes, linked chain, same seed -> same bytes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from drtool.teranode import filetypes as ft
from drtool.teranode.blocks import BlockHeader, meets_target, parse_block
from drtool.teranode.checks import check_tree
from drtool.teranode.hashes import hash_to_name, parse_subtree, txid
from drtool.teranode.sample import add_files, build_sample_node, delete_fraction


def _tree(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath, f)
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    kw = dict(tx_files=60, subtrees=3, blocks=3, subtree_size_range=(4096, 20000))
    a = build_sample_node(tmp_path / "a", seed=5, **kw)
    b = build_sample_node(tmp_path / "b", seed=5, **kw)
    c = build_sample_node(tmp_path / "c", seed=6, **kw)
    assert _tree(a.root) == _tree(b.root)
    assert a.chain == b.chain and a.txids == b.txids
    assert set(_tree(a.root)).isdisjoint(k for k in _tree(c.root) if ft.parse_name(Path(k).name))


def test_layout_counts_and_checks(sample_node):
    root = sample_node.root
    tc = check_tree(root).run()
    assert tc.findings == []
    assert sample_node.file_counts["tx"] == len(sample_node.txids) == 300
    assert sample_node.file_counts["subtree"] == 5 and sample_node.file_counts["block"] == 5
    on_disk = [p for p in root.rglob("*") if p.is_file()]
    assert len(on_disk) == sum(sample_node.file_counts.values())
    assert sum(p.stat().st_size for p in on_disk) == sample_node.total_bytes
    assert (root / "p2p.key").stat().st_size == 64
    assert list((root / "subtreestore" / "subtree_quorum").glob("*.lock"))
    assert sample_node.file_counts["tmp"] >= 2 and sample_node.file_counts["dah"] >= 1
    for name in sample_node.txids[:50]:
        path = root / "external" / name[:2] / f"{name}.tx"
        data = path.read_bytes()
        assert hash_to_name(txid(data[ft.detect_magic(data[:8])[1]:])) == name
        assert 200 <= len(data) <= 2048 + 8 + 40 * 3  # magic and BIP-239 extensions on top
    kinds = {ft.detect_magic(p.read_bytes()[:8])[0] for p in root.glob("external/*/*.tx")}
    assert kinds == {"tx", None} or kinds == {"tx"}
    sizes = [p.stat().st_size for p in root.glob("subtreestore/*/*.subtree")]
    assert max(sizes) <= 256 * 1024 + 100 and min(sizes) >= 16 * 1024 - 100


def test_chain_is_linked_and_matches_block_files(sample_node):
    chain = sample_node.chain
    assert [c.height for c in chain] == list(range(5))
    assert chain[0].prev_hash_hex == "00" * 32
    for prev, cur in zip(chain, chain[1:]):
        assert cur.prev_hash_hex == prev.hash_hex
        assert BlockHeader.parse(cur.header).timestamp > BlockHeader.parse(prev.header).timestamp
    subtree_roots = set(sample_node.subtree_roots)
    listed = set()
    for c in chain:
        path = sample_node.block_files[c.hash_hex]
        assert path.parent.name == c.hash_hex[-2:]
        data = path.read_bytes()
        assert data[:8] == ft.magic_for("block")
        block = parse_block(data[8:])
        assert (block.hash_hex, block.height, block.header.serialize()) == (c.hash_hex, c.height, c.header)
        assert meets_target(c.header)
        listed |= {hash_to_name(s) for s in block.subtrees}
    assert listed == subtree_roots
    # the first subtree of each block starts with the coinbase placeholder
    first = parse_block(sample_node.block_files[chain[1].hash_hex].read_bytes()[8:]).subtrees[0]
    name = hash_to_name(first)
    data = (sample_node.root / "subtreestore" / name[:2] / f"{name}.subtree").read_bytes()
    assert parse_subtree(data[ft.detect_magic(data[:8])[1]:]).nodes[0] == b"\xff" * 32


def test_add_and_delete_keep_every_file_valid(sample_node):
    root = sample_node.root
    before = set(_tree(root))
    added = add_files(root, seed=2, count=6)
    assert len(added) == 6 and all(p.exists() for p in added)
    assert add_files(root, seed=3, count=6) != added
    deleted = delete_fraction(root, seed=4, fraction=0.01)
    assert len(deleted) >= 3 and not any(p.exists() for p in deleted)
    assert not any(p.with_name(p.name + ".sha256").exists() for p in deleted)
    assert delete_fraction(root, seed=4, fraction=0) == []
    tc = check_tree(root).run()
    assert tc.findings == []
    after = set(_tree(root))
    assert len(after - before) >= 12
    assert all(str(p.relative_to(root)) in before for p in deleted)


def test_without_sidecars_same_data_files(tmp_path):
    kw = dict(seed=9, tx_files=80, subtrees=2, blocks=2, subtree_size_range=(4096, 8192))
    a = build_sample_node(tmp_path / "a", **kw)
    b = build_sample_node(tmp_path / "b", with_sidecars=False, **kw)
    ta, tb = _tree(a.root), _tree(b.root)
    assert not any(k.endswith((".sha256", ".dah")) for k in tb)
    assert {k: v for k, v in ta.items() if not k.endswith((".sha256", ".dah"))} == tb
