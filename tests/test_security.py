"""Secrets never leave drtool: a full run (backup, snapshots, verify, restore, prune, and a few
failures) with a PostgreSQL password in the DSN and PGPASSWORD, AWS keys, an Aerospike and a
restic password in the environment; every output, log line, manifest, repository object, state
file and child-process command line is searched for them. Also: warnings for world-readable
files holding secrets, and locks and manifests that say which host and process wrote them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import zstandard

from drtool.repo import pack
from drtool.sources import postgres
from drtool.teranode import sample
from tests.support.node import Node, write_node_config

ROOT = Path(__file__).resolve().parents[1]

SECRETS_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIADRTOOLLEAKCHECK7",
    "AWS_SECRET_ACCESS_KEY": "drtool-leak-check-aws-secret-Zq81",
    "DRTOOL_AEROSPIKE_PASSWORD": "drtool-leak-check-aerospike-Pw55",
    "RESTIC_PASSWORD": "drtool-leak-check-restic-Pw99",
}


class Recorder:
    """Runs drtool as a child process and keeps every byte it printed, plus the command lines
    of every process it started (caught from /proc while it runs)."""

    def __init__(self, node: Node):
        self.node = node
        self.outputs: list[str] = []
        self.cmdlines: list[str] = []

    def run(self, *args: str, check: int | None = 0) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "drtool.cli", "-v", "--config", str(self.node.config), *args]
        proc = subprocess.Popen(argv, env=self.node.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stop = threading.Event()
        watcher = threading.Thread(target=self._watch, args=(proc.pid, stop), daemon=True)
        watcher.start()
        out, err = proc.communicate(timeout=300)
        stop.set()
        watcher.join()
        self.outputs += [out, err]
        if check is not None:
            assert proc.returncode == check, f"drtool {' '.join(args)} exited {proc.returncode}\n{out}\n{err}"
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def _watch(self, root: int, stop: threading.Event) -> None:
        seen: set[tuple[int, str]] = set()
        own = ""
        while not stop.is_set():
            if not own:  # empty until the child has exec'd
                try:
                    own = Path(f"/proc/{root}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    pass
                if not own:
                    stop.wait(0.002)
                    continue
            # drtool's own command line holds what the test passed (a --pg-dsn with a password
            # in the failure cases): only the processes drtool starts are checked.
            for pid in _descendants(root):
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                if cmd != own and (pid, cmd) not in seen:  # forked workers share drtool's argv
                    seen.add((pid, cmd))
                    self.cmdlines.append(cmd)
            stop.wait(0.01)


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    out, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def repository_texts(endpoint: str, bucket: str) -> dict[str, bytes]:
    """Every object of the bucket, decompressed where it is zstd (packs and index objects)."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=SECRETS_ENV["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=SECRETS_ENV["AWS_SECRET_ACCESS_KEY"])
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", ()):
            raw = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            out[obj["Key"]] = raw
            if "/data/" in obj["Key"]:
                out[obj["Key"] + " (decompressed)"] = pack.decode_body(raw, obj["Key"])
            elif "/index/" in obj["Key"]:
                out[obj["Key"] + " (decompressed)"] = zstandard.ZstdDecompressor().decompressobj().decompress(raw)
    return out


