"""The object-store behaviour suite, run on a local folder and on a real S3 endpoint (moto_server)."""

from __future__ import annotations

import hashlib
import http.client
import http.server
import logging
import multiprocessing
import os
import random
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest

from drtool.errors import ConfigError, ObjectNotFound, RepositoryError
from drtool.repo.objectstore import LocalStore, ObjectStore, S3Store, open_store
from tests.support.s3 import TEST_AWS_ENV, TEST_PART_SIZE, free_port

MiB = 1024 * 1024


def chunks_of(seed: int, total: int, chunk: int = 1 * MiB):
    """Deterministic pseudo-random data, produced a chunk at a time."""
    rng = random.Random(seed)
    left = total
    while left > 0:
        n = min(chunk, left)
        yield rng.randbytes(n)
        left -= n


def sha256_of(chunks) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def leftovers(store: ObjectStore) -> list:
    """What an interrupted write may leave behind: temp files or open multipart uploads."""
    if isinstance(store, LocalStore):
        return store.stale_temp_files(-3600)
    return store.list_multipart_uploads()


# -- put / get ------------------------------------------------------------------------------


def test_put_get_and_overwrite(object_store):
    object_store.put("data/ab/abc", b"first")
    assert object_store.get("data/ab/abc") == b"first"
    object_store.put("data/ab/abc", b"second, longer")
    assert object_store.get("data/ab/abc") == b"second, longer"
    info = object_store.stat("data/ab/abc")
    assert info.key == "data/ab/abc" and info.size == len(b"second, longer")
    assert abs(info.mtime - time.time()) < 120
    object_store.put("empty", b"")
    assert object_store.get("empty") == b""
    assert leftovers(object_store) == []


def test_put_takes_a_view_of_pooled_memory(object_store):
    """Packs are sealed into pooled buffers and handed over as memoryviews."""
    memory = bytearray(b"xx" + bytes(range(256)) * 10 + b"yy")
    with memoryview(memory) as view:
        object_store.put("data/cd/view", view[2:-2])
    assert object_store.get("data/cd/view") == bytes(range(256)) * 10
    assert bytes(object_store.get_view("data/cd/view")) == bytes(range(256)) * 10


def test_put_if_absent(object_store):
    assert object_store.put_if_absent("locks/backup", b"owner-1") is True
    assert object_store.put_if_absent("locks/backup", b"owner-2") is False
    assert object_store.get("locks/backup") == b"owner-1"
    assert leftovers(object_store) == []


def test_concurrent_put_if_absent_has_one_winner(object_store):
    writers = 8
    for round_ in range(5):
        barrier = threading.Barrier(writers)

        def attempt(i: int) -> bool:
            barrier.wait()
            return object_store.put_if_absent(f"manifest/{round_}", b"writer %d" % i)

        with ThreadPoolExecutor(writers) as pool:
            results = list(pool.map(attempt, range(writers)))
        assert results.count(True) == 1, results
        assert object_store.get(f"manifest/{round_}") == b"writer %d" % results.index(True)


def _local_put_if_absent(root: str, key: str, i: int, start: float) -> bool:
    while time.time() < start:
        pass
    return LocalStore(root).put_if_absent(key, b"process %d" % i)


def test_local_put_if_absent_across_processes(tmp_path):
    ctx = multiprocessing.get_context("fork")
    start = time.time() + 0.5
    with ctx.Pool(4) as pool:
        results = pool.starmap(_local_put_if_absent, [(str(tmp_path), "lock", i, start) for i in range(4)])
    assert results.count(True) == 1
    assert LocalStore(tmp_path).get("lock") == b"process %d" % results.index(True)


def test_get_range(object_store):
    object_store.put("obj", bytes(range(100)))
    assert object_store.get_range("obj", 0, 10) == bytes(range(10))
    assert object_store.get_range("obj", 95, 10) == bytes(range(95, 100))  # fewer at the end
    assert object_store.get_range("obj", 100, 10) == b""  # at the end
    assert object_store.get_range("obj", 500, 10) == b""  # past the end
    assert object_store.get_range("obj", 7, 0) == b""
    with pytest.raises(RepositoryError, match="invalid range"):
        object_store.get_range("obj", -1, 5)


