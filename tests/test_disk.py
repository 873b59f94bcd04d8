"""Disk thresholds: `drtool disk [--enforce]` on a real (small) tmpfs, and the arithmetic alone.

The whole-command tests mount an 8 MiB tmpfs (root only; skipped with the reason elsewhere),
put the node's data, drtool's state and a local repository on it, fill it past the thresholds
and check what `disk` reports and what `--enforce` frees -- and what it must never touch.
"""

from __future__ import annotations

import dataclasses
import os
import random
import subprocess
from pathlib import Path

import pytest

from drtool import config as config_mod
from drtool import disk
from drtool.errors import DiskThresholdError
from drtool.policy import DiskPolicy
from drtool.repo.base import Manifest
from tests.support.node import Node, write_node_config

MiB = 1 << 20
REPO_ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Threshold arithmetic (pure)
# ---------------------------------------------------------------------------------------------


def fake(used: int, free: int, *, inodes_total: int = 0, inodes_used: int = 0) -> disk.PathUsage:
    return disk.PathUsage("/x", True, mount="/", device=1, total=used + free, used=used, free=free,
                          inodes_total=inodes_total, inodes_used=inodes_used)


LIMITS = DiskPolicy(warn_percent=80, critical_percent=90)


@pytest.mark.parametrize("used, expected, status", [
    (0, [], "ok"),
    (79, [], "ok"),
    (80, [], "ok"),                              # "above": exactly at the threshold is not past it
    (81, ["warn_percent"], "warn"),
    (90, ["warn_percent"], "warn"),
    (91, ["critical_percent"], "critical"),      # critical only: no duplicate warning
    (100, ["critical_percent"], "critical"),
])
def test_percent_thresholds(used, expected, status):
    u = fake(used, 100 - used)
    crossed = disk.crossings(u, LIMITS)
    assert [c.threshold for c in crossed] == expected
    assert disk.status_of(u, crossed) == status
    assert disk.is_critical(u, LIMITS) == (status == "critical")


def test_used_percent_counts_reserved_blocks_as_full_like_df():
    # 100 bytes, 50 used, 10 reserved for root: df says 50 / (50 + 40) = 55.6 %
    u = dataclasses.replace(fake(50, 40), total=100)
    assert round(u.used_percent, 1) == 55.6
    assert disk.PathUsage("/x", True).used_percent == 0.0  # an empty filesystem, not a crash


def test_min_free_bytes_is_critical_whatever_the_percentage():
    limits = DiskPolicy(min_free_bytes=10 * MiB)
    low = fake(1 * MiB, 9 * MiB)  # 10 % used, but only 9 MiB free
    crossed = disk.crossings(low, limits)
    assert [(c.threshold, c.severity) for c in crossed] == [("min_free_bytes", "error")]
    assert "9.0 MiB free" in crossed[0].text and "10.0 MiB" in crossed[0].text
    assert disk.crossings(fake(1 * MiB, 10 * MiB), limits) == []


def test_inode_threshold():
    limits = DiskPolicy(max_inode_percent=90)
    assert [c.threshold for c in disk.crossings(fake(1, 99, inodes_total=100, inodes_used=95), limits)] \
        == ["max_inode_percent"]
    assert disk.crossings(fake(1, 99, inodes_total=100, inodes_used=90), limits) == []
    assert disk.crossings(fake(1, 99, inodes_total=0, inodes_used=0), limits) == []  # no inode table


def test_missing_path_has_no_crossings_and_status_missing(tmp_path):
    u = disk.usage(tmp_path / "nope")
    assert not u.exists and u.error == "does not exist"
    assert disk.crossings(u, LIMITS) == [] and disk.status_of(u, []) == "missing"


@pytest.mark.parametrize("needed, threshold", [
    (0, None), (10, None),                 # 80 -> 90 %: at, not above
    (11, "critical_percent"), (500, "critical_percent"),
])
def test_spool_crossing(needed, threshold):
    u = fake(80, 20)
    crossed = disk.spool_crossing(u, needed, LIMITS)
    assert (crossed.threshold if crossed else None) == threshold


