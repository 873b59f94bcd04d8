"""Round trips against a real Aerospike server: only with DRTOOL_TEST_AEROSPIKE=host:port
(and DRTOOL_TEST_AEROSPIKE_TOOL=absctl|asbackup for the tool engine). No server can be
installed on the build machines, so these skip there; never fake a server here."""

from __future__ import annotations

import io
import os
import time
from datetime import datetime, timezone

import pytest

from drtool.errors import SourceError
from drtool.sources.aerospike import NativeEngine, ToolEngine
from drtool.sources.asb import AsbReader, AsbRecord

SERVER = os.environ.get("DRTOOL_TEST_AEROSPIKE")
TOOL = os.environ.get("DRTOOL_TEST_AEROSPIKE_TOOL")
NS = os.environ.get("DRTOOL_TEST_AEROSPIKE_NAMESPACE", "test")

pytestmark = [
    pytest.mark.aerospike,
    pytest.mark.skipif(not SERVER, reason="no Aerospike server: set DRTOOL_TEST_AEROSPIKE=host:port "
                                          "(none can be installed on this machine)"),
]


@pytest.fixture
def native():
    set_name = f"drtool{int(time.time() * 1000) % 10**8}"
    engine = NativeEngine([SERVER], NS, set_name, parallel=4)
    yield engine
    client = engine.client()
    client.truncate(NS, set_name, 0)
    engine.close()


def put_records(engine: NativeEngine, n: int, start: int = 0) -> None:
    client = engine.client()
    for i in range(start, start + n):
        client.put((NS, engine.set, f"k{i}"), {"n": i, "b": bytes([i % 256]) * 10, "l": [i, b"x"],
                                               "m": {"a": i}}, policy={"key": 1 if i % 3 else 0})  # some keys stored, some digest-only


def test_native_round_trip_is_deterministic(native):
    put_records(native, 200)
    first, second = io.BytesIO(), io.BytesIO()
    stats = native.backup(first)
    native.backup(second)
    assert stats["records"] == 200 and stats["sets"] == {native.set: 200}
    assert first.getvalue() == second.getvalue()
    native.client().truncate(NS, native.set, 0)
    time.sleep(1)
    first.seek(0)
    assert native.restore(first)["records"] == 200
    again = io.BytesIO()
    native.backup(again)
    assert [r.bins for r in AsbReader(io.BytesIO(again.getvalue())).records()] == \
        [r.bins for r in AsbReader(io.BytesIO(first.getvalue())).records()]


def test_incremental_chain_does_not_resurrect_deleted_records(native):
    put_records(native, 100)
    full = io.BytesIO()
    native.backup(full)
    start = datetime.now(timezone.utc)
    time.sleep(1.1)
    for i in range(0, 100, 5):
        native.client().remove((NS, native.set, f"k{i}"))
    put_records(native, 10, start=1000)
    inc, live = io.BytesIO(), io.BytesIO()
    native.backup(inc, modified_after=start)
    from drtool.sources.aerospike import write_digest_set
    write_digest_set(native.live_digests(), live)
    native.client().truncate(NS, native.set, 0)
    time.sleep(1)
    for stream in (full, inc):
        stream.seek(0)
        native.restore(stream)
    live.seek(0)
    stats = native.reconcile(live)
    assert stats["deleted"] == 20
    assert sum(1 for _ in native.live_digests()) == 90


def test_unknown_namespace(native):
    engine = NativeEngine([SERVER], "no-such-namespace-drtool")
    with pytest.raises(SourceError, match="unknown namespace 'no-such-namespace-drtool'"):
        engine.check_namespace()


@pytest.mark.skipif(not TOOL, reason="set DRTOOL_TEST_AEROSPIKE_TOOL=absctl|asbackup")
def test_tool_round_trip(native):
    put_records(native, 50)
    tool = ToolEngine([TOOL], [SERVER], NS, native.set)
    with tool.backup_stream() as s:
        data = b"".join(s)
    assert sum(1 for o in AsbReader(io.BytesIO(data)) if isinstance(o, AsbRecord)) == 50
    native.client().truncate(NS, native.set, 0)
    time.sleep(1)
    tool.restore_from_stream([data])
    assert sum(1 for _ in native.live_digests()) == 50


def test_incremental_chain_through_the_cli_keeps_deleted_records_deleted(native, tmp_path):
    """Full, then records deleted and others added, then an incremental: restoring the chain into
    an emptied set gives exactly the live records of the second snapshot."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from drtool.teranode import sample
    from tests.support.node import write_node_config

    put_records(native, 120)
    sample.build_sample_node(tmp_path / "node", seed=1, tx_files=10, subtrees=1, blocks=2)
    cfg = write_node_config(tmp_path / "drtool.toml", tmp_path / "node", f"file://{tmp_path / 'repo'}", extra={
        "aerospike": {"hosts": [SERVER], "namespace": NS, "set": native.set, "engine": "native", "incremental": True}})
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))

    def drtool(*args):
        proc = subprocess.run([sys.executable, "-m", "drtool.cli", "--json", "--config", str(cfg), *args],
                              capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    assert drtool("backup")["snapshot"]["sources"]["aerospike"]["mode"] == "full"
    client = native.client()
    for i in range(0, 30):
        client.remove((NS, native.set, f"k{i}"))
    put_records(native, 10, start=500)
    time.sleep(1)
    second = drtool("backup")["snapshot"]["sources"]["aerospike"]
    assert second["mode"] == "incremental" and second["records"] < 120
    live = sorted(native.live_digests())
    client.truncate(NS, native.set, 0)
    time.sleep(1)
    drtool("restore", "latest", "--only", "aerospike", "--aerospike", SERVER)
    assert sorted(native.live_digests()) == live
