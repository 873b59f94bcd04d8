"""A node with its PostgreSQL blockchain database: backup through the CLI, restore into a
fresh database, chain checks — against a real PostgreSQL 15 server."""

from __future__ import annotations

import json

from drtool.sources import postgres
from drtool.teranode import sample
from tests.support.node import Node, write_node_config
from tests.test_postgres import table_checksums


def make_node(tmp_path, pg_server, pg_db) -> tuple[Node, object]:
    import os
    from pathlib import Path

    node_data = sample.build_sample_node(tmp_path / "node", seed=3, tx_files=200, subtrees=3, blocks=8)
    postgres.load_sample_chain(pg_db, node_data.chain)
    dbname = pg_db.rsplit("/", 1)[1]
    cfg = write_node_config(tmp_path / "drtool.toml", tmp_path / "node", f"file://{tmp_path / 'repo'}",
                            extra={"postgres": {"dsn": pg_server.dsn_kv(dbname)}})
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), PGPASSWORD=pg_server.password)
    return Node(tmp_path, tmp_path / "node", cfg, f"file://{tmp_path / 'repo'}", env), node_data


def test_node_with_postgres_round_trip(tmp_path, pg_server, pg_db):
    node, data = make_node(tmp_path, pg_server, pg_db)
    doc = node.run("backup", json_out=True).doc
    snap = doc["snapshot"]
    tip = data.best_block
    assert snap["best_block"] == {"height": tip.height, "hash": tip.hash_hex}
    pg = snap["sources"]["postgres"]
    assert pg["row_counts"]["blocks"] == len(data.chain)
    assert pg_server.password not in json.dumps(doc)

    target_db = "restored_" + snap["id"][:8]
    restored = node.run("restore", "latest", "--target-dir", str(tmp_path / "r"),
                        "--pg-dsn", pg_server.dsn_kv(target_db), json_out=True).doc
    assert restored["ok"], restored
    assert table_checksums(pg_server.dsn(target_db)) == table_checksums(pg_db)
    assert postgres.check_database(pg_server.dsn(target_db), pg) == []

    # The same target again: not empty, refused without --force, and nothing changes.
    proc = node.run("restore", "latest", "--only", "postgres", "--pg-dsn", pg_server.dsn_kv(target_db), check=2)
    assert "not empty" in proc.stderr and target_db in proc.stderr
    forced = node.run("restore", "latest", "--only", "postgres", "--pg-dsn", pg_server.dsn_kv(target_db),
                      "--force", json_out=True).doc
    assert forced["ok"] and any(m.startswith("database ") for m in forced["moved_aside"])


def test_failed_blob_restore_publishes_no_database(tmp_path, pg_server, pg_db):
    node, _data = make_node(tmp_path, pg_server, pg_db)
    node.run("backup")
    packs = sorted((tmp_path / "repo" / "data").rglob("*"), key=lambda p: p.stat().st_size if p.is_file() else 0)
    victim = packs[-1]
    victim.chmod(0o644)
    raw = bytearray(victim.read_bytes())
    raw[100] ^= 1
    victim.write_bytes(bytes(raw))
    target_db = "never_" + victim.name[:8]
    node.run("restore", "latest", "--target-dir", str(tmp_path / "r"), "--pg-dsn", pg_server.dsn_kv(target_db), check=1)
    names = [r[0] for r in pg_server.execute("SELECT datname FROM pg_database")]
    assert not [n for n in names if n.startswith(target_db)], names
    assert not (tmp_path / "r" / "external").exists()
