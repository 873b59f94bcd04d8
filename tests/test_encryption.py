"""Client-side encryption (drtool/repo/encryption.py) on a local folder and on S3 (moto_server):
round trips, tampering, swapped objects, truncation, a wrong key; key files; and S3
server-side encryption set by the [repository] sse option."""

from __future__ import annotations

import hashlib
import logging
import os
import random

import pytest

from drtool.errors import ConfigError, IntegrityError, ObjectNotFound, RepositoryError
from drtool.repo.encryption import HEADER, TAG, EncryptedStore, generate_key, load_key

SEG = 64 * 1024  # small segments: many of them in little data


def data(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture
def key() -> bytes:
    return os.urandom(32)


@pytest.fixture
def enc(object_store, key) -> EncryptedStore:
    return EncryptedStore(object_store, key, segment_size=SEG)


@pytest.mark.parametrize("size", [0, 1, SEG - 1, SEG, SEG + 1, 3 * SEG, 3 * SEG + 7])
def test_round_trip(enc, size):
    plain = data(size)
    enc.put("data/ab/obj", plain)
    assert enc.get("data/ab/obj") == plain
    with enc.open_read("data/ab/obj") as f:
        assert f.read() == plain
    assert enc.get_range("data/ab/obj", size // 3, 1000) == plain[size // 3:size // 3 + 1000]
    assert [(i.key, i.size) for i in enc.list("data/")] == [("data/ab/obj", size)]
    assert enc.stat("data/ab/obj").size == size
    raw = enc.inner.get("data/ab/obj")
    assert len(raw) > size  # header and tags
    if size >= 32:
        assert plain[:32] not in raw


def test_stream_round_trip_bounded_and_multipart(enc):
    # 6 MiB in odd-sized chunks: several segments, and more than one S3 part (5 MiB parts).
    plain = data(6 * 1024 * 1024 + 123, seed=2)
    pieces = [plain[i:i + 77_777] for i in range(0, len(plain), 77_777)]
    assert enc.put_stream("snapshots/big", iter(pieces)) == len(plain)
    assert hashlib.sha256(enc.get("snapshots/big")).digest() == hashlib.sha256(plain).digest()
    with enc.open_read("snapshots/big") as f:
        got = b"".join(iter(lambda: f.read(100_000), b""))
    assert got == plain
    assert enc.stat("snapshots/big").size == len(plain)


def test_same_plaintext_differs_on_every_write(enc):
    enc.put("a", b"x" * 1000)
    first = enc.inner.get("a")
    enc.put("a", b"x" * 1000)
    assert enc.inner.get("a") != first  # a fresh random nonce per object
    assert enc.put_if_absent("a", b"other") is False
    assert enc.put_if_absent("b", b"other") is True
    assert enc.get("b") == b"other"


def test_flipped_byte_anywhere_is_detected(enc):
    plain = data(3 * SEG + 10)
    enc.put("data/x", plain)
    raw = enc.inner.get("data/x")
    for pos in (5, HEADER.size - 1, HEADER.size + 3, HEADER.size + SEG + TAG + 100, len(raw) - 1):
        bad = bytearray(raw)
        bad[pos] ^= 0x01
        enc.inner.put("data/x", bytes(bad))
        with pytest.raises(IntegrityError, match=r"cannot decrypt data/x: wrong encryption key or tampered object|"
                                                 r"cannot decrypt data/x: not an encrypted"):
            enc.get("data/x")
        with pytest.raises(IntegrityError, match="cannot decrypt data/x"):
            with enc.open_read("data/x") as f:
                f.read()


def test_swapped_objects_are_detected(enc):
    enc.put("data/a", b"content of a" * 100)
    enc.put("data/b", b"content of b" * 100)
    raw_a, raw_b = enc.inner.get("data/a"), enc.inner.get("data/b")
    enc.inner.put("data/a", raw_b)
    enc.inner.put("data/b", raw_a)
    for key in ("data/a", "data/b"):
        with pytest.raises(IntegrityError, match=f"cannot decrypt {key}: wrong encryption key or tampered object"):
            enc.get(key)


@pytest.mark.parametrize("cut", ["last segment", "last byte", "to the header", "reordered"])
def test_truncated_or_reordered_object_is_detected(enc, cut):
    plain = data(3 * SEG + 500)
    enc.put("data/t", plain)
    raw = enc.inner.get("data/t")
    step = SEG + TAG
    segs = [raw[HEADER.size + i:HEADER.size + i + step] for i in range(0, len(raw) - HEADER.size, step)]
    bad = {"last segment": raw[:HEADER.size + 3 * step],  # ends exactly on a segment boundary
           "last byte": raw[:-1],
           "to the header": raw[:HEADER.size],
           "reordered": raw[:HEADER.size] + segs[1] + segs[0] + b"".join(segs[2:])}[cut]
    enc.inner.put("data/t", bad)
    with pytest.raises(IntegrityError, match="cannot decrypt data/t"):
        enc.get("data/t")
    with pytest.raises(IntegrityError, match="cannot decrypt data/t"):
        with enc.open_read("data/t") as f:
            while f.read(SEG):
                pass


def test_wrong_key_fails_clearly(object_store, key):
    EncryptedStore(object_store, key).put("config.json", b'{"format": "x"}')
    other = EncryptedStore(object_store, os.urandom(32))
    with pytest.raises(IntegrityError) as info:
        other.get("config.json")
    message = str(info.value)
    assert message.startswith("cannot decrypt config.json: wrong encryption key or tampered object")
    assert "\n" not in message and key.hex() not in message
    with pytest.raises(IntegrityError, match="wrong encryption key"):
        other.open_read("config.json")


def test_unencrypted_object_and_missing_object(object_store, key):
    object_store.put("plain", b"not encrypted at all, long enough to have a header")
    enc = EncryptedStore(object_store, key)
    with pytest.raises(IntegrityError, match="cannot decrypt plain: not an encrypted drtool object"):
        enc.get("plain")
    with pytest.raises(ObjectNotFound):
        enc.get("missing")
    with pytest.raises(ObjectNotFound):
        enc.open_read("missing")
    with pytest.raises(RepositoryError):
        enc.get_range("plain", -1, 5)


def test_native_repository_on_an_encrypted_store(object_store, key, tmp_path):
    """A whole backup, verify --read-data and restore through the wrapper: sizes and ids hold."""
    from drtool.progress import Progress
    from drtool.repo.base import TreeSpec
    from drtool.repo.native import NativeRepository

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    files = {"a.bin": data(3 << 20, 3), "sub/b.txt": b"hello" * 1000, "sub/empty": b""}
    for rel, content in files.items():
        (src / rel).write_bytes(content)
    store = EncryptedStore(object_store, key)
    NativeRepository.init(store)
    repo = NativeRepository(store)
    session = repo.begin_backup()
    with Progress("test") as progress:
        ref = session.store_tree(TreeSpec("src", src), None, progress)
    snap = session.commit({"time": "2026-01-01T00:00:00+00:00", "sources": {"blobstores": {"items": {"src": {**ref, "path": "src"}}}}})
    repo = NativeRepository(store)  # a fresh process's view
    with Progress("check") as progress:
        assert repo.check(repo.snapshots(), 1.0, progress) == []
    dest = tmp_path / "dest"
    dest.mkdir()
    with Progress("restore") as progress:
        repo.restore_tree(ref, dest, progress)
    for rel, content in files.items():
        assert (dest / rel).read_bytes() == content
    # Nothing in the underlying store is readable as a pack or JSON.
    for info in object_store.list():
        raw = object_store.get(info.key)
        assert raw[:4] == b"DRE\x01", info.key
        assert b"hello" not in raw and b'"entries"' not in raw
    assert snap.id in [s.id for s in repo.snapshots()]
    with pytest.raises(IntegrityError, match="wrong encryption key"):
        NativeRepository(EncryptedStore(object_store, os.urandom(32)))


# ---- key files ------------------------------------------------------------------------------

def test_load_key_forms(tmp_path):
    raw = os.urandom(32)
    (tmp_path / "raw.key").write_bytes(raw)
    (tmp_path / "hex.key").write_text(raw.hex() + "\n")
    for name in ("raw.key", "hex.key"):
        (tmp_path / name).chmod(0o600)
        assert load_key(tmp_path / name) == raw


@pytest.mark.parametrize("content", [b"", b"short", b"z" * 64, os.urandom(33), b"ab" * 31])
def test_load_key_rejects_bad_files(tmp_path, content):
    path = tmp_path / "bad.key"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_key(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="missing.key: cannot read it"):
        load_key(tmp_path / "missing.key")


def test_world_readable_key_file_warns(tmp_path, caplog):
    path = tmp_path / "open.key"
    path.write_text(os.urandom(32).hex())
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="drtool.repo.encryption"):
        load_key(path)
    assert any("readable by every user" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)
    caplog.clear()
    path.chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="drtool.repo.encryption"):
        load_key(path)
    assert not caplog.records


