"""drtool.toml: strict parsing, one-line errors naming file, section and key; env overrides."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from drtool import config
from drtool.errors import ConfigError

BASE = """
[node]
name = "n1"
data_dir = "data"

[repository]
url = "file:///tmp/repo"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "drtool.toml"
    path.write_text(text)
    return path


def load_error(tmp_path: Path, text: str, env: dict | None = None) -> str:
    with pytest.raises(ConfigError) as exc:
        config.load(write(tmp_path, text), env=env or {})
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_valid_config_resolves_paths(tmp_path):
    cfg = config.load(write(tmp_path, BASE + '[blobstores]\nexternal = "external"\nblocks = "/abs/blocks"\n'), env={})
    assert cfg.node.data_dir == tmp_path / "data"
    assert cfg.blobstores == {"external": tmp_path / "data" / "external", "blocks": Path("/abs/blocks")}
    assert cfg.sources() == ["blobstores"]
    assert cfg.postgres is None and cfg.aerospike is None


@pytest.mark.parametrize("text, expected", [
    (BASE + "[repository]\n", "not valid TOML"),
    (BASE.replace('url = "file:///tmp/repo"', 'url = "file:///tmp/repo"\ncolour = "red"'), "drtool.toml: [repository] colour: unknown key"),
    (BASE + "[spare]\nx = 1\n", "drtool.toml: [spare]: unknown section"),
    (BASE.replace('url = "file:///tmp/repo"', 'url = "ftp://host/x"'), "drtool.toml: [repository] url: unknown scheme 'ftp'"),
    (BASE.replace('url = "file:///tmp/repo"', 'url = "file:///r"\ncompression_level = "high"'), "drtool.toml: [repository] compression_level: expected an integer"),
    (BASE.replace('url = "file:///tmp/repo"\n', ''), "drtool.toml: [repository] url: missing required value"),
    ('[repository]\nurl = "file:///r"\n', "drtool.toml: [node] data_dir: missing required value"),
    (BASE.replace('name = "n1"', 'name = "n1"\nquiesce = "pause"'), "drtool.toml: [node] quiesce: expected one of"),
    (BASE.replace('name = "n1"', 'name = "n1"\nquiesce = "stop"'), "[node] stop_command: required when quiesce"),
    (BASE.replace('name = "n1"', 'name = "n1"\nmax_quiesce = "soon"'), "drtool.toml: [node] max_quiesce:"),
    (BASE + "[postgres]\n", "drtool.toml: [postgres] dsn: missing required value"),
    (BASE + '[aerospike]\nhosts = ["h:3000"]\nengine = "magic"\n', "drtool.toml: [aerospike] engine: expected one of"),
    (BASE + "[blobstores]\nexternal = 3\n", "drtool.toml: [blobstores] external: expected a path"),
    (BASE + '[files]\npaths = "p2p.key"\n', "drtool.toml: [files] paths: expected a list of strings"),
    (BASE.replace('url = "file:///tmp/repo"', 'url = "file:///r"\ncompression_level = 0'),
     "drtool.toml: [repository] compression_level: expected 1..22 or a fast level -7..-1, got 0"),
    (BASE.replace('url = "file:///tmp/repo"', 'url = "file:///r"\ncompression_level = -8'),
     "drtool.toml: [repository] compression_level: expected 1..22 or a fast level -7..-1, got -8"),
    (BASE + '[postgres]\ndsn = "dbname=t"\ncompression_level = 23\n', "drtool.toml: [postgres] compression_level: expected 1..22"),
    (BASE + '[aerospike]\nhosts = ["h:3000"]\ncompression_level = 0\n', "drtool.toml: [aerospike] compression_level: expected 1..22"),
])
def test_bad_config_names_file_section_and_key(tmp_path, text, expected):
    assert expected in load_error(tmp_path, text)


def test_compression_levels_default_to_fast_for_blobs_and_1_for_text_streams(tmp_path):
    """Blob packs at zstd's fast level -1 (hashes do not entropy-code); the pg_dump and asbackup
    streams, which are text, at level 1; any level can be set, fast ones included."""
    cfg = config.load(write(tmp_path, BASE + '[postgres]\ndsn = "dbname=t"\n[aerospike]\nhosts = ["h:3000"]\n'), env={})
    assert (cfg.repository.compression_level, cfg.postgres.compression_level, cfg.aerospike.compression_level) == (-1, 1, 1)
    cfg = config.load(write(tmp_path, BASE.replace('url = "file:///tmp/repo"', 'url = "file:///r"\ncompression_level = -7')), env={})
    assert cfg.repository.compression_level == -7


