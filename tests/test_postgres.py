"""The PostgreSQL source against a real PostgreSQL 15 cluster (tests/support/pg.py)."""

from __future__ import annotations

import hashlib
import os
import signal
import stat
import threading
import time

import psycopg
import pytest

from drtool.errors import ConfigError, IntegrityError, SourceError
from drtool.sources import postgres as P
from tests.support.pg import pg_available, start_cluster

TABLES = ("bans", "blocks", "scheduled_blob_deletions", "state")


def table_checksums(dsn: str) -> dict[str, tuple[int, str]]:
    """(row count, md5 over every row in a stable order) per user table."""
    out = {}
    with psycopg.connect(dsn) as conn:
        for (table,) in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"):
            out[table] = conn.execute(
                f'SELECT count(*), md5(coalesce(string_agg(t::text, E\'\\n\' ORDER BY t::text), \'\')) FROM "{table}" t'
            ).fetchone()
    return out


def databases(server) -> set[str]:
    return {r[0] for r in server.execute("SELECT datname FROM pg_database")}


@pytest.fixture(scope="module")
def source(pg_server):
    """A Teranode database of ~25 MB (1200 blocks x 20 KB) and its dump, taken once."""
    name = "src_teranode"
    if name not in databases(pg_server):
        pg_server.create_database(name)
        P.fill_bulk(pg_server.dsn(name), 1200, 20_000)
    dsn = pg_server.dsn(name)
    with P.dump_stream(dsn) as stream:
        chunks = list(stream)
    return dsn, chunks, stream.metadata


def test_round_trip_content_identical_and_checks_pass(pg_server, source, tmp_path):
    dsn, chunks, meta = source
    data = b"".join(chunks)
    assert data.startswith(b"PGDMP")
    assert meta.dump_size == len(data) > 20_000_000
    assert meta.dump_sha256 == hashlib.sha256(data).hexdigest()
    assert meta.row_counts == {"bans": 10, "blocks": 1200, "scheduled_blob_deletions": 1200, "state": 3}
    assert meta.best_block.height == 1199
    assert meta.server_version.startswith("15.")
    assert set(meta.state_keys) == {"fsm_state", "BlockAssembler", "BlockPersisterHeight"}
    assert max(len(c) for c in chunks) <= P.CHUNK_SIZE

    target = pg_server.dsn("restored_rt")
    result = P.restore_stream(iter(chunks), target, expected=meta)
    assert result.findings == [] and result.database == "restored_rt" and result.bytes_restored == len(data)
    assert table_checksums(target) == table_checksums(dsn)
    assert P.check_database(target, meta) == []
    with psycopg.connect(target) as conn:
        assert P.best_block(conn).to_dict() == meta.best_block.to_dict()

    # -j 2 spools to a file (pg_restore -j needs one) and removes it afterwards
    target2 = pg_server.dsn("restored_rt_j2")
    P.restore_stream(iter(chunks), target2, jobs=2, spool_dir=tmp_path, size_hint=meta.dump_size, expected=meta)
    assert table_checksums(target2) == table_checksums(dsn)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_round_trip_few_hundred_mb(pg_server, tmp_path):
    dsn = pg_server.create_database("big_src")
    P.fill_bulk(dsn, 6000, 50_000)  # ~300 MB of block data
    target = pg_server.dsn("big_restored")
    with P.dump_stream(dsn) as stream:
        result = P.restore_stream(stream, target, expected=stream.metadata)
    assert stream.metadata.dump_size > 300_000_000
    assert result.findings == []
    assert table_checksums(target) == table_checksums(dsn)


def test_dump_killed_midway_is_an_error(pg_server, source):
    dsn = source[0]
    with pytest.raises(SourceError, match="killed by SIGKILL") as exc:
        with P.dump_stream(dsn, chunk_size=65536) as stream:
            next(stream)
            os.kill(stream.pid, signal.SIGKILL)
            for _ in stream:
                pass
    assert stream.metadata.dump_sha256 is None and stream.metadata.dump_size is None
    assert pg_server.password not in str(exc.value)


def test_backend_terminated_midway_is_an_error(pg_server, source):
    dsn = source[0]
    with pytest.raises(SourceError, match="exited with status 1") as exc:
        with P.dump_stream(dsn, chunk_size=65536) as stream:
            next(stream)
            killed = pg_server.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'pg_dump'")
            assert killed == [(True,)]
            for _ in stream:
                pass
    assert "src_teranode" in str(exc.value)
    assert stream.metadata.dump_sha256 is None


