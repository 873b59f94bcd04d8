"""The restic engine (drtool/repo/restic.py) against the real restic binary, on a local
restic repository and on S3 served by a real moto_server process."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from drtool.config import RepositoryConfig
from drtool.errors import ConfigError, LockError, RepositoryError
from drtool.progress import Progress
from drtool.repo.restic import ResticRepository, compression_mode, find_restic
from drtool.teranode import sample
from tests.support.node import Node, write_node_config
from tests.test_backup_restore import data_digest

PASSWORD = "drtool-restic-test-pw-7f3a"

pytestmark = pytest.mark.skipif(shutil.which("restic") is None, reason="restic is not installed (apt install restic)")


# ---- a fast restic repository -----------------------------------------------------------------
# restic derives its key with scrypt calibrated to ~0.5 s, once per command; drtool runs a dozen
# restic commands per backup. Like restic's own tests (TestUseLowSecurityKDFParameters), the
# template repository made by `restic init` gets its one key re-wrapped with cheap scrypt
# parameters: the same master key, restic's key-file format (AES-256-CTR + Poly1305-AES).
def _user_key(salt: bytes, n: int, r: int, p: int) -> tuple[bytes, bytes, bytes]:
    derived = hashlib.scrypt(PASSWORD.encode(), salt=salt, n=n, r=r, p=p, maxmem=1 << 30, dklen=64)
    return derived[:32], derived[32:48], derived[48:]  # AES key, MAC k, MAC r


def _poly1305_aes(mac_k: bytes, mac_r: bytes, nonce: bytes, ciphertext: bytes) -> bytes:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.poly1305 import Poly1305

    enc = Cipher(algorithms.AES(mac_k), modes.ECB()).encryptor()
    return Poly1305.generate_tag(mac_r + enc.update(nonce) + enc.finalize(), ciphertext)


def _aes_ctr(key: bytes, nonce: bytes, data: bytes) -> bytes:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    ctx = Cipher(algorithms.AES(key), modes.CTR(nonce)).encryptor()
    return ctx.update(data) + ctx.finalize()


def cheapen_key(repo: Path, n: int = 1024, r: int = 8, p: int = 1) -> None:
    (old,) = list((repo / "keys").iterdir())
    doc = json.loads(old.read_text())
    enc, mac_k, mac_r = _user_key(base64.b64decode(doc["salt"]), doc["N"], doc["r"], doc["p"])
    data = base64.b64decode(doc["data"])
    nonce, sealed, tag = data[:16], data[16:-16], data[-16:]
    assert _poly1305_aes(mac_k, mac_r, nonce, sealed) == tag, "template key: MAC mismatch"
    master = _aes_ctr(enc, nonce, sealed)
    salt, nonce = os.urandom(64), os.urandom(16)
    enc, mac_k, mac_r = _user_key(salt, n, r, p)
    sealed = _aes_ctr(enc, nonce, master)
    doc.update(N=n, r=r, p=p, salt=base64.b64encode(salt).decode(),
               data=base64.b64encode(nonce + sealed + _poly1305_aes(mac_k, mac_r, nonce, sealed)).decode())
    raw = json.dumps(doc).encode()
    (repo / "keys" / hashlib.sha256(raw).hexdigest()).write_bytes(raw)
    old.unlink()


@pytest.fixture(scope="session")
def restic_template(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("restic-template") / "repo"
    env = {**os.environ, "RESTIC_PASSWORD": PASSWORD}
    subprocess.run(["restic", "init", "--repo", str(repo), "--repository-version", "2"], env=env,
                   check=True, capture_output=True)
    cheapen_key(repo)
    return repo


def _upload(template: Path, endpoint: str, bucket: str, prefix: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for path in template.rglob("*"):
        if path.is_file():
            client.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(template)}", Body=path.read_bytes())
    client.close()


def make_restic_node(tmp_path: Path, request, where: str, *, extra: dict | None = None, fresh: bool = False) -> Node:
    """A small sample node whose drtool.toml points at a restic repository (local or S3):
    a copy of the fast template, or none at all (`fresh`: `drtool backup` creates it)."""
    data_dir = tmp_path / "node"
    sample.build_sample_node(data_dir, seed=7, tx_files=300, subtrees=4, blocks=5,
                             subtree_size_range=(100 * 1024, 3 * 1024 * 1024))
    if where == "s3":
        endpoint, bucket = request.getfixturevalue("s3_bucket")  # also sets the AWS_* test credentials
        repo_url = f"restic:s3:{endpoint}/{bucket}/node-1"
        if not fresh:
            _upload(request.getfixturevalue("restic_template"), endpoint, bucket, "node-1")
    else:
        repo_url = f"restic:{tmp_path / 'restic-repo'}"
        if not fresh:
            shutil.copytree(request.getfixturevalue("restic_template"), tmp_path / "restic-repo")
    env = dict(os.environ)
    env.pop("RESTIC_PASSWORD_FILE", None)
    env.pop("RESTIC_REPOSITORY", None)
    env.update(RESTIC_PASSWORD=PASSWORD, XDG_CACHE_HOME=str(tmp_path / "cache"),
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    cfg = write_node_config(tmp_path / "drtool.toml", data_dir, repo_url, extra=extra)
    return Node(tmp_path, data_dir, cfg, repo_url, env)


@pytest.fixture
def restic_node(tmp_path, request) -> Node:
    return make_restic_node(tmp_path, request, "local", extra={"repository": {"lock_wait": "1s"}})


@pytest.fixture
def restic_repo(restic_node, monkeypatch) -> ResticRepository:
    """The engine in this process, on restic_node's (new) repository."""
    for name in ("RESTIC_PASSWORD", "XDG_CACHE_HOME"):
        monkeypatch.setenv(name, restic_node.env[name])
    cfg = RepositoryConfig(url=restic_node.repo_url, endpoint_url="", region="", compression_level=3,
                           sse="", sse_kms_key_id="", restic_path="restic")
    return ResticRepository(cfg)


