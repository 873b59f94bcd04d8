"""A whole node: blob stores + PostgreSQL (Teranode's schema) taken at one moment with the node
quiesced (real child processes stand in for teranode-cli and docker compose), rebuilt, checked by
Teranode's own rules, drilled — and every kind of tampering caught and named."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from drtool.sources import postgres
from drtool.teranode import sample
from tests.support.node import Node, write_node_config

REPO = Path(__file__).resolve().parents[1]
FAKES = REPO / "tests" / "data" / "fake_teranode"
SERVICES = ["blockchain", "asset", "rpc"]


@pytest.fixture
def whole_node(tmp_path, pg_server, pg_db):
    data = sample.build_sample_node(tmp_path / "node", seed=4, tx_files=200, subtrees=6, blocks=7,
                                    subtree_size_range=(40 * 1024, 400 * 1024))
    persisted = list(data.block_files)
    postgres.load_sample_chain(pg_db, data.chain, subtrees=data.block_subtrees, persisted=persisted)
    fake_dir = tmp_path / "fake"
    fake_dir.mkdir()
    (tmp_path / ".env").write_text("TERANODE_VERSION=v0.14.2\n")
    settings = tmp_path / "settings.conf"
    settings.write_text("utxostore_utxoBatchSize = 512\n")
    dbname = pg_db.rsplit("/", 1)[1]
    cfg = write_node_config(tmp_path / "drtool.toml", tmp_path / "node", f"file://{tmp_path / 'repo'}", extra={
        "node": {"quiesce": "stop", "teranode_cli": [str(FAKES / "teranode-cli")],
                 "stop_command": [str(FAKES / "compose"), "stop", *SERVICES],
                 "start_command": [str(FAKES / "compose"), "start", *SERVICES],
                 "env_file": str(tmp_path / ".env"), "teranode_settings": str(settings),
                 "catchingblocks_wait": "3s"},
        "postgres": {"dsn": pg_server.dsn_kv(dbname)}})
    env = dict(os.environ, PYTHONPATH=str(REPO), PGPASSWORD=pg_server.password, FAKE_TERANODE_DIR=str(fake_dir))
    node = Node(tmp_path, tmp_path / "node", cfg, f"file://{tmp_path / 'repo'}", env)
    node.fake_dir = fake_dir
    node.data = data
    node.pg_db = pg_db
    node.pg_server = pg_server
    return node


def fake_log(node) -> list[str]:
    path = node.fake_dir / "log"
    return [line for line in path.read_text().splitlines() if "getfsmstate" not in line] if path.exists() else []


def databases(pg_server) -> set[str]:
    return {r[0] for r in pg_server.execute("SELECT datname FROM pg_database")}


def test_quiesced_snapshot_rebuild_and_drill(whole_node):
    node = whole_node
    doc = node.run("backup", json_out=True).doc
    snap = doc["snapshot"]
    assert snap["status"] == "complete"
    assert fake_log(node) == [
        "teranode-cli setfsmstate idle -> IDLE", "compose stop " + " ".join(SERVICES),
        "compose start " + " ".join(SERVICES), "teranode-cli setfsmstate running -> RUNNING"]
    assert (node.fake_dir / "fsm_state").read_text().strip() == "RUNNING"
    tip = node.data.best_block
    assert snap["best_block"] == {"height": tip.height, "hash": tip.hash_hex}

    before = databases(node.pg_server)
    drilled = node.run("verify", "--drill", json_out=True).doc
    assert drilled["ok"], drilled["findings"]
    assert drilled["drill"]["time_to_restore_seconds"] > 0
    assert set(drilled["drill"]["sources"]) == {"postgres", "blobstores", "files"}
    assert databases(node.pg_server) == before  # no scratch database left
    state_dir = node.dir / "state"
    assert not [p for p in state_dir.iterdir() if p.name.startswith("drill-")]

    target_db = "rebuilt_" + snap["id"][:8]
    rebuilt = node.run("restore", "latest", "--target-dir", str(node.dir / "rebuilt"),
                       "--pg-dsn", node.pg_server.dsn_kv(target_db), json_out=True).doc
    assert rebuilt["ok"]
    assert any("setfsmstate" in step for step in rebuilt["next_steps"])
    assert any(str(tip.height) in step for step in rebuilt["next_steps"])


def test_restore_refuses_another_teranode_version(whole_node):
    node = whole_node
    node.run("backup")
    (node.dir / ".env").write_text("TERANODE_VERSION=v0.15.0\n")
    target_db = "other_version"
    proc = node.run("restore", "latest", "--target-dir", str(node.dir / "r"),
                    "--pg-dsn", node.pg_server.dsn_kv(target_db), check=2)
    assert "v0.14.2" in proc.stderr and "v0.15.0" in proc.stderr
    assert not (node.dir / "r").exists() and target_db not in databases(node.pg_server)
    node.run("restore", "latest", "--target-dir", str(node.dir / "r"), "--pg-dsn",
             node.pg_server.dsn_kv(target_db), "--force")


def test_catchingblocks_that_never_ends_fails_and_leaves_node_alone(whole_node):
    node = whole_node
    (node.fake_dir / "fsm_state").write_text("CATCHINGBLOCKS\n")
    (node.fake_dir / "catching_polls").write_text("never\n")
    proc = node.run("backup", check=1)
    assert "CATCHINGBLOCKS" in proc.stderr
    assert fake_log(node) == []  # no setfsmstate, no stop
    assert node.run("snapshots", json_out=True).doc["snapshots"] == []


def test_failing_source_still_resumes_the_node(whole_node):
    node = whole_node
    node.env["PGPASSWORD"] = "wrong-password"
    proc = node.run("backup", check=1)
    assert "wrong-password" not in proc.stderr
    log = fake_log(node)
    assert log[-2:] == ["compose start " + " ".join(SERVICES), "teranode-cli setfsmstate running -> RUNNING"]
    assert (node.fake_dir / "fsm_state").read_text().strip() == "RUNNING"


def tamper_cases():
    return ["renamed-tx", "flipped-block", "missing-subtree", "deleted-row", "relinked-row"]


@pytest.mark.parametrize("case", tamper_cases())
def test_tampering_is_caught_and_named(whole_node, case):
    node = whole_node
    data = node.data
    name = None
    if case == "renamed-tx":
        tx = next((node.data_dir / "external").rglob("*.tx"))
        bogus = tx.with_name("ab" * 32 + ".tx")
        tx.rename(bogus)
        for side in tx.parent.glob(tx.name + ".*"):
            side.unlink()
        name = bogus.name
    elif case == "flipped-block":
        block = data.block_files[data.chain[3].hash_hex]
        raw = bytearray(block.read_bytes())
        raw[40] ^= 1  # inside the 80-byte header (after the 8-byte magic)
        block.write_bytes(bytes(raw))
        name = block.name
    elif case == "missing-subtree":
        roots = [r for roots in data.block_subtrees.values() for r in roots]
        victim = next((node.data_dir / "subtreestore").rglob(roots[-1] + ".subtree"))
        for side in victim.parent.glob(victim.name + "*"):
            side.unlink()
        name = roots[-1]
    elif case == "deleted-row":
        db = node.pg_db.rsplit("/", 1)[1]
        node.pg_server.execute("ALTER TABLE blocks DROP CONSTRAINT blocks_parent_id_fkey", dbname=db)
        node.pg_server.execute("DELETE FROM blocks WHERE height = 3", dbname=db)
        name = "height 4"
    elif case == "relinked-row":
        node.pg_server.execute("UPDATE blocks SET parent_id = 1 WHERE height = 4", dbname=node.pg_db.rsplit("/", 1)[1])
        name = "height 4"
    node.run("backup")
    proc = node.run("verify", "--drill", json_out=True, check=1)
    findings = proc.doc["findings"]
    assert not proc.doc["ok"]
    text = " | ".join(f"{f['subject']}: {f['problem']}" for f in findings)
    assert name in text, text


def test_shared_fixtures_pass_the_checks_after_a_round_trip(tmp_path, fixtures_dir):
    data_dir = tmp_path / "node"
    shutil.copytree(fixtures_dir / "teranode", data_dir / "fixtures")
    for path in (data_dir / "fixtures").rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    cfg = write_node_config(tmp_path / "drtool.toml", data_dir, f"file://{tmp_path / 'repo'}")
    text = cfg.read_text().replace('external = "external"\nsubtreestore = "subtreestore"\nblockstore = "blockstore"',
                                   'fixtures = "fixtures"').replace('paths = ["p2p.key"]', "paths = []")
    cfg.write_text(text)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    node = Node(tmp_path, data_dir, cfg, f"file://{tmp_path / 'repo'}", env)
    node.run("backup")
    done = node.run("restore", "latest", "--target-dir", str(tmp_path / "r"), json_out=True).doc
    assert done["ok"] and not [f for f in done["findings"] if f["severity"] == "error"]
    # ...and a byte altered in a fixture is caught on the way back.
    block = next((data_dir / "fixtures").rglob("*.block"))
    raw = bytearray(block.read_bytes())
    raw[10] ^= 0x01
    block.write_bytes(bytes(raw))
    node.run("backup")
    proc = node.run("restore", "latest", "--target-dir", str(tmp_path / "r2"), check=1)
    assert block.name in proc.stderr
    assert not (tmp_path / "r2").exists()