def test_environment_overrides(tmp_path):
    env = {"DRTOOL_REPOSITORY_URL": "s3://bucket/prefix", "DRTOOL_NODE_QUIESCE": "offline",
           "DRTOOL_FILES_PATHS": '["p2p.key", "/etc/teranode/.env"]', "DRTOOL_BLOBSTORES_EXTERNAL": "ext"}
    cfg = config.load(write(tmp_path, BASE), env=env)
    assert cfg.repository.url == "s3://bucket/prefix"
    assert cfg.node.quiesce == "offline"
    assert cfg.files == [tmp_path / "data" / "p2p.key", Path("/etc/teranode/.env")]
    assert cfg.blobstores == {"external": tmp_path / "data" / "ext"}


def test_environment_override_errors_name_the_variable(tmp_path):
    message = load_error(tmp_path, BASE, env={"DRTOOL_REPOSITORY_COMPRESSION_LEVEL": "lots"})
    assert "DRTOOL_REPOSITORY_COMPRESSION_LEVEL" in message
    message = load_error(tmp_path, BASE, env={"DRTOOL_REPOSITORY_COLOUR": "red"})
    assert "DRTOOL_REPOSITORY_COLOUR" in message and "unknown key" in message


def test_dsn_password_never_in_errors(tmp_path):
    text = BASE + '[postgres]\ndsn = "postgresql://teranode:hunter2secret@db:5432/teranode"\njobs = "many"\n'
    message = load_error(tmp_path, text)
    assert "hunter2secret" not in message
    text = BASE + '[postgres]\ndsn = 5\n'
    assert "expected a string" in load_error(tmp_path, text)


def run_cli(tmp_path: Path, *args: str, env_extra: dict | None = None, timeout: float = 60):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "drtool.cli", *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=timeout)


def test_cli_exit_code_2_on_bad_config(tmp_path):
    write(tmp_path, BASE + "[spare]\n")
    proc = run_cli(tmp_path, "--json", "snapshots")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("drtool: error: drtool.toml: [spare]")
    assert '"ok": false' in proc.stdout


def test_cli_missing_config(tmp_path):
    proc = run_cli(tmp_path, "snapshots")
    assert proc.returncode == 2 and "drtool.toml: no such configuration file" in proc.stderr


def test_unreachable_s3_endpoint_fails_fast_and_clearly(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    write(tmp_path, BASE.replace('url = "file:///tmp/repo"', f'url = "s3://bucket/x"\nendpoint_url = "http://127.0.0.1:{port}"'))
    started = time.monotonic()
    proc = run_cli(tmp_path, "snapshots", env_extra={"AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEY123", "AWS_SECRET_ACCESS_KEY": "verysecretkeyvalue"})
    assert time.monotonic() - started < 60
    assert proc.returncode in (1, 2)
    assert f"127.0.0.1:{port}" in proc.stderr or "bucket" in proc.stderr
    assert "verysecretkeyvalue" not in proc.stderr + proc.stdout
    assert len(proc.stderr.strip().splitlines()) == 1


def test_init_from_teranode_settings(tmp_path):
    settings = tmp_path / "settings.conf"
    settings.write_text(
        "DATADIR = ./data\n"
        "blockchain_store = postgres://teranode:s3cretpw@postgres:5432/teranode\n"
        "utxostore = aerospike://aerospike:3000/utxo-store?set=utxo&externalStore=file://${DATADIR}/external\n"
        "subtreestore = file://${DATADIR}/subtreestore\n"
        "blockstore = file://${DATADIR}/blockstore?hashPrefix=-2\n"
        "txstore = null:///\n"
        "subtreestore.docker.m = file://${DATADIR}/subtrees-docker\n")
    (tmp_path / "settings_local.conf").write_text("blockstore = file://${DATADIR}/blocks-local?hashPrefix=-2\n")
    proc = run_cli(tmp_path, "init", "--from-teranode", str(settings), "--context", "docker.m",
                   "--repository", "file:///backups/n1")
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "drtool.toml").read_text()
    assert "s3cretpw" not in text
    cfg = config.load(tmp_path / "drtool.toml", env={})
    data = (tmp_path / "data").resolve()
    assert cfg.blobstores["subtreestore"] == data / "subtrees-docker"
    assert cfg.blobstores["blockstore"] == data / "blocks-local"
    assert cfg.blobstores["external"] == data / "external"
    assert "txstore" not in cfg.blobstores
    assert cfg.postgres and "postgres:5432/teranode" in cfg.postgres.dsn
    assert cfg.aerospike and cfg.aerospike.namespace == "utxo-store"
    assert run_cli(tmp_path, "init", "--from-teranode", str(settings)).returncode == 2  # exists, no --force
