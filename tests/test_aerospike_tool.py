"""The tool engine's plumbing, with a real child process (tests/data/fake_asbackup.py)
standing in for absctl / asbackup / asrestore."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from drtool.errors import ConfigError, SourceError
from drtool.sources.aerospike import SetCounter, ToolEngine, detect_tool, format_modified_after
from drtool.sources.asb import AsbReader, AsbRecord

FAKE = Path(__file__).parent / "data" / "fake_asbackup.py"
CMD = [sys.executable, str(FAKE)]


def engine(tmp_path, monkeypatch, mode="ok", records=10, blob=16, **kw) -> ToolEngine:
    env = dict(os.environ, FAKE_AS_MODE=mode, FAKE_AS_RECORDS=str(records), FAKE_AS_BLOB=str(blob),
               FAKE_AS_ARGS_FILE=str(tmp_path / "args.json"),
               FAKE_AS_STDIN_FILE=str(tmp_path / "stdin.txt"))
    kw.setdefault("command", CMD)
    return ToolEngine(hosts=["10.0.0.1:3000", "10.0.0.2:3100"], namespace="utxo-store",
                      env=env, **kw)


def received(tmp_path) -> dict:
    return json.loads((tmp_path / "args.json").read_text())


def test_backup_arguments_asbackup(tmp_path, monkeypatch):
    e = engine(tmp_path, monkeypatch, command=["docker", "compose", "exec", "-T", "aerospike", "asbackup"],
               set="utxo", user="admin", password="s3cret-pw", parallel=8,
               partition_list="0-2048", bin_list=["txID", "utxos"], records_per_second=5000,
               tls={"enable": True, "name": "as1", "cafile": "/ca.pem"})
    args = e.backup_args(modified_after=datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc))
    assert args[:6] == ["docker", "compose", "exec", "-T", "aerospike", "asbackup"]
    joined = " ".join(args)
    for expected in ("--host 10.0.0.1:3000,10.0.0.2:3100", "--namespace utxo-store", "--set utxo",
                     "--output-file -", "--parallel 8", "--partition-list 0-2048",
                     "--modified-after 2026-01-02_03:04:05", "--bin-list txID,utxos",
                     "--records-per-second 5000", "--user admin",
                     "--password env:DRTOOL_AEROSPIKE_PASSWORD", "--tls-enable", "--tls-name as1",
                     "--tls-cafile /ca.pem"):
        assert expected in joined
    assert "s3cret-pw" not in joined
    assert e._env()["DRTOOL_AEROSPIKE_PASSWORD"] == "s3cret-pw"
    restore = e.restore_args(replace=True)
    assert restore[5] == "asrestore" and "--input-file -" in " ".join(restore)
    assert "--replace" in restore and "--no-generation" in restore
    with pytest.raises(ConfigError):
        e.restore_args(replace=True, unique=True)


def test_backup_arguments_absctl(tmp_path, monkeypatch):
    e = engine(tmp_path, monkeypatch, command=["/opt/bin/absctl"], user="u", password_file="/run/pw",
               node_list="10.0.0.1:3000")
    assert e.kind == "absctl"
    assert e.backup_args()[:2] == ["/opt/bin/absctl", "backup"]
    assert e.restore_args()[:2] == ["/opt/bin/absctl", "restore"]
    assert "--password file:/run/pw" in " ".join(e.backup_args())
    assert "--node-list 10.0.0.1:3000" in " ".join(e.backup_args())
    with pytest.raises(ConfigError):
        engine(tmp_path, monkeypatch, partition_list="0-10", node_list="a:1")
    with pytest.raises(ValueError):
        format_modified_after(datetime(2026, 1, 1))  # naive times are ambiguous


def test_stream_records_and_received_arguments(tmp_path, monkeypatch):
    e = engine(tmp_path, monkeypatch, records=25, set="fake", user="admin", password="pw-1234")
    with e.backup_stream(modified_after=datetime(2026, 5, 1, tzinfo=timezone.utc)) as s:
        records = [o for o in AsbReader(iter(s)) if isinstance(o, AsbRecord)]
    assert s.returncode == 0
    assert len(records) == 25 and sum(r.key_type == "I" for r in records) == 13
    got = received(tmp_path)
    assert got["argv"][got["argv"].index("--output-file") + 1] == "-"
    assert got["argv"][got["argv"].index("--modified-after") + 1] == "2026-05-01_00:00:00"
    assert got["password_env"] == "pw-1234" and got["tz"] == "UTC"
    assert "pw-1234" not in " ".join(got["argv"])


def test_large_output_streams_in_chunks(tmp_path, monkeypatch):
    e = engine(tmp_path, monkeypatch, records=4000, blob=6000)  # ~32 MB of .asb text
    counter = SetCounter()
    h = hashlib.sha256()
    chunks = 0
    with e.backup_stream() as s:
        for chunk in counter.wrap(s):
            assert len(chunk) <= 1 << 20
            h.update(chunk)
            chunks += 1
    assert s.bytes > 30_000_000 and chunks > 30
    assert counter.counts == {"fake": 4000}


def test_failed_tool_raises_with_redacted_stderr_tail(tmp_path, monkeypatch):
    e = engine(tmp_path, monkeypatch, mode="fail", password="hunter22", user="admin")
    with pytest.raises(SourceError) as info:
        with e.backup_stream() as s:
            for _ in s:
                pass
    msg = str(info.value)
    assert "exit status 3" in msg and "Failed to connect to cluster" in msg
    assert "hunter22" not in msg and "\n" not in msg
    assert "progress line 29" in msg and "progress line 0 " not in msg  # only the tail


def test_hung_tool_is_stopped_by_the_timeout(tmp_path, monkeypatch):
    e = engine(tmp_path, monkeypatch, mode="hang", idle_timeout=1.0)
    t0 = time.monotonic()
    with pytest.raises(SourceError, match="no output for 1 s"):
        with e.backup_stream() as s:
            for _ in s:
                pass
    assert time.monotonic() - t0 < 15
    assert s.proc.poll() is not None  # the child is gone


def test_closing_early_kills_the_tool(tmp_path, monkeypatch):
    e = engine(tmp_path, monkeypatch, mode="slow-then-hang", records=5)
    with e.backup_stream() as s:
        next(iter(s))
    assert s.proc.poll() is not None


def test_restore_feeds_stdin(tmp_path, monkeypatch):
    e = engine(tmp_path, monkeypatch)
    data = [os.urandom(300_000) for _ in range(20)]  # more than a pipe buffer
    fed = e.restore_from_stream(iter(data), replace=True)
    assert fed == 6_000_000
    n, digest = (tmp_path / "stdin.txt").read_text().split()
    assert int(n) == fed and digest == hashlib.sha256(b"".join(data)).hexdigest()
    argv = received(tmp_path)["argv"]
    assert argv[argv.index("--input-file") + 1] == "-" and "--replace" in argv


def test_restore_failure_raises(tmp_path, monkeypatch):
    e = engine(tmp_path, monkeypatch, mode="fail-early")
    with pytest.raises(SourceError) as info:
        e.restore_from_stream(iter([os.urandom(1 << 20)] * 8))
    assert "Invalid bytes label" in str(info.value) and "hunter22" not in str(info.value)


def test_detect_tool_on_path(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    monkeypatch.setenv("PATH", str(bindir))
    with pytest.raises(ConfigError, match="neither absctl nor asbackup"):
        detect_tool(None)
    (bindir / "asbackup").symlink_to(FAKE)
    assert detect_tool(None) == ["asbackup"]
    (bindir / "absctl").symlink_to(FAKE)
    assert detect_tool(None) == ["absctl"]
    assert detect_tool(["x", "y"]) == ["x", "y"]


def test_missing_executable_is_a_clear_error(tmp_path, monkeypatch):
    e = engine(tmp_path, monkeypatch, command=[str(tmp_path / "no-such-asbackup")])
    with pytest.raises(SourceError, match="cannot run"):
        with e.backup_stream() as s:
            list(s)


def test_versions(tmp_path, monkeypatch):
    assert engine(tmp_path, monkeypatch).versions() == {
        "engine": "tool", "tool": "asbackup", "tool_version": "asbackup version 4.5.8-fake"}
