"""End-to-end: backup, snapshots, restore and verify through the CLI, on a local folder
repository and on S3 served by a real moto_server process."""

from __future__ import annotations

import os
import stat
from pathlib import Path


from drtool.demo import tree_digest
from drtool.repo import pack
from drtool.repo.objectstore import open_store
from drtool.teranode import sample


def data_digest(root: Path) -> dict[str, str]:
    """What a backup carries: every file but temporaries and subtree_quorum/."""
    return {p: h for p, h in tree_digest(root).items()
            if not p.rsplit("/", 1)[-1].endswith(".tmp") and "subtree_quorum/" not in p}


def store_of(node):
    return open_store(node.repo_url, endpoint_url=os.environ.get("AWS_ENDPOINT_URL_TEST") or _endpoint(node))


def _endpoint(node) -> str | None:
    from drtool import config

    return config.load(node.config, env={}).repository.endpoint_url or None


def listing(store) -> dict[str, int]:
    return {info.key: info.size for info in store.list("")}


def test_round_trip_is_byte_identical(node):
    backup = node.run("backup", "--tag", "first", json_out=True).doc
    snap = backup["snapshot"]
    assert snap["status"] == "complete" and snap["tags"] == ["first"]
    assert backup["stats"]["files_new"] == len(data_digest(node.data_dir))

    listed = node.run("snapshots", json_out=True).doc["snapshots"]
    assert [s["id"] for s in listed] == [snap["id"]]

    target = node.dir / "restored"
    restored = node.run("restore", snap["id"][:10], "--target-dir", str(target), json_out=True).doc
    assert restored["ok"] and restored["published"]
    assert data_digest(target) == data_digest(node.data_dir)
    key = target / "p2p.key"
    assert stat.S_IMODE(key.stat().st_mode) == stat.S_IMODE((node.data_dir / "p2p.key").stat().st_mode)
    assert not list(node.dir.glob(".*drtool-staging*")) and not list(target.parent.glob(".*drtool-staging*"))

    assert node.run("verify", "--read-data", json_out=True).doc["ok"]


def test_incremental_uploads_only_new_bytes(node):
    node.run("backup")
    store = store_of(node)
    before_objects = listing(store)
    before_tree = data_digest(node.data_dir)

    total = len(before_tree)
    sample.add_files(node.data_dir, seed=99, count=max(1, total * 2 // 100))
    deleted = sample.delete_fraction(node.data_dir, seed=5, fraction=0.01)
    assert deleted
    after_tree = data_digest(node.data_dir)
    new_files = {p: h for p, h in after_tree.items() if before_tree.get(p) != h}
    new_bytes = sum((node.data_dir / p).stat().st_size for p in new_files)
    assert new_files

    second = node.run("backup", json_out=True).doc
    assert second["stats"]["files_new"] == len(new_files)

    # What the object store received: the data blobs in the packs that appeared.
    new_objects = {k: v for k, v in listing(store).items() if k not in before_objects}
    received = 0
    for key in new_objects:
        if key.startswith("data/"):
            for kind, _blob, _offset, length in pack.read_header(store.get(key), key):
                if kind == pack.DATA:
                    received += length
    assert received == new_bytes, (received, new_bytes)

    # Both snapshots restore to their own moment.
    first_id, second_id = [s["id"] for s in node.run("snapshots", json_out=True).doc["snapshots"]]
    node.run("restore", first_id, "--target-dir", str(node.dir / "r1"))
    node.run("restore", second_id, "--target-dir", str(node.dir / "r2"))
    assert data_digest(node.dir / "r1") == before_tree
    assert data_digest(node.dir / "r2") == after_tree


def test_unchanged_node_uploads_no_data(local_node):
    node = local_node
    node.run("backup")
    store = store_of(node)
    before = listing(store)
    again = node.run("backup", json_out=True).doc
    assert again["stats"]["files_new"] == 0
    new_keys = [k for k in listing(store) if k not in before]
    assert all(k.startswith("snapshots/") for k in new_keys), new_keys


def test_restore_refuses_nonempty_target_and_keeps_it(local_node):
    node = local_node
    snap = node.run("backup", json_out=True).doc["snapshot"]["id"]
    target = node.dir / "busy"
    (target / "external").mkdir(parents=True)
    (target / "external" / "keep.me").write_text("operator data")
    proc = node.run("restore", snap, "--target-dir", str(target), check=2)
    assert "not empty" in proc.stderr and "external" in proc.stderr
    proc = node.run("restore", snap, "--target-dir", str(target), "--force", json_out=True)
    aside = [Path(p) for p in proc.doc["moved_aside"]]
    assert any((p / "keep.me").read_text() == "operator data" for p in aside)
    assert data_digest(target / "external") == {k[len("external/"):]: v for k, v in
                                                data_digest(node.data_dir).items() if k.startswith("external/")}


def test_restore_target_that_is_a_file(local_node):
    node = local_node
    node.run("backup")
    target = node.dir / "a-file"
    target.write_text("x")
    proc = node.run("restore", "latest", "--target-dir", str(target), check=2)
    assert str(target) in proc.stderr and "not a directory" in proc.stderr
    assert target.read_text() == "x"


def test_dry_run_stores_nothing(local_node):
    node = local_node
    node.run("backup")
    store = store_of(node)
    before = listing(store)
    sample.add_files(node.data_dir, seed=3, count=10)
    doc = node.run("backup", "--dry-run", json_out=True).doc
    assert doc["dry_run"] and doc["snapshot"] is None and doc["stats"]["files_new"] >= 10
    assert listing(store) == before


def test_skips_temporaries_and_quorum_and_never_follows_symlinks(local_node, tmp_path):
    node = local_node
    outside = tmp_path / "outside-secret"
    outside.write_text("not part of the store")
    ext = node.data_dir / "external"
    (ext / "aa").mkdir(exist_ok=True)
    os.symlink(outside, ext / "aa" / "escape.tx")
    (ext / "aa" / "x.tx.1234.tmp").write_text("partial")
    (ext / "aa" / ".x.tx.1234.tmp").write_text("partial")
    quorum = node.data_dir / "subtreestore" / "subtree_quorum"
    quorum.mkdir(exist_ok=True)
    (quorum / "lock.lock").write_text("lock")
    node.run("backup")
    target = node.dir / "restored"
    node.run("restore", "latest", "--target-dir", str(target))
    assert os.readlink(target / "external" / "aa" / "escape.tx") == str(outside)
    assert not (target / "external" / "aa" / "x.tx.1234.tmp").exists()
    assert not (target / "external" / "aa" / ".x.tx.1234.tmp").exists()
    assert not (target / "subtreestore" / "subtree_quorum").exists()