def test_spool_crossing_min_free():
    limits = DiskPolicy(critical_percent=99, min_free_bytes=5 * MiB)
    assert disk.spool_crossing(fake(0, 20 * MiB), 14 * MiB, limits) is None
    assert disk.spool_crossing(fake(0, 20 * MiB), 16 * MiB, limits).threshold == "min_free_bytes"


def test_check_spool_on_a_real_filesystem(tmp_path):
    target = tmp_path / "spool" / "not-yet"  # does not exist: its nearest parent is measured
    free = disk.usage(tmp_path).free
    with pytest.raises(DiskThresholdError) as exc:
        disk.check_spool(target, free + 1, DiskPolicy())
    assert str(target) in str(exc.value) and "critical_percent" in str(exc.value)
    assert exc.value.exit_code == 4
    # A generous threshold lets a tiny spool through.
    assert disk.check_spool(target, 1, DiskPolicy(warn_percent=100, critical_percent=100)).exists


def test_best_block_height_from_manifest():
    def snap(doc):
        return Manifest("a" * 64, {"time": "2024-01-01T00:00:00+00:00", **doc})

    assert disk.best_block_height(snap({"best_block": {"height": 7, "hash": "00"}})) == 7
    assert disk.best_block_height(snap({"best_block": {"start": {"height": 5}, "end": {"height": 6}}})) == 6
    assert disk.best_block_height(snap({"sources": {"postgres": {"best_block": {"height": 9}}}})) == 9
    assert disk.best_block_height(snap({})) is None


# ---------------------------------------------------------------------------------------------
# Paths, staging names, expiry (real folders, no mount needed)
# ---------------------------------------------------------------------------------------------


def load_config(tmp_path: Path, data_dir: Path, repo_url: str, blobstores: dict | None = None):
    extra = {"blobstores": blobstores} if blobstores else None
    path = write_node_config(tmp_path / "drtool.toml", data_dir, repo_url, extra=extra)
    return config_mod.load(path, env={})


def test_watched_paths(tmp_path):
    data = tmp_path / "node"
    data.mkdir()
    cfg = load_config(tmp_path, data, f"file://{tmp_path / 'repo'}")
    policy = DiskPolicy(paths=(".", "external", "/abs/else", "./"))
    got = [(str(w.path), w.role) for w in disk.watched_paths(cfg, policy)]
    assert got == [(str(data), "policy"), (str(data / "external"), "policy"), ("/abs/else", "policy"),
                   (str(tmp_path / "state"), "state"), (str(tmp_path / "repo"), "repository")]
    s3 = load_config(tmp_path, data, "s3://bucket/x")
    assert [w.role for w in disk.watched_paths(s3, policy)] == ["policy"] * 3 + ["state"]


def test_report_names_a_missing_path_and_groups_by_filesystem(tmp_path):
    data = tmp_path / "node"
    (data / "external").mkdir(parents=True)
    (tmp_path / "state").mkdir()
    cfg = load_config(tmp_path, data, f"file://{tmp_path / 'repo'}")
    rep = disk.report(cfg, DiskPolicy(paths=(".", "gone")))
    missing = [f for f in rep.findings if f.threshold == "paths"]
    assert [f.subject for f in missing] == [str(data / "gone")] and "does not exist" in missing[0].problem
    paths = {p["path"]: p for p in rep.as_dict()["paths"]}
    assert paths[str(data / "gone")]["status"] == "missing"
    # drtool's own folders that do not exist yet: measured where they will be created
    assert paths[str(tmp_path / "repo")]["measured_at"] == str(tmp_path)
    assert paths[str(data)]["status"] in ("ok", "warn", "critical") and "measured_at" not in paths[str(data)]
    # data, state and repo are on one filesystem: one group, any finding raised once for all three
    on_disk = [str(data), str(tmp_path / "state"), str(tmp_path / "repo")]
    assert [[str(p.watched.path) for p in g] for g in rep.filesystems()] == [on_disk]
    for f in rep.findings:
        if f.threshold != "paths":
            assert f.subject == str(data) and f.paths == on_disk