def test_server_going_away_midway_is_an_error():
    if pg_available():
        pytest.skip(pg_available())
    with start_cluster() as server:
        dsn = server.create_database("teranode")
        P.fill_bulk(dsn, 600, 20_000)
        with pytest.raises(SourceError) as exc:
            with P.dump_stream(dsn, chunk_size=65536) as stream:
                next(stream)
                server.stop("immediate")
                for _ in stream:
                    pass
        assert stream.metadata.dump_sha256 is None
        assert server.password not in str(exc.value)


def test_stream_not_read_to_the_end_is_an_error(source):
    with pytest.raises(SourceError, match="not read to its end"):
        with P.dump_stream(source[0]) as stream:
            next(stream)


def test_wrong_password_is_a_clear_error_without_the_password(pg_server, monkeypatch):
    monkeypatch.delenv("PGPASSWORD", raising=False)
    bad = "not-the-pw-" + "x7Qz"
    dsn = f"postgresql://{pg_server.user}:{bad}@{pg_server.host}:{pg_server.port}/postgres"
    with pytest.raises(SourceError, match="password authentication failed") as exc:
        with P.dump_stream(dsn):
            pass
    assert bad not in str(exc.value) and "****" in str(exc.value)
    # key=value form, password from PGPASSWORD: works, and pg_dump gets it the same way
    monkeypatch.setenv("PGPASSWORD", pg_server.password)
    with P.dump_stream(pg_server.dsn_kv("postgres", sslmode="disable")) as stream:
        assert b"".join(stream).startswith(b"PGDMP")


def test_missing_database_is_a_clear_error(pg_server):
    with pytest.raises(SourceError, match='database "no_such_db" does not exist') as exc:
        with P.dump_stream(pg_server.dsn("no_such_db")):
            pass
    assert pg_server.password not in str(exc.value)


def test_restore_refuses_a_non_empty_target_without_force(pg_server, source):
    dsn, chunks, meta = source
    target = pg_server.create_database("occupied")
    pg_server.execute("CREATE TABLE precious (x int); INSERT INTO precious VALUES (42)", dbname="occupied")
    before = databases(pg_server)
    with pytest.raises(ConfigError, match="'occupied' is not empty"):
        P.restore_stream(iter(chunks), target, expected=meta)
    assert databases(pg_server) == before
    assert pg_server.execute("SELECT x FROM precious", dbname="occupied") == [(42,)]

    # with force: restored, the old database renamed aside, not dropped
    result = P.restore_stream(iter(chunks), target, expected=meta, force=True)
    assert result.previous_database.startswith("occupied__drtool_old_")
    assert pg_server.execute("SELECT x FROM precious", dbname=result.previous_database) == [(42,)]
    assert table_checksums(target) == table_checksums(dsn)


def test_restore_into_an_existing_empty_database(pg_server, source):
    dsn, chunks, meta = source
    target = pg_server.create_database("empty_target")
    result = P.restore_stream(iter(chunks), target, expected=meta)
    assert result.previous_database is None
    assert P.check_database(target, meta) == []