def test_generate_key(tmp_path):
    path = tmp_path / "new.key"
    key = generate_key(path)
    assert len(key) == 32 and load_key(path) == key
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(ConfigError, match="exists"):
        generate_key(path)
    assert load_key(path) == key


# ---- S3 server-side encryption --------------------------------------------------------------

@pytest.mark.parametrize("sse", ["AES256", "aws:kms"])
def test_backup_with_sse_stores_encrypted_objects(tmp_path, s3_bucket, sse):
    """[repository] sse: every object of a backup carries the ServerSideEncryption attribute."""
    import subprocess
    import sys
    from pathlib import Path

    import boto3

    from drtool.teranode import sample
    from tests.support.node import write_node_config

    endpoint, bucket = s3_bucket
    data_dir = tmp_path / "node"
    sample.build_sample_node(data_dir, seed=3, tx_files=50, subtrees=2, blocks=3,
                             subtree_size_range=(10 * 1024, 50 * 1024))
    repo_extra = {"sse": sse}
    if sse == "aws:kms":
        kms = boto3.client("kms", endpoint_url=endpoint, region_name="us-east-1")
        repo_extra["sse_kms_key_id"] = kms.create_key()["KeyMetadata"]["KeyId"]
    cfg = write_node_config(tmp_path / "drtool.toml", data_dir, f"s3://{bucket}/node", endpoint_url=endpoint,
                            extra={"repository": repo_extra})
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-m", "drtool.cli", "--config", str(cfg), "backup"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="node/")["Contents"]]
    assert any(k.startswith("node/data/") for k in keys) and any(k.startswith("node/snapshots/") for k in keys)
    for k in keys:
        if k.startswith("node/locks/"):
            continue
        head = client.head_object(Bucket=bucket, Key=k)
        assert head.get("ServerSideEncryption") == sse, k
        if sse == "aws:kms":
            assert repo_extra["sse_kms_key_id"] in head.get("SSEKMSKeyId", ""), k