def test_open_read_is_a_file_object(object_store):
    data = bytes(range(256)) * 1000
    object_store.put("stream", data)
    with object_store.open_read("stream") as f:
        assert f.read(10) == data[:10]
        buf = bytearray(100)
        assert f.readinto(buf) == 100 and bytes(buf) == data[10:110]
        assert f.read() == data[110:]
        assert f.read() == b""


def test_list_order_and_prefix(object_store):
    keys = ["b", "a/b/c", "a-c", "a0", "a/a", "data/ab/2", "data/ab/1", "data/ac", "datb"]
    for i, key in enumerate(keys):
        object_store.put(key, b"x" * i)
    listed = list(object_store.list())
    assert [o.key for o in listed] == sorted(keys)
    assert {o.key: o.size for o in listed} == {k: i for i, k in enumerate(keys)}
    assert [o.key for o in object_store.list("a/")] == ["a/a", "a/b/c"]
    assert [o.key for o in object_store.list("a")] == ["a-c", "a/a", "a/b/c", "a0"]
    assert [o.key for o in object_store.list("data/a")] == ["data/ab/1", "data/ab/2", "data/ac"]
    assert [o.key for o in object_store.list("data/ab/1")] == ["data/ab/1"]
    assert list(object_store.list("zz")) == []
    assert list(object_store.list("nope/deeper/")) == []
    assert list(object_store.list("../")) == [] and list(object_store.list("a//")) == []


def test_delete(object_store):
    object_store.put("gone", b"x")
    object_store.delete("gone")
    assert object_store.stat("gone") is None
    with pytest.raises(ObjectNotFound):
        object_store.get("gone")
    object_store.delete("gone")  # again: not an error
    object_store.delete("never/was")


def test_missing_key_errors_name_the_key(object_store):
    for call in (
        lambda: object_store.get("data/missing-key"),
        lambda: object_store.get_range("data/missing-key", 0, 10),
        lambda: object_store.open_read("data/missing-key"),
    ):
        with pytest.raises(ObjectNotFound) as exc:
            call()
        assert "'data/missing-key'" in str(exc.value) and object_store.url in str(exc.value)
    assert object_store.stat("data/missing-key") is None


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "../escape", "a/./b", "a/.x.0123456789ab.tmp"])
def test_invalid_keys_are_rejected(object_store, key):
    with pytest.raises(RepositoryError, match="invalid object key"):
        object_store.put(key, b"x")


# -- put_stream -----------------------------------------------------------------------------


def test_put_stream_large(object_store):
    total = 40 * MiB + 12345  # 9 parts of 5 MiB, the last one short
    chunk = 3 * MiB + 7  # parts and chunks do not line up
    written = object_store.put_stream("packs/big", chunks_of(1, total, chunk))
    assert written == total
    assert object_store.stat("packs/big").size == total
    with object_store.open_read("packs/big") as f:
        assert sha256_of(iter(lambda: f.read(MiB), b"")) == sha256_of(chunks_of(1, total, chunk))
    # Across the boundary of the second and third chunk (and the 5 MiB part boundaries).
    expected = b"".join(chunks_of(1, 3 * chunk, chunk))[2 * chunk - 2 : 2 * chunk + 2]
    assert object_store.get_range("packs/big", 2 * chunk - 2, 4) == expected
    assert leftovers(object_store) == []


@pytest.mark.parametrize("total", [0, 10, TEST_PART_SIZE, TEST_PART_SIZE + 1])
def test_put_stream_sizes(object_store, total):
    # Empty, small (a single PutObject), exactly one part, one part and one byte.
    assert object_store.put_stream("s", chunks_of(2, total)) == total
    assert object_store.get("s") == b"".join(chunks_of(2, total))
    assert leftovers(object_store) == []


def test_put_stream_failing_iterator_leaves_nothing(object_store):
    def failing():
        yield from chunks_of(3, 12 * MiB)  # far enough for parts to be uploading
        raise OSError("pg_dump died")

    with pytest.raises(OSError, match="pg_dump died"):
        object_store.put_stream("dumps/pg", failing())
    assert object_store.stat("dumps/pg") is None
    assert list(object_store.list()) == []
    assert leftovers(object_store) == []


def test_put_stream_failing_iterator_keeps_the_old_object(object_store):
    object_store.put("obj", b"old")

    def failing():
        yield b"new"
        raise ValueError("boom")

    with pytest.raises(ValueError):
        object_store.put_stream("obj", failing())
    assert object_store.get("obj") == b"old"