def test_no_secret_anywhere_in_a_full_run(tmp_path, pg_server, s3_bucket):
    endpoint, bucket = s3_bucket
    password = pg_server.password
    secrets = {"PostgreSQL password": password, **{k: v for k, v in SECRETS_ENV.items()}}
    data = sample.build_sample_node(tmp_path / "node", seed=4, tx_files=60, subtrees=2, blocks=4,
                                    subtree_size_range=(8 * 1024, 64 * 1024))
    dsn = pg_server.create_database("sec_src")  # URL form, password included
    postgres.load_sample_chain(dsn, data.chain)
    policy = tmp_path / "policy.toml"
    policy.write_text("[retention]\nkeep_last = 1\n")
    cfg = write_node_config(tmp_path / "drtool.toml", tmp_path / "node", f"s3://{bucket}/sec", endpoint_url=endpoint,
                            extra={"postgres": {"dsn": dsn}, "policy": {"file": str(policy)}})
    cfg.chmod(0o600)
    env = dict(os.environ, PYTHONPATH=str(ROOT), PGPASSWORD=password, **SECRETS_ENV)
    node = Node(tmp_path, tmp_path / "node", cfg, f"s3://{bucket}/sec", env)
    rec = Recorder(node)

    rec.run("backup")
    rec.run("--json", "backup")
    rec.run("snapshots")
    rec.run("--json", "snapshots")
    rec.run("verify", "--read-data")
    rec.run("--json", "verify", "--read-data")
    target_dsn = pg_server.dsn_kv("sec_target")  # the password comes from PGPASSWORD
    rec.run("--json", "restore", "latest", "--target-dir", str(tmp_path / "restored"), "--pg-dsn", target_dsn)
    rec.run("--json", "prune")
    # Failures: their messages are where a DSN or a key is most likely to slip out.
    bad_dsn = pg_server.dsn("no_such_db")
    rec.run("--json", "restore", "latest", "--only", "postgres", "--pg-dsn", bad_dsn.replace(str(pg_server.port), "1"),
            check=None)
    wrong_pw = f"postgresql://{pg_server.user}:{password}@{pg_server.host}:1/x"
    rec.run("restore", "latest", "--only", "postgres", "--pg-dsn", wrong_pw, check=None)
    broken = tmp_path / "broken.toml"
    broken.write_text(cfg.read_text().replace(endpoint, "http://127.0.0.1:1"))
    broken.chmod(0o600)
    proc = subprocess.run([sys.executable, "-m", "drtool.cli", "-v", "--json", "--config", str(broken), "snapshots"],
                          env=env, capture_output=True, text=True, timeout=120)
    rec.outputs += [proc.stdout, proc.stderr]
    assert proc.returncode != 0

    assert any("pg_dump" in c for c in rec.cmdlines), "never caught pg_dump running"
    assert any("pg_restore" in c for c in rec.cmdlines), "never caught pg_restore running"
    places: dict[str, bytes] = {f"output {i}": text.encode() for i, text in enumerate(rec.outputs)}
    places.update({f"cmdline {c[:60]}": c.encode() for c in rec.cmdlines})
    places.update(repository_texts(endpoint, bucket))
    for path in (tmp_path / "state").rglob("*"):
        if path.is_file():
            places[f"state {path.name}"] = path.read_bytes()
    assert any(k.startswith("sec/snapshots/") for k in places)
    leaks = [(where, name) for where, blob in places.items() for name, value in secrets.items()
             if value.encode() in blob]
    assert not leaks, f"secrets found: {leaks}"
    joined = "\n".join(rec.outputs)
    assert "****" in joined or "no_such_db" in joined  # the failing DSNs were shown, masked


def test_manifest_and_lock_record_host_and_process(local_node):
    from drtool.repo.locks import RepositoryLock, list_locks
    from drtool.repo.objectstore import LocalStore

    node = local_node
    node.run("backup")
    store = LocalStore(node.repo_url[len("file://"):])
    info = next(iter(store.list("snapshots/")))
    doc = json.loads(store.get(info.key))
    assert doc["hostname"] == socket.gethostname()
    assert isinstance(doc.get("pid"), int) and doc["pid"] > 0 and doc["pid"] != os.getpid()
    lock = RepositoryLock(store, "test", exclusive=False).acquire()
    try:
        (held,) = list_locks(store)
        assert (held.host, held.pid, held.command) == (socket.gethostname(), os.getpid(), "test")
        assert f"pid {os.getpid()} on {socket.gethostname()}" in held.describe()
    finally:
        lock.release()
    assert list_locks(store) == []


def test_world_readable_files_entry_warns(local_node):
    node = local_node
    key = node.data_dir / "p2p.key"
    key.chmod(0o644)
    proc = node.run("backup")
    assert "p2p.key" in proc.stderr and "world-readable" in proc.stderr, proc.stderr
    key.chmod(0o600)
    assert "world-readable" not in node.run("backup").stderr


def test_world_readable_config_with_a_secret_warns(tmp_path, local_node):
    node = local_node
    text = node.config.read_text() + '\n[postgres]\ndsn = "postgresql://u:cfg-secret-pw-1@127.0.0.1:1/db"\n'
    node.config.write_text(text)
    node.config.chmod(0o644)
    proc = node.run("snapshots", check=None)  # no repository yet: only the warning matters
    assert "cfg-secret-pw-1" not in proc.stderr + proc.stdout
    assert str(node.config) in proc.stderr and "readable" in proc.stderr, proc.stderr