def test_truncated_stream_publishes_nothing(pg_server, source):
    _dsn, chunks, meta = source
    before = databases(pg_server)
    with pytest.raises(SourceError, match="pg_restore into database 'truncated'"):
        P.restore_stream(iter(chunks[: len(chunks) // 2]), pg_server.dsn("truncated"), expected=meta)
    assert databases(pg_server) == before


def test_restore_whose_checks_fail_publishes_nothing(pg_server, source):
    _dsn, chunks, meta = source
    expected = meta.to_dict()
    expected["best_block"] = {"height": 1199, "hash": "00" * 32}
    expected["row_counts"] = {**expected["row_counts"], "blocks": 1201}
    before = databases(pg_server)
    with pytest.raises(IntegrityError, match="failed 2 check") as exc:
        P.restore_stream(iter(chunks), pg_server.dsn("mismatch"), expected=expected)
    assert [f.subject for f in exc.value.findings] == ["table blocks", "best block"]
    assert databases(pg_server) == before


def _restored_copy(pg_server, source, name):
    _dsn, chunks, meta = source
    target = pg_server.dsn(name)
    P.restore_stream(iter(chunks), target, expected=meta)
    return target, meta


def _block_at(dsn, height):
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT id, hash FROM blocks WHERE height = %s", (height,)).fetchone()
    return row[0], bytes(row[1])[::-1].hex()


def test_deleted_block_fails_the_chain_check_naming_the_row(pg_server, source):
    target, meta = _restored_copy(pg_server, source, "tampered_delete")
    _id, _hash = _block_at(target, 500)
    _child_id, child_hash = _block_at(target, 501)
    with psycopg.connect(target) as conn:
        conn.execute("SET session_replication_role = replica")  # as a damaged restore would be: no FK check
        conn.execute("DELETE FROM blocks WHERE height = 500")
    findings = [str(f) for f in P.check_database(target, meta)]
    assert "table blocks: 1199 rows, backup had 1200" in findings
    assert any(f.startswith(f"blocks row height 501 hash {child_hash}: parent (id {_id}) is missing") for f in findings)
    assert any(f.startswith("main chain:") and "height 501" in f for f in findings)


def test_relinked_parent_fails_the_chain_check_naming_the_row(pg_server, source):
    target, meta = _restored_copy(pg_server, source, "tampered_relink")
    wrong_parent, _ = _block_at(target, 100)
    _id, hash_ = _block_at(target, 700)
    with psycopg.connect(target) as conn:
        conn.execute("UPDATE blocks SET parent_id = %s WHERE height = 700", (wrong_parent,))
    findings = [str(f) for f in P.check_database(target, meta)]
    assert any(f.startswith(f"blocks row height 700 hash {hash_}: parent is at height 100, expected 699") for f in findings)
    assert any(f.startswith("main chain:") for f in findings)


def test_changed_tip_and_missing_state_key_are_reported(pg_server, source):
    target, meta = _restored_copy(pg_server, source, "tampered_tip")
    with psycopg.connect(target) as conn:
        conn.execute("UPDATE blocks SET invalid = true WHERE height = 1199")
        conn.execute("DELETE FROM state WHERE key = 'fsm_state'")
    findings = [str(f) for f in P.check_database(target, meta)]
    assert any(f.startswith("best block: height 1198") for f in findings)
    assert "state row key 'fsm_state': missing" in findings


def test_sample_chain_loads_teranode_schema(pg_db):
    chain = P.synthetic_chain(50, seed=7)
    P.load_sample_chain(pg_db, chain)
    with psycopg.connect(pg_db) as conn:
        tip = P.best_block(conn)
        genesis = conn.execute("SELECT id, parent_id, on_main_chain FROM blocks WHERE height = 0").fetchone()
        on_main = conn.execute("SELECT count(*) FROM blocks WHERE on_main_chain").fetchone()[0]
        cols = {r[0] for r in conn.execute("SELECT column_name FROM information_schema.columns WHERE table_name = 'blocks'")}
    assert (tip.height, tip.hash) == (49, chain[-1][1])
    assert genesis == (0, 0, True) and on_main == 50
    assert {"chain_work", "subtrees", "coinbase_tx", "mined_set", "subtrees_set", "persisted_at", "peer_id"} <= cols
    assert P.check_database(pg_db, {"best_block": {"height": 49, "hash": chain[-1][1]}}) == []


def test_sample_chain_rejects_a_broken_chain(pg_db):
    chain = P.synthetic_chain(5, seed=1)
    with pytest.raises(Exception, match="not in the chain"):
        P.load_sample_chain(pg_db, [chain[0], chain[2]])


def test_pg_dump_older_than_server_is_a_clear_error(pg_server, tmp_path):
    fake = tmp_path / "pg_dump"
    fake.write_text("#!/bin/sh\necho 'pg_dump (PostgreSQL) 9.6.24'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    with pytest.raises(ConfigError, match=r"server is PostgreSQL 15 but .*pg_dump is 9"):
        with P.dump_stream(pg_server.dsn("postgres"), pg_dump=str(fake)):
            pass
    with pytest.raises(ConfigError, match="not an executable file"):
        P.find_pg_tool("pg_dump", str(tmp_path / "nope"))
    assert P.tool_major(P.find_pg_tool("pg_restore", server_major=15)) >= 15


def test_dsn_forms_and_redaction():
    url = "postgresql://teranode:s3cr3t-pw@db.example:5433/teranode?sslmode=verify-full&sslrootcert=/etc/ca.pem"
    shown = P.display_dsn(url)
    assert "s3cr3t-pw" not in shown and "password=****" in shown and "sslmode=verify-full" in shown
    conninfo, env = P.child_conninfo(url)
    assert "s3cr3t-pw" not in conninfo and env["PGPASSWORD"] == "s3cr3t-pw"
    assert "sslrootcert=/etc/ca.pem" in conninfo and "port=5433" in conninfo
    kv = "host=h port=5432 dbname=teranode user=teranode password='kv pass 9'"
    assert P.database_name(kv) == "teranode"
    assert "kv pass 9" not in P.display_dsn(kv)
    assert P.database_name(P.dsn_with(kv, dbname="postgres")) == "postgres"
    with pytest.raises(ConfigError, match="postgres DSN"):
        P.parse_dsn("host=h dbname='unterminated")


def test_stream_failing_midway_publishes_nothing(pg_server, source):
    """A repository error while the dump streams in (e.g. a damaged part) stops pg_restore."""
    _dsn, chunks, meta = source

    def failing():
        yield from chunks[:3]
        raise IntegrityError("part 3: sha256 mismatch")

    before = databases(pg_server)
    with pytest.raises(IntegrityError, match="part 3"):
        P.restore_stream(failing(), pg_server.dsn("broken_stream"), expected=meta)
    assert databases(pg_server) == before


def test_restore_refuses_system_databases(pg_server, source):
    with pytest.raises(ConfigError, match="'postgres': a system database"):
        P.restore_stream(iter(source[1]), pg_server.dsn("postgres"))


def test_metadata_and_dump_share_one_snapshot_under_writes(pg_server):
    """Rows committed while the backup runs are in neither the counts nor the dump."""
    dsn = pg_server.create_database("busy")
    P.load_sample_chain(dsn, P.synthetic_chain(20, seed=3))
    stop = threading.Event()

    def writer():
        with psycopg.connect(dsn, autocommit=True) as conn:
            i = 0
            while not stop.is_set():
                conn.execute("INSERT INTO bans (key, subnet) VALUES (%s, %s)", (f"10.9.{i // 250}.{i % 250}", "x"))
                i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.3)
        with P.dump_stream(dsn) as stream:
            chunks = list(stream)
        time.sleep(0.2)
    finally:
        stop.set()
        thread.join()
    meta = stream.metadata
    assert pg_server.execute("SELECT count(*) FROM bans", dbname="busy")[0][0] > meta.row_counts["bans"] > 0
    result = P.restore_stream(iter(chunks), pg_server.dsn("busy_restored"), expected=meta)
    assert result.findings == []


def test_dump_stream_is_also_readable(source):
    dsn, chunks, meta = source
    with P.dump_stream(dsn) as stream:
        parts = []
        while part := stream.read(300_000):
            assert len(part) <= 300_000
            parts.append(part)
    assert hashlib.sha256(b"".join(parts)).hexdigest() == stream.metadata.dump_sha256
    assert stream.metadata.dump_size == meta.dump_size


def test_debians_pg_wrapper_is_passed_over_for_the_binary_it_would_run(tmp_path, monkeypatch):
    """/usr/bin/pg_dump on Debian is a Perl wrapper that picks the newest installed version,
    70 ms later per run; drtool runs that version's binary itself."""
    bin_dir, lib = tmp_path / "bin", tmp_path / "lib"
    (tmp_path / "share").mkdir()
    bin_dir.mkdir()
    wrapper = tmp_path / "share" / "pg_wrapper"
    wrapper.write_text("#!/bin/sh\n")
    wrapper.chmod(0o755)
    (bin_dir / "pg_dump").symlink_to(wrapper)
    for version in ("13", "15"):
        (lib / version / "bin").mkdir(parents=True)
        (lib / version / "bin" / "pg_dump").write_text("#!/bin/sh\n")
        (lib / version / "bin" / "pg_dump").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setattr(P, "PG_BIN_GLOB", str(lib / "*" / "bin"))
    assert P.find_pg_tool("pg_dump") == str(lib / "15" / "bin" / "pg_dump")
    (bin_dir / "pg_dump").unlink()
    (bin_dir / "pg_dump").write_text("#!/bin/sh\n")  # any other pg_dump on PATH comes first
    (bin_dir / "pg_dump").chmod(0o755)
    assert P.find_pg_tool("pg_dump") == str(bin_dir / "pg_dump")