def restic(node: Node, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["restic", "--repo", node.repo_url[len("restic:"):], *args],
                          capture_output=True, text=True, env=node.env)
    if check and proc.returncode != 0:
        raise AssertionError(f"restic {' '.join(args)}: exit {proc.returncode}: {proc.stderr}")
    return proc


@contextlib.contextmanager
def exclusive_restic_lock(node: Node) -> Iterator[int]:
    """restic itself holding an exclusive lock: `restic key passwd` takes it, then blocks
    reading the new password from a FIFO nobody writes. Interrupted, restic removes it."""
    fifo = node.dir / "new-password.fifo"
    os.mkfifo(fifo)
    proc = subprocess.Popen(["restic", "--repo", node.repo_url[len("restic:"):], "key", "passwd",
                             "--new-password-file", str(fifo)], env=node.env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not restic(node, "list", "locks", "--no-lock").stdout.strip():
            assert proc.poll() is None and time.monotonic() < deadline, "restic key passwd did not take its lock"
            time.sleep(0.2)
        yield proc.pid
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    assert not restic(node, "list", "locks", "--no-lock").stdout.strip()


# ---- through the CLI ------------------------------------------------------------------------
def test_round_trip_and_incremental(restic_node):
    node = restic_node
    first = node.run("backup", "--tag", "first", json_out=True).doc
    before = data_digest(node.data_dir)
    assert first["stats"]["files_new"] == len(before)
    external = first["snapshot"]["sources"]["blobstores"]["items"]["external"]
    assert len(external["restic_snapshot"]) == 64
    assert external["files"] == len([p for p in before if p.startswith("external/")])
    assert PASSWORD not in node.config.read_text()

    # restic's own view: one snapshot per store and per file, plus the manifest, all tagged
    listed = restic(node, "snapshots", "--json", "--no-lock").stdout
    assert listed.count('"drtool-manifest"') == 1 and listed.count('"drtool-store:') == 3

    # Incremental: restic reads only the new files (files_new from its summary, bytes from -v).
    added = sample.add_files(node.data_dir, seed=99, count=6)
    after = data_digest(node.data_dir)
    new_files = {p for p, h in after.items() if before.get(p) != h}
    assert len(new_files) >= len(added)
    second = node.run("backup", json_out=True).doc
    assert second["snapshot"]["parent"] == first["snapshot"]["id"]
    assert second["stats"]["files_new"] == len(new_files)
    key_size = (node.data_dir / "p2p.key").stat().st_size  # single files are always read
    assert second["stats"]["bytes_read"] == sum((node.data_dir / p).stat().st_size for p in new_files) + key_size

    snaps = node.run("snapshots", json_out=True).doc["snapshots"]
    assert [s["id"] for s in snaps] == [first["snapshot"]["id"], second["snapshot"]["id"]]
    assert snaps[0]["tags"] == ["first"]
    node.run("restore", first["snapshot"]["id"][:10], "--target-dir", str(node.dir / "r1"))
    node.run("restore", "latest", "--target-dir", str(node.dir / "r2"))
    assert data_digest(node.dir / "r1") == before
    assert data_digest(node.dir / "r2") == after
    assert (node.dir / "r1" / "p2p.key").read_bytes() == (node.data_dir / "p2p.key").read_bytes()

    verified = node.run("verify", "--read-data=50%", json_out=True)
    assert verified.doc["ok"] and PASSWORD not in verified.stdout + verified.stderr


def test_damaged_and_missing_packs_are_found_by_verify(restic_node):
    node = restic_node
    node.run("backup")
    packs = sorted((p for p in (node.dir / "restic-repo" / "data").rglob("*") if p.is_file()),
                   key=lambda p: p.stat().st_size)
    flipped, victim = packs[-2], packs[-1]
    with open(flipped, "r+b") as f:  # same size: only reading the data finds it
        f.seek(flipped.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert node.run("verify", json_out=True).doc["ok"]
    proc = node.run("verify", "--read-data", json_out=True, check=1)
    assert any(flipped.name[:16] in f["subject"] for f in proc.doc["findings"]), proc.doc["findings"]

    victim.unlink()
    proc = node.run("verify", json_out=True, check=1)
    problems = [f for f in proc.doc["findings"] if f["severity"] == "error"]
    assert any(victim.name[:16] in f["subject"] and "does not exist" in f["problem"] for f in problems), problems


def test_wrong_password_missing_repository_and_missing_restic(restic_node, tmp_path):
    node = restic_node
    node.run("backup")
    node.env["RESTIC_PASSWORD"] = "not-the-password"
    proc = node.run("snapshots", check=2)
    assert "wrong password" in proc.stderr and "not-the-password" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1

    node.env["RESTIC_PASSWORD"] = PASSWORD
    elsewhere = tmp_path / "other.toml"
    write_node_config(elsewhere, node.data_dir, f"restic:{tmp_path / 'nothing-here'}")
    proc = subprocess.run([sys.executable, "-m", "drtool.cli", "--config", str(elsewhere), "snapshots"],
                          capture_output=True, text=True, env=node.env)
    assert proc.returncode == 1 and "no restic repository there" in proc.stderr, proc.stderr
    assert not (tmp_path / "nothing-here").exists()  # only `backup` creates one

    no_restic = tmp_path / "no-restic.toml"
    write_node_config(no_restic, node.data_dir, node.repo_url, extra={"repository": {"restic_path": "/nonexistent/restic"}})
    proc = subprocess.run([sys.executable, "-m", "drtool.cli", "--config", str(no_restic), "snapshots"],
                          capture_output=True, text=True, env=node.env)
    assert proc.returncode == 2 and "restic_path" in proc.stderr and "not found" in proc.stderr, proc.stderr

    del node.env["RESTIC_PASSWORD"]
    proc = node.run("snapshots", check=2)
    assert "RESTIC_PASSWORD" in proc.stderr


def test_locked_repository_names_the_lock_owner(restic_node):
    node = restic_node
    node.run("backup")
    with exclusive_restic_lock(node) as pid:
        # drtool waits lock_wait (1s) for restic's exclusive lock, then gives up naming it
        proc = node.run("backup", check=3)
        assert f"PID {pid}" in proc.stderr and "exclusive" in proc.stderr, proc.stderr
        # restic's own refusal (check wants an exclusive lock) says the same
        proc = node.run("verify", check=3)
        assert f"PID {pid}" in proc.stderr and "locked" in proc.stderr, proc.stderr
    assert len(node.run("snapshots", json_out=True).doc["snapshots"]) == 1
    node.run("backup")


def test_restic_on_s3(tmp_path, request):
    node = make_restic_node(tmp_path, request, "s3")
    snap = node.run("backup", json_out=True).doc["snapshot"]
    target = node.dir / "restored"
    assert node.run("restore", "latest", "--target-dir", str(target), json_out=True).doc["ok"]
    assert data_digest(target) == data_digest(node.data_dir)
    assert node.run("verify", snap["id"][:8], "--read-data", json_out=True).doc["ok"]
    proc = node.run("snapshots", json_out=True)
    assert [s["id"] for s in proc.doc["snapshots"]] == [snap["id"]]
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in proc.stdout + proc.stderr


# ---- the engine in-process ------------------------------------------------------------------
def test_aborted_backup_leaves_no_snapshot_and_prune_forgets_its_orphans(restic_repo):
    repo = restic_repo
    session = repo.begin_backup()
    ref = session.store_stream("config/x.conf", iter([b"a" * 1000, b"b" * 1000]), Progress("t"))
    assert ref["size"] == 2000 and ref["sha256"] == hashlib.sha256(b"a" * 1000 + b"b" * 1000).hexdigest()
    session.abort()
    assert repo.snapshots() == []
    orphans = repo.orphans()
    assert [o["session"] for o in orphans] == [session.session]
    assert repo.collect_garbage(Progress("t"))["orphans_forgotten"] == 0  # younger than the grace period
    result = repo.collect_garbage(Progress("t"), orphan_grace=0)
    assert result["orphans_forgotten"] == 1 and result["objects_deleted"] >= 1
    assert repo.orphans() == [] and repo.restic_snapshots() == []


def test_failing_stream_saves_nothing(restic_repo):
    repo = restic_repo
    session = repo.begin_backup()

    def dump():
        yield b"x" * (1 << 20)
        raise OSError("pg_dump died")

    with pytest.raises(OSError, match="pg_dump died"):
        session.store_stream("postgres.dump", dump(), Progress("t"))
    assert repo.restic_snapshots() == []  # restic was interrupted: no truncated stream stored
    assert repo.restic_locks() == []


def test_stream_round_trip_damage_forget_and_prune(restic_repo):
    repo = restic_repo
    data = os.urandom(3 << 20)
    session = repo.begin_backup()
    ref = session.store_stream("/etc/teranode/settings_local.conf", [data[i:i + 65536] for i in range(0, len(data), 65536)],
                               Progress("t"))
    first = session.commit({"time": "2025-01-01T00:00:00+00:00", "node": "n", "sources": {"files": {"items": {"s": ref}}}})
    assert b"".join(repo.read_stream(first.sources["files"]["items"]["s"])) == data
    tampered = {**first.sources["files"]["items"]["s"], "size": len(data) + 1}
    with pytest.raises(RepositoryError, match="does not match"):
        b"".join(repo.read_stream(tampered))

    session = repo.begin_backup()
    other = session.store_stream("y", iter([b"later"]), Progress("t"))
    second = session.commit({"time": "2025-01-02T00:00:00+00:00", "node": "n", "sources": {"files": {"items": {"y": other}}}})
    assert [m.id for m in repo.snapshots()] == [first.id, second.id]
    fresh = ResticRepository(RepositoryConfig(url=repo.url, endpoint_url="", region="", compression_level=12, sse="",
                                              sse_kms_key_id="", restic_path="restic"))
    assert [m.doc for m in fresh.snapshots()] == [first.doc, second.doc]  # read back, hash-checked

    repo.forget([first])
    assert [m.id for m in repo.snapshots()] == [second.id]
    assert len(repo.restic_snapshots()) == 2  # the second's stream and manifest
    garbage = repo.collect_garbage(Progress("t"))
    assert garbage["objects_deleted"] >= 1 and garbage["bytes_freed"] > len(data) // 2
    assert b"".join(repo.read_stream(second.sources["files"]["items"]["y"])) == b"later"
    assert repo.check(repo.snapshots(), 1.0, Progress("t")) == []


def test_wrong_password_and_lock_errors_in_process(restic_repo, restic_node, monkeypatch):
    cfg = RepositoryConfig(url=restic_repo.url, endpoint_url="", region="", compression_level=3, sse="",
                           sse_kms_key_id="", restic_path="restic")
    with exclusive_restic_lock(restic_node) as pid:
        with pytest.raises(LockError, match=f"PID {pid}"):
            restic_repo.begin_backup(wait=0.5)
        with pytest.raises(LockError, match=f"PID {pid}"):
            restic_repo.lock("prune", exclusive=True, wait=0)
    monkeypatch.setenv("RESTIC_PASSWORD", "wrong-one-123")
    with pytest.raises(ConfigError, match="wrong password"):
        ResticRepository(cfg)


def test_version_and_compression_mapping(tmp_path):
    assert find_restic("restic") == shutil.which("restic")
    old = tmp_path / "restic"
    old.write_text("#!/bin/sh\necho 'restic 0.12.1 compiled with go1.15 on linux/amd64'\n")
    old.chmod(0o755)
    with pytest.raises(ConfigError, match="0.12.1.*0.14 or newer"):
        find_restic(str(old))
    assert [compression_mode(level) for level in (-7, -1, 1, 3, 9, 10, 19)] == ["auto"] * 5 + ["max"] * 2


def test_create_initialises_format_2_locally_and_on_s3(tmp_path, s3_bucket, monkeypatch):
    monkeypatch.setenv("RESTIC_PASSWORD", PASSWORD)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    endpoint, bucket = s3_bucket
    for url in (f"restic:{tmp_path / 'new-repo'}", f"restic:s3:{endpoint}/{bucket}/fresh"):
        cfg = RepositoryConfig(url=url, endpoint_url="", region="", compression_level=3, sse="",
                               sse_kms_key_id="", restic_path="restic")
        with pytest.raises(RepositoryError, match="no restic repository there"):
            ResticRepository(cfg)
        assert ResticRepository(cfg, create=True).config["version"] == 2
        assert ResticRepository(cfg, create=True).snapshots() == []  # opened, not created twice
