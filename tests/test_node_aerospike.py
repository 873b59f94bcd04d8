"""The UTXO store in a node snapshot through the CLI, with a real child process standing in for
asbackup/asrestore (tests/data/fake_asbackup.py: no Aerospike server or tool can be installed
here; tests/test_aerospike_server.py runs the real thing when DRTOOL_TEST_AEROSPIKE is set)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.node import write_node_config

FAKE = Path(__file__).parent / "data" / "fake_asbackup.py"


def setup_node(local_node, tmp_path, records=300):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "asbackup").symlink_to(FAKE)
    (bindir / "asrestore").symlink_to(FAKE)
    write_node_config(local_node.config, local_node.data_dir, local_node.repo_url, extra={
        "aerospike": {"hosts": ["127.0.0.1:3000"], "namespace": "test", "command": [str(bindir / "asbackup")]}})
    local_node.env["FAKE_AS_RECORDS"] = str(records)
    local_node.env["FAKE_AS_BLOB"] = "200"
    local_node.env["DRTOOL_AEROSPIKE_PASSWORD"] = "utxo-secret-pw"
    return local_node


def test_utxo_store_backup_and_restore(local_node, tmp_path):
    node = setup_node(local_node, tmp_path)
    doc = node.run("backup", json_out=True).doc
    aero = doc["snapshot"]["sources"]["aerospike"]
    assert aero["records"] == 300 and aero["record_counts"] == {"fake": 300}
    assert aero["tool"] == "asbackup" and "4.5.8" in aero["tool_version"]
    assert "utxo-secret-pw" not in json.dumps(doc)

    proc = node.run("restore", "latest", "--only", "aerospike", check=2)
    assert "--aerospike HOST:PORT" in proc.stderr

    stdin_file = tmp_path / "restored-stdin"
    node.env["FAKE_AS_STDIN_FILE"] = str(stdin_file)
    node.env["FAKE_AS_ARGS_FILE"] = str(tmp_path / "args.json")
    done = node.run("restore", "latest", "--only", "aerospike", "--aerospike", "127.0.0.2:3000", json_out=True).doc
    assert done["ok"]
    size, sha = stdin_file.read_text().split()
    assert int(size) == aero["size"] and sha == aero["sha256"]
    argv = json.loads((tmp_path / "args.json").read_text())["argv"]
    assert "--input-file" in argv and "127.0.0.2:3000" in " ".join(argv)
    assert "utxo-secret-pw" not in " ".join(argv)


def test_failing_tool_leaves_no_snapshot(local_node, tmp_path):
    node = setup_node(local_node, tmp_path)
    node.env["FAKE_AS_MODE"] = "fail"
    proc = node.run("backup", check=1)
    assert "asbackup" in proc.stderr
    assert node.run("snapshots", json_out=True).doc["snapshots"] == []
