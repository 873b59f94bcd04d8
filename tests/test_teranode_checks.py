"""Teranode-level checks: pass on Teranode's own files, fail naming the file when altered."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from drtool.teranode import filetypes as ft
from drtool.teranode.checks import WARNING, check_file, check_tree

BLOCK = "model/testdata/00000000000000000a61d5ca638906e74376e36e7a080b58a513629496a41cc4.block"
PLAIN_SUBTREE = "model/testdata/5fd29c3ecd4219257b0746bc6adb91c67fec32046b93991fc4c7e1453b8e08b4.subtree"
FULL_SUBTREE = (
    "services/subtreevalidation/testdata/4d22d3ea8d618c6de784855bf4facd0760f4012852242adfd399cff700665f3d.subtree"
)
DATA_171 = "services/subtreevalidation/testdata/171/003af6bba0bd26affe08f7d73560034a701c966a1ad8ffd41f557797e204bda5"


@pytest.fixture
def store(tmp_path, fixtures_dir) -> Path:
    root = tmp_path / "teranode"
    shutil.copytree(fixtures_dir / "teranode", root)
    for p in root.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return root


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _problems(root: Path) -> list:
    return [f for f in check_tree(root).run().findings]


def test_every_fixture_passes_unchanged(store):
    tc = check_tree(store).run()
    assert tc.findings == []
    # 3 blocks + 1 msgBlock + 36 subtrees + 33 subtree data with their subtree = 73;
    # README.md, testSubtreeHex.bin and the subtreeData without a subtree are unchecked
    assert (tc.checked, tc.unchecked) == (73, 3)


def test_renamed_block_fails_naming_it(store):
    src = store / BLOCK
    dst = src.with_name("00000000000000000a61d5ca638906e74376e36e7a080b58a513629496a41cc5.block")
    src.rename(dst)
    problems = _problems(store)
    assert [p.path for p in problems] == [str(dst)]
    assert "header hashes to 00000000000000000a61d5ca638906e74376e36e7a080b58a513629496a41cc4" in problems[0].problem


def test_flipped_byte_in_block_header(store):
    _flip(store / BLOCK, 40)  # inside the merkle root field
    problems = _problems(store)
    assert [p.path for p in problems] == [str(store / BLOCK)]


def test_flipped_byte_in_block_body_is_not_a_header_problem(store):
    good = (store / BLOCK).read_bytes()
    _flip(store / BLOCK, 200)  # in the coinbase: the name check cannot see it...
    assert check_file(store / BLOCK) == []
    # ...but a sidecar does
    sidecar = store / (BLOCK + ".sha256")
    sidecar.write_text(ft.sha256_sidecar_text(hashlib.sha256(good).hexdigest(), Path(BLOCK).name))
    assert [p.path for p in check_file(store / BLOCK)] == [str(store / BLOCK)]


@pytest.mark.parametrize("rel, offset", [(PLAIN_SUBTREE, 100), (FULL_SUBTREE, 8 + 56 + 48 * 5 + 3)])
def test_flipped_byte_in_subtree(store, rel, offset):
    _flip(store / rel, offset)
    problems = _problems(store)
    paths = {p.path for p in problems}
    assert str(store / rel) in paths
    assert all(p.severity != WARNING for p in problems)


def test_full_subtree_with_wrong_declared_root(store):
    _flip(store / FULL_SUBTREE, 8)  # first byte of the declared root
    problems = check_file(store / FULL_SUBTREE)
    assert len(problems) == 1 and "declares root" in problems[0].problem


def test_subtree_data_must_match_its_subtree(store):
    _flip(store / (DATA_171 + ".subtree_data"), 60)
    problems = _problems(store)
    assert [p.path for p in problems] == [str(store / (DATA_171 + ".subtree_data"))]


def test_sha256_sidecar_written_by_sha256sum_and_corrupted(store):
    block = store / BLOCK
    out = subprocess.run(["sha256sum", block.name], cwd=block.parent, capture_output=True, text=True, check=True)
    sidecar = block.with_name(block.name + ".sha256")
    sidecar.write_text(out.stdout)
    assert _problems(store) == []
    sidecar.write_text(out.stdout.replace(out.stdout[0], "0" if out.stdout[0] != "0" else "1", 1))
    problems = _problems(store)
    assert [p.path for p in problems] == [str(block)] and "does not match" in problems[0].problem
    sidecar.write_text("garbage\n")
    assert "sha256sum format" in check_file(block)[0].problem


def test_utxo_headers_sidecar_mismatch_is_a_warning(tmp_path):
    name = "ab" * 32
    f = tmp_path / "ab" / f"{name}.utxo-headers"
    f.parent.mkdir()
    f.write_bytes(b"U-H-2.0 " + bytes.fromhex(name)[::-1] + b"\x05\x00\x00\x00")
    (tmp_path / "ab" / f"{name}.utxo-headers.sha256").write_text(f"{'00' * 32}  {f.name}\n")
    problems = check_file(f)
    assert [(p.path, p.severity) for p in problems] == [(str(f), WARNING)]
    assert check_tree(tmp_path).run().errors == []


def test_tx_outputs_and_sidecars_in_a_sample(sample_node):
    tc = check_tree(sample_node.root).run()
    assert tc.findings == []
    counts = sample_node.file_counts
    assert tc.checked == sum(counts[k] for k in ("tx", "outputs", "subtree", "block"))
    assert tc.unchecked == 2

    tx = next(p for p in sample_node.root.glob("external/*/*.tx") if not list(p.parent.glob(p.name + ".*")))
    renamed = tx.with_name(tx.stem[:-1] + ("0" if tx.stem[-1] != "0" else "1") + ".tx")
    tx.rename(renamed)
    assert [p.path for p in _problems(sample_node.root)] == [str(renamed)]
    renamed.rename(tx)

    outputs = next(sample_node.root.glob("external/*/*.outputs"))
    _flip(outputs, 8 + 3)  # inside the embedded txid
    problems = check_file(outputs)
    assert len(problems) == 1 and "embeds key" in problems[0].problem

    dah = next(sample_node.root.glob("external/*/*.tx.dah"))
    dah.write_text("soon")
    assert [p.path for p in check_file(dah)] == [str(dah)]


def test_wrong_folder_and_wrong_magic(tmp_path, sample_node):
    block = sample_node.block_files[sample_node.best_block.hash_hex]
    moved = tmp_path / "zz" / block.name
    moved.parent.mkdir()
    shutil.copy(block, moved)
    assert check_file(moved) == []  # zz is not a hash-prefix folder
    wrong = tmp_path / "ab" / block.name
    wrong.parent.mkdir()
    shutil.copy(block, wrong)
    assert "fits neither hash prefix rule" in check_file(wrong)[0].problem
    data = bytearray(block.read_bytes())
    data[:8] = ft.magic_for("tx")
    block.write_bytes(bytes(data))
    assert any("magic of a .tx file" in p.problem for p in check_file(block))


def test_temporaries_and_quorum_are_skipped(sample_node):
    root = sample_node.root
    (root / "subtreestore" / "subtree_quorum" / ("ab" * 32 + ".subtree")).write_bytes(b"junk")
    (root / "blockstore" / ("cd" * 32 + ".block.77.tmp")).write_bytes(b"junk")
    tc = check_tree(root).run()
    assert tc.findings == [] and tc.skipped == sample_node.file_counts["tmp"] + 1


def test_orphan_sidecar_is_a_warning(sample_node):
    tx = next(sample_node.root.glob("external/*/*.tx.sha256")).with_suffix("")
    tx.unlink()
    problems = check_tree(sample_node.root).run().findings
    assert [(Path(p.path).name, p.severity) for p in problems] == [(tx.name + ".sha256", WARNING)]