def test_put_stream_memory_is_bounded(object_store):
    in_flight = 2
    if isinstance(object_store, S3Store):
        object_store.max_in_flight = in_flight
    total = 40 * MiB
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        written = object_store.put_stream("bounded", chunks_of(4, total))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert written == total
    assert peak < TEST_PART_SIZE * (in_flight + 2), f"peak {peak / MiB:.1f} MiB"


# -- S3 specifics ---------------------------------------------------------------------------


def test_s3_store_stays_inside_its_prefix(s3_bucket):
    endpoint, bucket = s3_bucket
    a = S3Store(bucket, "node-a", endpoint_url=endpoint)
    b = S3Store(bucket, "node-a-old", endpoint_url=endpoint)
    a.put("k", b"a")
    b.put("k", b"b")
    assert [o.key for o in a.list()] == ["k"] and a.get("k") == b"a"
    assert b.get("k") == b"b"
    import boto3

    raw = boto3.client("s3", endpoint_url=endpoint)
    assert sorted(o["Key"] for o in raw.list_objects_v2(Bucket=bucket)["Contents"]) == ["node-a-old/k", "node-a/k"]


def test_s3_orphaned_multipart_uploads(s3_bucket):
    endpoint, bucket = s3_bucket
    import boto3

    store = S3Store(bucket, "repo", endpoint_url=endpoint)
    raw = boto3.client("s3", endpoint_url=endpoint)
    up = raw.create_multipart_upload(Bucket=bucket, Key="repo/data/orphan")
    raw.create_multipart_upload(Bucket=bucket, Key="elsewhere/x")  # not this store's
    uploads = store.list_multipart_uploads()
    assert [(u.key, u.upload_id) for u in uploads] == [("data/orphan", up["UploadId"])]
    # moto reports every upload as initiated in 2010, so thresholds are set from that age.
    age = time.time() - uploads[0].initiated
    assert store.abort_multipart_uploads(older_than_seconds=age + 3600) == 0
    assert store.abort_multipart_uploads(older_than_seconds=max(age - 3600, 0)) == 1
    assert store.list_multipart_uploads() == []
    assert len(raw.list_multipart_uploads(Bucket=bucket)["Uploads"]) == 1


def test_s3_server_side_encryption(s3_bucket):
    endpoint, bucket = s3_bucket
    import boto3

    store = S3Store(bucket, "enc", endpoint_url=endpoint, sse="AES256", part_size=TEST_PART_SIZE)
    store.put("small", b"x")
    store.put_if_absent("lock", b"x")
    store.put_stream("big", chunks_of(5, 2 * TEST_PART_SIZE))
    raw = boto3.client("s3", endpoint_url=endpoint)
    for key in ("small", "lock", "big"):
        assert raw.head_object(Bucket=bucket, Key=f"enc/{key}").get("ServerSideEncryption") == "AES256", key


def test_s3_bad_options():
    with pytest.raises(ConfigError, match="sse must be"):
        S3Store("bucket", sse="rot13")
    with pytest.raises(ConfigError, match="sse_kms_key_id needs"):
        S3Store("bucket", sse="AES256", sse_kms_key_id="k")
    with pytest.raises(ConfigError, match="part_size"):
        S3Store("bucket", part_size=1 * MiB)
    with pytest.raises(ConfigError, match="unknown S3 option.*colour"):
        S3Store("bucket", colour="blue")


def test_s3_missing_bucket_error_names_bucket_and_code(moto_server):
    store = S3Store("drtool-no-such-bucket", "p", endpoint_url=moto_server)
    with pytest.raises(RepositoryError) as exc:
        store.get("some/key")
    msg = str(exc.value)
    assert not isinstance(exc.value, ObjectNotFound)
    assert "s3://drtool-no-such-bucket/p/some/key" in msg and "NoSuchBucket" in msg
    assert TEST_AWS_ENV["AWS_SECRET_ACCESS_KEY"] not in msg and "\n" not in msg


def test_s3_unreachable_endpoint_fails_clearly(moto_server):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    store = S3Store("bucket", "p", endpoint_url=endpoint)
    with pytest.raises(RepositoryError) as exc:
        store.get("k")
    msg = str(exc.value)
    assert msg.startswith("s3://bucket/p/k: get failed: cannot reach S3 endpoint")
    assert endpoint in msg and "\n" not in msg