def test_staging_leftovers_match_only_restore_staging_of_configured_stores(tmp_path):
    data = tmp_path / "node"
    for store in ("external", "subtreestore"):
        (data / store).mkdir(parents=True)
    cfg = load_config(tmp_path, data, f"file://{tmp_path / 'repo'}",
                      {"external": "external", "subtreestore": "subtreestore", "blockstore": "blockstore"})
    wanted = [data / ".external.drtool-staging-0123abcd-a1b2c3", data / ".blockstore.drtool-staging-deadbeef-000000"]
    lookalikes = [data / "external.drtool-staging-0123abcd-a1b2c3",      # no leading dot
                  data / ".external.drtool-staging-notatag",              # not a restore tag
                  data / ".other.drtool-staging-0123abcd-a1b2c3",         # not a configured store
                  data / ".external.drtool-previous-20240101-000000",     # a moved-aside store: the operator's
                  data / "external" / ".external.drtool-staging-0123abcd-a1b2c3"]  # inside a store, not next to it
    for p in wanted + lookalikes:
        p.mkdir()
    (data / ".subtreestore.drtool-staging-0123abcd-a1b2c3").write_bytes(b"a file, not a staging folder")
    (data / ".subtreestore.drtool-staging-99999999-a1b2c3").symlink_to(data / "external")
    got = disk.staging_leftovers(cfg)
    assert sorted(p for p, _ in got) == sorted(wanted)
    assert {tag for _, tag in got} == {"0123abcd-a1b2c3", "deadbeef-000000"}


def test_staging_in_use(tmp_path):
    staging = tmp_path / ".external.drtool-staging-0123abcd-a1b2c3"
    (staging / "ab").mkdir(parents=True)
    (staging / "ab" / "f.tx").write_bytes(b"x")
    assert disk._in_use(staging, grace=900)        # just written: may be a running restore
    assert not disk._in_use(staging, grace=0)      # nothing recent, nothing open
    with open(staging / "ab" / "f.tx", "rb"):
        assert disk._in_use(staging, grace=0)      # a process holds a file in it open


def test_expired_blobs(tmp_path):
    root = tmp_path / "external"
    (root / "aa").mkdir(parents=True)
    (root / "subtree_quorum").mkdir()
    for name, dah in [("old.tx", "100"), ("edge.tx", "150\n"), ("new.tx", "151"), ("junk.tx", "soon")]:
        (root / "aa" / name).write_bytes(b"x")
        (root / "aa" / (name + ".dah")).write_text(dah)
    (root / "aa" / "orphan.tx.dah").write_text("1")             # sidecar without its blob
    (root / "subtree_quorum" / "q.lock").write_bytes(b"")
    (root / "subtree_quorum" / "q.lock.dah").write_text("1")   # not data
    assert sorted(disk.expired_blobs(root, 150)) == ["aa/edge.tx", "aa/old.tx"]
    assert list(disk.expired_blobs(root, 99)) == []


