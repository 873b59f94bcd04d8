"""A damaged repository: verify names the object and the files it affects; restore fails
without touching the target."""

from __future__ import annotations

from pathlib import Path

import pytest


def repo_dir(node) -> Path:
    return Path(node.repo_url[len("file://"):])


def largest_pack(node) -> Path:
    packs = sorted((p for p in (repo_dir(node) / "data").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    return packs[-1]


def make_writable(path: Path) -> None:
    path.chmod(0o644)


@pytest.fixture
def backed_up(local_node):
    local_node.run("backup")
    target = local_node.dir / "target"
    target.mkdir()
    return local_node, target


def assert_restore_fails_cleanly(node, target: Path) -> None:
    proc = node.run("restore", "latest", "--target-dir", str(target), check=1)
    assert "drtool: error:" in proc.stderr
    assert list(target.iterdir()) == []
    assert not [p for p in target.parent.iterdir() if "drtool-staging" in p.name]


def test_flipped_byte_in_pack(backed_up):
    node, target = backed_up
    pack = largest_pack(node)
    make_writable(pack)
    data = bytearray(pack.read_bytes())
    data[len(data) // 3] ^= 0x40
    pack.write_bytes(bytes(data))

    quick = node.run("verify", json_out=True, check=0).doc  # sizes still match: only --read-data sees it
    assert quick["ok"]
    proc = node.run("verify", "--read-data", json_out=True, check=1)
    subjects = [f["subject"] for f in proc.doc["findings"]]
    key = f"data/{pack.parent.name}/{pack.name}"
    assert key in subjects
    affected = [s for s in subjects if s.startswith("snapshot ")]
    assert affected, "verify must name the files the damaged pack affects"
    assert_restore_fails_cleanly(node, target)


def test_missing_pack(backed_up):
    node, target = backed_up
    pack = largest_pack(node)
    pack.unlink()
    proc = node.run("verify", json_out=True, check=1)
    findings = proc.doc["findings"]
    assert any(f["subject"] == f"data/{pack.parent.name}/{pack.name}" and "missing" in f["problem"] for f in findings)
    assert any(f["subject"].startswith("snapshot ") for f in findings)
    assert_restore_fails_cleanly(node, target)


def test_truncated_pack(backed_up):
    node, target = backed_up
    pack = largest_pack(node)
    make_writable(pack)
    data = pack.read_bytes()
    pack.write_bytes(data[: len(data) // 2])
    proc = node.run("verify", json_out=True, check=1)
    assert any(f["subject"] == f"data/{pack.parent.name}/{pack.name}" and "size" in f["problem"]
               for f in proc.doc["findings"])
    assert_restore_fails_cleanly(node, target)


def test_edited_manifest_is_not_trusted(backed_up):
    node, _target = backed_up
    manifest = next((repo_dir(node) / "snapshots").iterdir())
    make_writable(manifest)
    manifest.write_text(manifest.read_text().replace('"demo', '"evil').replace('"test-node"', '"other-node"'))
    listed = node.run("snapshots", json_out=True).doc["snapshots"]
    assert listed == []


def test_unknown_repository_format_refused(backed_up):
    node, _target = backed_up
    config = repo_dir(node) / "config.json"
    make_writable(config)
    config.write_text(config.read_text().replace('"version": 1', '"version": 99'))
    proc = node.run("snapshots", check=1)
    assert "config.json" in proc.stderr and "version 99" in proc.stderr