class _NoConditionalWritesProxy(http.server.BaseHTTPRequestHandler):
    """Forwards to moto, but answers 501 NotImplemented to If-None-Match, as some
    S3-compatible servers do."""

    protocol_version = "HTTP/1.1"  # answers botocore's "Expect: 100-continue" at once
    upstream: str = ""
    rejected = 0

    def _handle(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.command == "PUT" and self.headers.get("If-None-Match"):
            type(self).rejected += 1
            payload = b"<Error><Code>NotImplemented</Code><Message>If-None-Match</Message></Error>"
            self.send_response(501)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        up = urlsplit(self.upstream)
        conn = http.client.HTTPConnection(up.hostname, up.port, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "expect"}
        conn.request(self.command, self.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for name, value in resp.getheaders():
            if name.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        conn.close()

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _handle

    def log_message(self, *args):
        pass


def test_s3_put_if_absent_falls_back_without_conditional_writes(s3_bucket, caplog):
    endpoint, bucket = s3_bucket
    handler = type("Proxy", (_NoConditionalWritesProxy,), {"upstream": endpoint, "rejected": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        store = S3Store(bucket, "p", endpoint_url=f"http://127.0.0.1:{server.server_address[1]}")
        with caplog.at_level(logging.WARNING, logger="drtool.repo.objectstore"):
            assert store.put_if_absent("a", b"1") is True
            assert store.put_if_absent("a", b"2") is False
            assert store.put_if_absent("b", b"3") is True
        assert store.get("a") == b"1" and store.get("b") == b"3"
        assert handler.rejected == 1  # asked once, then remembered
        warnings = [r for r in caplog.records if "conditional writes" in r.getMessage()]
        assert len(warnings) == 1
    finally:
        server.shutdown()
        server.server_close()


# -- local specifics ------------------------------------------------------------------------


def test_local_temp_files_are_skipped_and_found_when_stale(tmp_path):
    store = LocalStore(tmp_path / "repo")
    store.put("data/x", b"x")
    old = tmp_path / "repo" / "data" / ".y.0123456789ab.tmp"
    new = tmp_path / "repo" / "data" / ".z.ba9876543210.tmp"
    old.write_bytes(b"partial")
    new.write_bytes(b"partial")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert [o.key for o in store.list()] == ["data/x"]
    assert store.stale_temp_files(3600) == [old]
    assert store.stale_temp_files(-60) == sorted([old, new])


def test_local_store_url_and_creates_folders(tmp_path):
    root = tmp_path / "deep" / "er"
    store = LocalStore(root)
    assert store.url == root.as_uri()
    assert list(store.list()) == []  # no folder yet: empty, not an error
    store.put("a/b/c/d", b"x")
    assert (root / "a" / "b" / "c" / "d").read_bytes() == b"x"


# -- open_store -----------------------------------------------------------------------------


def test_open_store_urls(tmp_path):
    local = open_store(tmp_path.as_uri())
    assert isinstance(local, LocalStore) and local.root == tmp_path
    plain = open_store(str(tmp_path / "plain"))
    assert isinstance(plain, LocalStore) and plain.root == tmp_path / "plain"
    s3 = open_store("s3://my-bucket/some/prefix/", endpoint_url="http://127.0.0.1:1", region="eu-west-1")
    assert isinstance(s3, S3Store)
    assert (s3.bucket, s3.prefix, s3.url) == ("my-bucket", "some/prefix", "s3://my-bucket/some/prefix")
    bare = open_store("s3://my-bucket")
    assert (bare.prefix, bare.url) == ("", "s3://my-bucket")


def test_open_store_unknown_scheme():
    with pytest.raises(ConfigError) as exc:
        open_store("xyz://host/path")
    assert str(exc.value) == "repository url: unknown scheme 'xyz' in 'xyz://host/path'"


@pytest.mark.parametrize(
    "url, message",
    [
        ("s3://", "no bucket"),
        ("file://otherhost/x", "file:///absolute/path"),
        ("s3://AKIA:hunter2secret@bucket/p", "credentials do not belong"),
    ],
)
def test_open_store_bad_urls(url, message):
    with pytest.raises(ConfigError, match=message) as exc:
        open_store(url)
    assert "hunter2secret" not in str(exc.value)
