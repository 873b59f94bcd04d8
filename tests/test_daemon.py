"""`drtool daemon` as a real process on a sample node: jobs, /metrics, /healthz, SIGTERM."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


from drtool import daemon as daemon_mod
from drtool.metrics import HealthState


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return 0, ""


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text, or None."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(r"^([a-z_]+)(?:\{(.*)\})? (\S+)$", line)
        if m and m.group(1) == name:
            got = ",".join(sorted(m.group(2).split(","))) if m.group(2) else ""
            if got == want:
                return float(m.group(3))
    return None


def wait_for(what: str, predicate, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.2)
    detail = log.read_text()[-3000:] if log and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}\n{detail}")


def start_daemon(node, policy: str, *args: str) -> tuple[subprocess.Popen, Path]:
    policy_path = node.dir / "policy.toml"
    policy_path.write_text(policy)
    log = node.dir / "daemon.log"
    argv = [sys.executable, "-m", "drtool.cli", "--config", str(node.config), "daemon",
            "--policy", str(policy_path), "--listen", "127.0.0.1", *args]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=node.env)
    return proc, log


def stop_daemon(proc: subprocess.Popen, timeout: float = 60) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_daemon_runs_jobs_and_exports_metrics(local_node):
    port = free_port()
    started = time.time()
    proc, log = start_daemon(local_node, f"""
[schedule]
backup = "every 2s"
verify = "every 3s"
prune = "every 4s"
drill = "every 4s"
disk = "every 3s"
[retention]
keep_last = 2
[verify]
read_data_fraction = 0.5
[daemon]
metrics_port = {port}
rpo = "1h"
""", "--log-format", "json", "--health-interval", "1s")
    url = f"http://127.0.0.1:{port}"
    try:
        def enough() -> str | None:
            code, text = http_get(url + "/metrics")
            ok = (code == 200
                  and (metric(text, "drtool_job_runs_total", job="backup", result="success") or 0) >= 2
                  and (metric(text, "drtool_job_runs_total", job="verify", result="success") or 0) >= 2
                  and (metric(text, "drtool_job_runs_total", job="prune", result="success") or 0) >= 1)
            return text if ok else None

        text = wait_for("two backups, two verifies and a prune", enough, 60, proc, log)
        assert metric(text, "drtool_job_last_success_timestamp_seconds", job="backup") >= started
        assert metric(text, "drtool_job_runs_total", job="backup", result="failure") == 0
        assert metric(text, "drtool_source_bytes_read_total", source="blobstores") > 1_000_000
        assert metric(text, "drtool_source_bytes_uploaded_total", source="blobstores") > 0
        assert metric(text, "drtool_snapshots", status="complete") >= 1
        assert metric(text, "drtool_repository_size_bytes") > 0
        assert metric(text, "drtool_last_snapshot_timestamp_seconds") >= started
        # drill and disk are separate modules: run, or skipped when this build lacks them; never failed
        for job in ("drill", "disk"):
            assert metric(text, "drtool_job_runs_total", job=job, result="failure") == 0
        code, body = http_get(url + "/healthz")
        assert code == 200, body
        assert json.loads(body)["healthy"] is True
        # the rotation went round: 2 runs of subset n/2 read every pack once
        rotation = json.loads((Path(local_node.dir) / "state" / "verify-rotation.json").read_text())
        assert rotation["t"] == 2 and rotation["done"] in (1, 2)
    finally:
        rc = stop_daemon(proc)
    assert rc == 0, log.read_text()[-3000:]
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    assert {"time", "level", "logger", "message", "job"} <= set(lines[0])
    assert any(entry["job"] == "backup" and "succeeded" in entry["message"] for entry in lines)
    snaps = local_node.run("snapshots", json_out=True).doc["snapshots"]
    assert snaps and all(s["status"] == "complete" and "scheduled" in s["tags"] for s in snaps)


def test_healthz_follows_repository_reachability(local_node):
    local_node.run("backup")
    port = free_port()
    # no backup during the test (the first would come in an hour); verify fails while the
    # repository is away and must not take the daemon down
    proc, log = start_daemon(local_node, f"""