# ---------------------------------------------------------------------------------------------
# Whole command on a real tmpfs
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path):
    mnt = tmp_path / "fs"
    mnt.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
                              capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        pytest.skip("cannot mount a tmpfs: no mount command")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root or CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def rnd(seed: str, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def make_node(fs: Path, policy: str) -> Node:
    """A tiny node on the tmpfs: three stores with a few files, p2p.key, state and repo on it too."""
    data = fs / "node"
    for store in ("external", "subtreestore", "blockstore"):
        (data / store).mkdir(parents=True)
    for i in range(8):
        write(data / "external" / f"{i:02x}" / f"{i:064x}.tx", rnd(f"tx{i}", 4096))
    write(data / "p2p.key", rnd("key", 64))
    (fs / "policy.toml").write_text(policy)
    cfg = write_node_config(fs / "drtool.toml", data, f"file://{fs / 'repo'}",
                            extra={"policy": {"file": str(fs / "policy.toml")}})
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return Node(fs, data, cfg, f"file://{fs / 'repo'}", env)


def fill(fs: Path, percent: float) -> None:
    """Add a filler file (not drtool's: never freed) so the filesystem is `percent` used."""
    u = disk.usage(fs)
    want = int((u.used + u.free) * percent / 100) - u.used
    assert want > 0, f"{fs} is already {u.used_percent:.1f}% used"
    n = len(list((fs / "filler").glob("*"))) if (fs / "filler").exists() else 0
    write(fs / "filler" / f"f{n}", rnd(f"filler{n}", want))


def used(fs: Path) -> float:
    return disk.usage(fs).used_percent


def test_disk_reports_warn_then_critical(tmpfs):
    node = make_node(tmpfs, '[disk]\npaths = [".", "not-there"]\nwarn_percent = 80\ncritical_percent = 90\n')
    ok = node.run("disk", json_out=True).doc
    assert ok["ok"] is True and not [f for f in ok["findings"] if f["threshold"] != "paths"]
    missing = [f for f in ok["findings"] if f["threshold"] == "paths"]
    assert missing and missing[0]["path"] == str(node.data_dir / "not-there")

    fill(tmpfs, 85)
    warn = node.run("disk", json_out=True).doc  # exit 0: a warning is not a failure
    assert warn["ok"] is True
    found = [f for f in warn["findings"] if f["threshold"] == "warn_percent"]
    assert len(found) == 1 and found[0]["path"] == str(node.data_dir) and found[0]["mount"] == str(tmpfs)
    assert str(tmpfs / "state") in found[0]["paths"]  # one filesystem, one finding naming every path
    statuses = {p["path"]: p["status"] for p in warn["paths"]}
    assert statuses[str(node.data_dir)] == "warn" and statuses[str(node.data_dir / "not-there")] == "missing"
    human = node.run("disk")
    assert "warn_percent 80" in human.stdout and str(node.data_dir) in human.stdout

    fill(tmpfs, 95)
    crit = node.run("disk", json_out=True, check=4)
    assert crit.doc["ok"] is False
    found = [f for f in crit.doc["findings"] if f["severity"] == "error"]
    assert [f["threshold"] for f in found] == ["critical_percent"] and found[0]["path"] == str(node.data_dir)
    assert f"disk critical: {node.data_dir}" in crit.stderr
    # what holds the space, biggest first: the node's own folders, then the whole filesystem's
    assert f"largest: {node.data_dir / 'external'}" in crit.stderr
    assert f"largest on {tmpfs}: {tmpfs / 'filler'} 7." in crit.stderr


def test_enforce_drops_staging_and_cache_then_prunes_the_local_repository(tmpfs):
    node = make_node(tmpfs, "[retention]\nkeep_last = 1\n[disk]\nwarn_percent = 80\ncritical_percent = 90\n")
    big = write(node.data_dir / "subtreestore" / "ab" / f"{'ab' * 32}.subtree", rnd("big", 1536 * 1024))
    node.run("backup")
    big.unlink()
    node.run("backup")  # the first snapshot alone holds `big`: prunable
    staging = write(node.data_dir / ".subtreestore.drtool-staging-0123abcd-a1b2c3" / "ab" / "x.subtree",
                    rnd("staging", 160 * 1024)).parent.parent
    lookalikes = [write(node.data_dir / name / "keep", b"not drtool's") for name in
                  (".subtreestore.drtool-staging-notatag", ".other.drtool-staging-0123abcd-a1b2c3",
                   "subtreestore.drtool-staging-0123abcd-a1b2c3")]
    cache = tmpfs / "state" / "cache"
    write(cache / "parts" / "p1", rnd("cache", 96 * 1024))
    fill(tmpfs, 95)  # step 1 frees ~3 %, not enough: prune must follow
    filler_before = sorted((p.name, p.stat().st_size) for p in (tmpfs / "filler").iterdir())
    before = used(tmpfs)

    doc = node.run("disk", "--enforce", "--staging-grace", "0s", json_out=True).doc
    assert [a["action"] for a in doc["actions"]] == ["drop-cache", "drop-staging", "prune"]
    assert doc["ok"] is True and doc["enforced"] is True
    drop = {a["action"]: a for a in doc["actions"]}
    assert drop["drop-staging"]["items"] == 1 and drop["drop-staging"]["bytes"] == 160 * 1024
    assert drop["drop-cache"]["bytes"] == 96 * 1024
    assert drop["prune"]["items"] == 1 and drop["prune"]["bytes"] >= 1536 * 1024
    assert not staging.exists() and cache.is_dir() and not any(cache.iterdir())
    assert all(p.read_bytes() == b"not drtool's" for p in lookalikes)
    assert sorted((p.name, p.stat().st_size) for p in (tmpfs / "filler").iterdir()) == filler_before
    assert used(tmpfs) < 90 < before
    assert len(node.run("snapshots", json_out=True).doc["snapshots"]) == 1
    node.run("verify")

    # A fresh staging folder may belong to a running restore: kept under the default grace, and
    # with nothing else to free, exit 4.
    fresh = write(node.data_dir / ".external.drtool-staging-feedf00d-000001" / "aa" / "y.tx",
                  rnd("s2", 1024 * 1024)).parent.parent
    fill(tmpfs, 93)
    out = node.run("disk", "--enforce", json_out=True, check=4)
    assert fresh.exists() and any("may belong to a running restore" in f["problem"] for f in out.doc["findings"])
    # Step 1 alone enough: nothing further is done (no prune).
    doc = node.run("disk", "--enforce", "--staging-grace", "0s", json_out=True).doc
    assert [a["action"] for a in doc["actions"]] == ["drop-staging"] and doc["ok"] is True
    assert not fresh.exists()


def test_enforce_evicts_only_expired_blobs_of_a_verified_snapshot(tmpfs):
    policy = "[retention]\nkeep_last = 10\n[disk]\ncritical_percent = 90\nevict_expired_blobs = {}\n"
    node = make_node(tmpfs, policy.format("false"))
    ext = node.data_dir / "external"
    size = 640 * 1024

    def blob(name: str, dah: str | None) -> Path:
        path = write(ext / name[:2] / f"{name * 32}.tx", rnd(name, size))
        write(path.with_name(path.name + ".sha256"), b"0" * 64 + b"  " + path.name.encode() + b"\n")
        if dah is not None:
            write(path.with_name(path.name + ".dah"), dah.encode())
        return path

    expired = blob("a1", "100")           # in the snapshot, expired at 150: the one to evict
    not_yet = blob("b2", "200")           # in the snapshot, not expired
    changed = blob("d4", "100")           # in the snapshot, but changed since: not safely backed up
    no_dah = blob("e5", None)             # in the snapshot, never expires
    node.run("backup")
    unsaved = blob("c3", "100")           # expired but in no snapshot: must never be evicted
    os.utime(changed, ns=(changed.stat().st_mtime_ns + 10**9,) * 2)
    keep = [not_yet, changed, no_dah, unsaved]
    fill(tmpfs, 94)

    # Not opted in: nothing of the node's is touched; exit 4 naming the path and what holds the space.
    out = node.run("disk", "--enforce", "--best-height", "150", json_out=True, check=4)
    assert out.doc["ok"] is False and out.doc["error"] == out.stderr.strip().removeprefix("drtool: error: ")
    assert f"disk still critical after enforcement: {node.data_dir} (filesystem {tmpfs}" in out.stderr
    on_fs = out.stderr.split(f"largest on {tmpfs}: ", 1)[1]
    assert str(tmpfs / "filler") in on_fs and str(node.data_dir) in on_fs and "evict_expired_blobs = false" in on_fs
    assert all(p.exists() for p in keep + [expired])
    assert [a["action"] for a in out.doc["actions"] if a["items"]] == []

    # Opted in, but no best block height known (the snapshot records none): still nothing evicted.
    (tmpfs / "policy.toml").write_text(policy.format("true"))
    out = node.run("disk", "--enforce", json_out=True, check=4)
    assert any("records no best block height" in f["problem"] for f in out.doc["findings"])
    assert expired.exists()

    out = node.run("disk", "--enforce", "--best-height", "150", json_out=True)
    evicted = [a for a in out.doc["actions"] if a["action"] == "evict-blobs"]
    assert len(evicted) == 1 and evicted[0]["items"] == 1
    assert evicted[0]["bytes"] == size + 64 + 2 + len(expired.name) + 1 + 3  # blob, .sha256, .dah
    assert not expired.exists() and not list(expired.parent.glob(expired.name + "*"))
    assert all(p.exists() and p.with_name(p.name + ".sha256").exists() for p in keep)
    assert out.doc["ok"] is True and used(tmpfs) < 90
