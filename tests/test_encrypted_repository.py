"""A repository with client-side encryption ([repository] encryption_key_file), end to end."""

from __future__ import annotations

from pathlib import Path

from drtool.repo.encryption import generate_key
from tests.support.node import write_node_config
from tests.test_backup_restore import data_digest


def test_encrypted_round_trip_and_wrong_key(local_node, tmp_path):
    node = local_node
    key = tmp_path / "repo.key"
    generate_key(key)
    write_node_config(node.config, node.data_dir, node.repo_url, extra={"repository": {"encryption_key_file": str(key)}})
    node.run("backup")
    repo = Path(node.repo_url[len("file://"):])
    secret = (node.data_dir / "p2p.key").read_bytes()
    for obj in repo.rglob("*"):
        if obj.is_file():
            assert obj.read_bytes().startswith(b"DRE\x01"), obj
            assert secret[:16] not in obj.read_bytes()
    node.run("verify", "--read-data")
    node.run("restore", "latest", "--target-dir", str(tmp_path / "r"))
    assert data_digest(tmp_path / "r") == data_digest(node.data_dir)

    other = tmp_path / "other.key"
    generate_key(other)
    write_node_config(node.config, node.data_dir, node.repo_url, extra={"repository": {"encryption_key_file": str(other)}})
    proc = node.run("snapshots", check=1)
    assert "wrong encryption key" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    write_node_config(node.config, node.data_dir, node.repo_url)
    proc = node.run("snapshots", check=1)
    assert "encrypted" in proc.stderr and "encryption_key_file" in proc.stderr