[schedule]
backup = "every 1h"
verify = "every 1s"
[daemon]
metrics_port = {port}
rpo = "1h"
""", "--health-interval", "0.3")
    url = f"http://127.0.0.1:{port}"
    repo = local_node.dir / "repo"
    away = local_node.dir / "repo-away"
    try:
        wait_for("healthy", lambda: http_get(url + "/healthz")[0] == 200, 30, proc, log)
        repo.rename(away)
        code, body = wait_for("unhealthy", lambda: (r := http_get(url + "/healthz"))[0] == 503 and r, 15, proc, log)
        doc = json.loads(body)
        assert doc["healthy"] is False and doc["repository_reachable"] is False
        assert "config.json" in doc["reason"]
        wait_for("a failed verify", lambda: (metric(http_get(url + "/metrics")[1], "drtool_job_runs_total",
                                                    job="verify", result="failure") or 0) >= 1, 15, proc, log)
        away.rename(repo)
        wait_for("healthy again", lambda: http_get(url + "/healthz")[0] == 200, 15, proc, log)
        before = metric(http_get(url + "/metrics")[1], "drtool_job_runs_total", job="verify", result="success") or 0
        wait_for("verify succeeding again", lambda: (metric(http_get(url + "/metrics")[1], "drtool_job_runs_total",
                                                            job="verify", result="success") or 0) > before, 15, proc, log)
        assert proc.poll() is None
    finally:
        if away.exists() and not repo.exists():
            away.rename(repo)
        rc = stop_daemon(proc)
    assert rc == 0, log.read_text()[-3000:]


def test_sigterm_during_backup_cancels_cleanly(local_node):
    # the upload limit makes the first backup take seconds; a 1s grace then cancels it
    proc, log = start_daemon(local_node, """
[schedule]
backup = "every 1s"
[daemon]
metrics_port = 0
[throttle]
upload = "1MiB/s"
""", "--grace", "1s")
    locks = local_node.dir / "repo" / "locks"
    try:
        wait_for("a backup holding the lock", lambda: locks.is_dir() and any(locks.iterdir()), 30, proc, log)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(90)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert "cancelling it" in text and "cancelled at shutdown" in text, text[-3000:]
    assert not any(locks.iterdir()), "the backup's lock was left behind"
    assert local_node.run("snapshots", json_out=True).doc["snapshots"] == []
    # the uploaded packs stay for the next run to reuse, and the next run works
    local_node.run("backup")


def test_sigterm_lets_a_running_backup_finish_within_grace(local_node):
    proc, log = start_daemon(local_node, """
