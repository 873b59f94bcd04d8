"""A real S3 endpoint for tests: moto_server as a separate process (never moto's in-process mocks).

Fixtures:
  moto_server   (session)  endpoint URL of a running moto_server; dummy AWS credentials in the env
  s3_bucket     (function) (endpoint_url, bucket_name) of a fresh, uniquely named bucket
  object_store  (function) a fresh ObjectStore, parametrised over "local" and "s3"
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Iterator

import pytest

# Credentials for moto only; set for the whole session so the AWS chain finds them.
TEST_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    # Distinctive: drtool registers the secret with drtool.secrets, which then masks it in
    # every message; the word "testing" would be masked in other tests' messages too.
    "AWS_SECRET_ACCESS_KEY": "drtool-moto-dummy-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    # Keep a developer's own ~/.aws out of the tests.
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}

TEST_PART_SIZE = 5 * 1024 * 1024  # S3's minimum, so multipart paths run on little data


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def moto_server_binary() -> str:
    beside = Path(sys.executable).parent / "moto_server"
    if beside.exists():
        return str(beside)
    found = shutil.which("moto_server")
    if not found:
        raise RuntimeError("moto_server not found next to the Python interpreter or on PATH (pip install 'moto[server]')")
    return found


@contextlib.contextmanager
def run_moto_server(timeout: float = 30.0) -> Iterator[str]:
    """Start moto_server on a free loopback port, yield its endpoint URL, stop it after."""
    log = tempfile.NamedTemporaryFile(prefix="moto_server-", suffix=".log", delete=False)
    proc = None
    try:
        for _ in range(3):  # the free port may be taken between probe and bind: try again
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            proc = subprocess.Popen(
                [moto_server_binary(), "-H", "127.0.0.1", "-p", str(port)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
                    break
                except urllib.error.HTTPError:
                    break  # it answered
                except OSError:
                    time.sleep(0.1)
            if proc.poll() is None and time.monotonic() < deadline:
                break
            proc.kill()
            proc.wait()
        else:
            raise RuntimeError(f"moto_server did not start; see {log.name}: {Path(log.name).read_text()[-2000:]}")
        yield url
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        os.unlink(log.name)


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
            mp.delenv(name, raising=False)
        for name, value in TEST_AWS_ENV.items():
            mp.setenv(name, value)
        with run_moto_server() as url:
            yield url


def _empty_bucket(client, bucket: str) -> None:
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
        for up in page.get("Uploads", ()):
            client.abort_multipart_upload(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", ()):
            client.delete_object(Bucket=bucket, Key=obj["Key"])


@pytest.fixture
def s3_bucket(moto_server: str) -> Iterator[tuple[str, str]]:
    import boto3

    client = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    bucket = f"drtool-test-{uuid.uuid4().hex[:16]}"
    client.create_bucket(Bucket=bucket)
    try:
        yield moto_server, bucket
    finally:
        # moto keeps everything in memory: free it for the rest of the session.
        _empty_bucket(client, bucket)
        client.delete_bucket(Bucket=bucket)
        client.close()


@pytest.fixture(params=["local", "s3"])
def object_store(request, tmp_path):
    from drtool.repo.objectstore import LocalStore, S3Store

    if request.param == "local":
        store = LocalStore(tmp_path / "store")
    else:
        endpoint, bucket = request.getfixturevalue("s3_bucket")
        store = S3Store(bucket, "repo", endpoint_url=endpoint, region="us-east-1", part_size=TEST_PART_SIZE)
    try:
        yield store
    finally:
        store.close()
