"""kill -9 in the middle of a backup: earlier snapshots stay intact, the next backup
completes and reuses what the killed one uploaded."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from drtool.repo import pack


def packs(repo: Path) -> dict[str, int]:
    return {str(p.relative_to(repo)): p.stat().st_size for p in (repo / "data").rglob("*")
            if p.is_file() and not p.name.endswith(".tmp")}


def test_kill_9_mid_backup(local_node):
    node = local_node
    repo = Path(node.repo_url[len("file://"):])
    first = node.run("backup", json_out=True).doc["snapshot"]["id"]

    # ~200 MiB of new, incompressible block data: the next backup takes a while.
    rng = random.Random(11)
    bulk = node.data_dir / "blockstore" / "zz"
    bulk.mkdir(exist_ok=True)
    for i in range(25):
        (bulk / f"bulk{i:02d}.block").write_bytes(rng.randbytes(8 << 20))

    before = packs(repo)
    argv = [sys.executable, "-m", "drtool.cli", "--config", str(node.config), "backup"]
    proc = subprocess.Popen(argv, env=node.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if len(packs(repo)) - len(before) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "backup finished before it could be killed: make the bulk data bigger"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    uploaded_before_kill = {k: v for k, v in packs(repo).items() if k not in before}
    assert uploaded_before_kill

    # Every earlier snapshot is intact; the killed run left no snapshot.
    listed = node.run("snapshots", json_out=True).doc["snapshots"]
    assert [s["id"] for s in listed] == [first]
    assert node.run("verify", "--read-data", json_out=True).doc["ok"]

    # The next backup completes and reuses the packs the killed one uploaded (its lock is stale:
    # the process is gone, and shared locks do not block another backup).
    second = node.run("backup", json_out=True).doc
    after = packs(repo)
    for key in uploaded_before_kill:
        assert key in after, f"{key} uploaded before the kill was removed"
    killed_bytes = sum(
        length for key in uploaded_before_kill
        for kind, _b, _o, length in pack.read_header((repo / key).read_bytes(), key) if kind == pack.DATA)
    assert second["stats"]["bytes_read"] >= 200 << 20  # everything new was read...
    new_data_bytes = sum(
        length for key in after if key not in before and key not in uploaded_before_kill
        for kind, _b, _o, length in pack.read_header((repo / key).read_bytes(), key) if kind == pack.DATA)
    assert new_data_bytes <= (200 << 20) - killed_bytes + (1 << 20)  # ...but what was uploaded is not sent again
    assert node.run("verify", "--read-data", json_out=True).doc["ok"]
    target = node.dir / "restored"
    node.run("restore", "latest", "--target-dir", str(target))
    assert (target / "blockstore" / "zz" / "bulk24.block").read_bytes() == (bulk / "bulk24.block").read_bytes()