[schedule]
backup = "every 1s"
[daemon]
metrics_port = 0
[throttle]
upload = "2MiB/s"
""", "--grace", "2m")
    locks = local_node.dir / "repo" / "locks"
    try:
        wait_for("a backup holding the lock", lambda: locks.is_dir() and any(locks.iterdir()), 30, proc, log)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, log.read_text()[-3000:]
    assert not any(locks.iterdir())
    snaps = local_node.run("snapshots", json_out=True).doc["snapshots"]
    assert len(snaps) == 1 and snaps[0]["status"] == "complete"


# ---- the pieces, in process ------------------------------------------------------------------

def test_health_state_rpo_and_reachability():
    now = dt.datetime.now(dt.timezone.utc)
    h = HealthState(dt.timedelta(hours=8))
    assert h.status(now)[0] is False  # never checked
    h.update(True, (now - dt.timedelta(hours=2), "a" * 64))
    healthy, doc = h.status(now)
    assert healthy and doc["newest_snapshot"] == "aaaaaaaa" and doc["newest_snapshot_age_seconds"] == 7200
    healthy, doc = h.status(now + dt.timedelta(hours=7))
    assert not healthy and "beyond the RPO" in doc["reason"]
    h.update(False, error="s3://bucket/x: connection refused")
    healthy, doc = h.status(now)
    assert not healthy and "connection refused" in doc["reason"]
    h.update(True, None)
    assert h.status(now)[1]["reason"] == "no complete or fuzzy snapshot of this node"


def test_rotation_reads_each_pack_exactly_once_per_cycle(local_node):
    """A damaged pack is found by exactly one run of the cycle: the one of its subset."""
    from drtool import config as config_mod
    from drtool.repo import open_repository

    local_node.run("backup")
    cfg = config_mod.load(local_node.config)
    repo = open_repository(cfg.repository)
    packs = repo.index.packs()
    t = 3
    subsets = {k: daemon_mod.pack_subset(k, t) for k in packs}
    assert set(subsets.values()) <= {1, 2, 3}
    victim = max(packs, key=lambda k: repo.index.pack_sizes[k])
    path = local_node.dir / "repo" / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF  # same size: only reading the data finds it
    path.write_bytes(bytes(data))
    found_in = []
    read = []
    for n in range(1, t + 1):
        findings, info = daemon_mod.verify_subset(repo, repo.snapshots(), n, t)
        read.append(info["packs_read"])
        if any(f.subject == victim for f in findings):
            found_in.append(n)
            assert any(f.problem.startswith("affected") for f in findings)
    assert found_in == [subsets[victim]]
    assert sum(read) == len(packs)


def test_rotation_cursor_persists(tmp_path):
    state = tmp_path / "rotation.json"
    assert daemon_mod.next_subset(state, 4) == 1
    daemon_mod.save_next_subset(state, 4, 1)
    assert daemon_mod.next_subset(state, 4) == 2
    daemon_mod.save_next_subset(state, 4, 4)
    assert daemon_mod.next_subset(state, 4) == 1
    assert daemon_mod.next_subset(state, 5) == 1  # another fraction starts a new cycle
    assert daemon_mod.rotation_size(0.05) == 20 and daemon_mod.rotation_size(0) == 0


def test_once_runs_each_job_and_reports_failure(local_node):
    policy = local_node.dir / "once.toml"
    policy.write_text('[schedule]\nbackup = "every 1h"\nverify = "every 1h"\n[daemon]\nmetrics_port = 0\n')
    proc = local_node.run("daemon", "--policy", str(policy), "--once")
    assert "backup success" in proc.stderr and "verify success" in proc.stderr
    os.rename(local_node.dir / "repo", local_node.dir / "gone")
    (local_node.dir / "repo").write_text("not a repository folder")  # so it cannot be created either
    proc = local_node.run("daemon", "--policy", str(policy), "--once", check=1)
    assert "backup failure" in proc.stderr


def test_a_scheduled_backup_stores_streams_with_their_own_level(tmp_path):
    """The daemon's metering session passes a stream's compression level on: the PostgreSQL
    source asks for [postgres] compression_level, and a session that took three arguments made
    every scheduled PostgreSQL backup fail with a TypeError."""
    from drtool.progress import Progress
    from drtool.repo.native import NativeRepository
    from drtool.repo.objectstore import LocalStore

    store = LocalStore(tmp_path / "repo")
    NativeRepository.init(store)
    metered = daemon_mod._MeteredRepo(NativeRepository(store))
    session = metered.begin_backup()
    data = os.urandom(50_000) * 4
    ref = session.store_stream("postgres.dump", iter([data]), Progress("test"), 7)
    manifest = session.commit({"time": "2026-01-01T00:00:00Z", "sources": {"postgres": ref}})
    assert metered.items == [(ref["stream"], len(data))]
    assert metered.per_source(manifest, 1000) == {"postgres": (len(data), 1000)}
    assert b"".join(NativeRepository(store).read_stream(ref)) == data
