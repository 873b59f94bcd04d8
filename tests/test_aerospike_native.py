"""The native engine without a server: connection errors, TTL/expiry, record conversion,
and the digest-set logic that keeps deleted UTXO records deleted across incrementals."""

from __future__ import annotations

import hashlib
import io
import socket
import time

import pytest

from drtool.errors import ConfigError, SourceError
from drtool.sources.aerospike import (
    NativeEngine, digest_order, expiry_from_ttl, parse_hosts, read_digest_set, reconcile_digests,
    record_from_client, ttl_from_expiry, write_digest_set,
)
from drtool.sources.asb import CITRUSLEAF_EPOCH, unpack


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_cluster_is_a_clear_error_in_bounded_time():
    port = closed_port()
    engine = NativeEngine([f"127.0.0.1:{port}"], "utxo-store", password="pw-never-shown",
                          user="admin", connect_timeout=2)
    t0 = time.monotonic()
    with pytest.raises(SourceError, match=rf"cannot connect to 127.0.0.1:{port}") as info:
        engine.check_namespace()
    assert time.monotonic() - t0 < 30
    assert "pw-never-shown" not in str(info.value) and "\n" not in str(info.value)


def test_parse_hosts():
    assert parse_hosts("a:1,b") == [("a", 1), ("b", 3000)]
    with pytest.raises(ConfigError):
        parse_hosts(["a:x"])
    with pytest.raises(ConfigError):
        parse_hosts([])


def test_expiry_and_ttl():
    now = CITRUSLEAF_EPOCH + 1000
    assert expiry_from_ttl(0xFFFFFFFF, now) == 0 and expiry_from_ttl(-1, now) == 0
    assert expiry_from_ttl(50, now) == 1050
    assert ttl_from_expiry(1050, now) == 50
    assert ttl_from_expiry(0, now) == -1
    assert ttl_from_expiry(900, now) is None  # already expired: not restored


def test_record_from_client_is_deterministic():
    digest = bytearray(hashlib.sha1(b"x").digest())
    txid = bytearray(hashlib.sha256(b"tx").digest())
    rec = record_from_client(("utxo-store", "utxo", txid, digest), {"gen": 3, "ttl": 0xFFFFFFFF},
                             {"utxos": [bytes(32)], "txID": txid, "fee": 5, "flag": True}, 0)
    assert [n for n, _, _ in rec.bins] == ["fee", "flag", "txID", "utxos"]
    assert rec.key_type == "B" and rec.key == bytes(txid) and rec.generation == 3 and rec.expiry == 0
    assert unpack(rec.bins[3][2]) == [bytes(32)]
    nokey = record_from_client(("utxo-store", "utxo", None, digest), {"gen": 1, "ttl": 10}, {}, 0)
    assert nokey.key_type is None and nokey.bins == []


def digests(n: int, salt: bytes = b"") -> list[bytes]:
    return [hashlib.sha1(salt + i.to_bytes(4, "big")).digest() for i in range(n)]


@pytest.mark.parametrize("prefix", [12, 20])
def test_reconcile_deletes_what_was_deleted_between_full_and_incremental(prefix):
    full = digests(5000)
    deleted = set(full[::7])  # pruned between the full and the incremental
    added = digests(300, b"new")
    live_at_incremental = [d for d in full if d not in deleted] + added
    stored = io.BytesIO()
    assert write_digest_set(live_at_incremental, stored, prefix=prefix, presorted=False) == \
        len(live_at_incremental) == 5000 - len(deleted) + 300
    # restoring full + incremental brings back everything either ever held
    restored_cluster = sorted(set(full) | set(added), key=digest_order)
    stored.seek(0)
    stats: dict = {}
    to_delete = list(reconcile_digests(restored_cluster, read_digest_set(stored), stats))
    assert set(to_delete) == deleted
    assert stats == {"live": 5300, "recorded": len(live_at_incremental), "missing": 0,
                     "extra": len(deleted)}


def test_reconcile_reports_missing_records():
    recorded = sorted(digests(100), key=digest_order)
    stored = io.BytesIO()
    write_digest_set(recorded, stored)
    stored.seek(0)
    stats: dict = {}
    assert list(reconcile_digests(recorded[10:], read_digest_set(stored), stats)) == []
    assert stats["missing"] == 10


def test_digest_set_is_compact_and_checked():
    stored = io.BytesIO()
    write_digest_set(digests(10000), stored, presorted=False)
    assert len(stored.getvalue()) < 10000 * 13
    with pytest.raises(ValueError, match="order"):
        write_digest_set(list(reversed(sorted(digests(10), key=digest_order))), io.BytesIO())
    with pytest.raises(SourceError, match="bad header"):
        list(read_digest_set(io.BytesIO(b"\x28\xb5\x2f\xfd" + b"junk")))
