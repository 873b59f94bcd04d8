"""`drtool hook pre-update`: a verified, tagged snapshot, or a non-zero exit that stops the update."""

from __future__ import annotations

from drtool import config as config_mod
from drtool.repo import open_repository


def test_pre_update_snapshot_tagged_with_the_teranode_version(node):
    (node.config.parent / ".env").write_text("# compose env\nexport TERANODE_VERSION='v0.10.2'\nOTHER=1\n")
    node.run("backup")
    proc = node.run("hook", "pre-update", json_out=True)
    doc = proc.doc
    assert doc["ok"] is True and doc["teranode_version"] == "v0.10.2"
    assert set(doc["snapshot"]["tags"]) == {"pre-update", "teranode-v0.10.2"}
    assert doc["verify"]["ok"] is True and doc["verify"]["read_data"] == 1.0
    listed = node.run("snapshots", "--tag", "pre-update", json_out=True).doc["snapshots"]
    assert [s["id"] for s in listed] == [doc["snapshot"]["id"]]
    human = node.run("hook", "pre-update", "--env-file", str(node.config.parent / ".env"))
    assert "verified" in human.stdout and "drtool restore" in human.stdout


def test_pre_update_fails_when_the_repository_is_unreachable(local_node):
    proc = local_node.run("hook", "pre-update", check=1)  # no repository was ever created there
    assert "no pre-update snapshot, do not update" in proc.stderr
    assert "config.json missing" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_pre_update_fails_when_verification_fails(local_node):
    local_node.run("backup")
    cfg = config_mod.load(local_node.config)
    repo = open_repository(cfg.repository)
    # the pre-update snapshot reuses every pack of the first (nothing changed): damage one
    victim = max(repo.index.packs(), key=lambda k: repo.index.pack_sizes[k])
    path = local_node.dir / "repo" / victim
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    proc = local_node.run("hook", "pre-update", check=1)
    assert "failed verification" in proc.stderr and "do not update" in proc.stderr
    assert victim in proc.stderr
