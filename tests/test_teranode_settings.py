"""Teranode settings: files, contexts, local overrides, environment, ${} references, stores."""

from __future__ import annotations

from pathlib import Path

import pytest

from drtool.errors import ConfigError
from drtool.secrets import redact
from drtool.teranode.settings import load_settings, stores_from_settings

REAL = Path(__file__).parent / "data" / "teranode_settings" / "settings.conf"


def _write(folder: Path, text: str, local: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "settings.conf").write_text(text)
    if local is not None:
        (folder / "settings_local.conf").write_text(local)
    return folder / "settings.conf"


BASE = """\
# comment line
DATADIR          = /srv/data
DATADIR.docker   = /app/data
port             = 5432 # inline comment
name             = "quoted value"
x                = base
x.docker         = docker
x.docker.m       = docker-m
ref              = ${DATADIR}/sub/${x}
"""


def test_context_resolution_right_to_left(tmp_path):
    path = _write(tmp_path, BASE)
    assert load_settings(path, "docker.m", env={}).get("x") == "docker-m"
    assert load_settings(path, "docker.other", env={}).get("x") == "docker"
    assert load_settings(path, "operator", env={}).get("x") == "base"
    assert load_settings(path, env={"SETTINGS_CONTEXT": "docker"}).get("x") == "docker"
    s = load_settings(path, env={})
    assert s.context == "dev"  # gocore's default context
    assert (s.get("port"), s.get("name"), s.get("missing"), s.get("missing", "d")) == ("5432", "quoted value", None, "d")


def test_local_overrides_env_over_everything_and_expansion(tmp_path):
    path = _write(tmp_path, BASE, local="x.docker.m = local-m\nDATADIR.docker = /local/data\n")
    s = load_settings(path, "docker.m", env={})
    assert s.get("x") == "local-m"
    assert s.get("ref") == "/local/data/sub/local-m"
    assert s.files == [path, path.with_name("settings_local.conf")]
    s = load_settings(path, "docker.m", env={"x": "from-env", "DATADIR": "/env"})
    assert s.get("x") == "from-env"
    assert s.get("ref") == "/env/sub/from-env"
    assert "environment" in s.where("x")


def test_bad_references_and_missing_file(tmp_path):
    path = _write(tmp_path, "a = ${b}\nb = ${a}\nc = ${nope}\n")
    s = load_settings(path, env={})
    with pytest.raises(ConfigError, match="refers to itself"):
        s.get("a")
    with pytest.raises(ConfigError, match=r"c refers to \$\{nope\}, which is not set"):
        s.get("c")
    with pytest.raises(ConfigError, match="settings file not found"):
        load_settings(tmp_path / "nowhere" / "settings.conf", env={})


def test_stores_from_small_settings(tmp_path):
    path = _write(
        tmp_path,
        """\
DATADIR = /data
utxostore = aerospike://as1:3000,as2:3000/utxo-store?set=utxo&externalStore=file://${DATADIR}/external%3FhashPrefix=2
subtreestore = file://${DATADIR}/subtreestore
blockstore = file://${DATADIR}/blockstore?hashPrefix=-2
txstore = null:///
blockchain_store = postgres://tn:s3cr3tpw@db:5433/teranode?sslmode=disable
utxostore_utxoBatchSize = 256
""",
    )
    stores = stores_from_settings(load_settings(path, env={}))
    assert stores["blobstores"] == {
        "subtreestore": Path("/data/subtreestore"),
        "blockstore": Path("/data/blockstore"),
        "external": Path("/data/external"),
    }
    assert stores["blobstore_details"]["external"]["hash_prefix"] == 2
    assert stores["blobstore_details"]["blockstore"]["hash_prefix"] == -2
    assert stores["skipped"] == {"txstore": "null:///"}
    assert stores["aerospike"] == {"hosts": ["as1:3000", "as2:3000"], "namespace": "utxo-store", "set": "utxo"}
    assert stores["postgres_dsn"] == "postgresql://tn@db:5433/teranode?sslmode=disable"
    assert stores["postgres_password"] == "s3cr3tpw"
    assert "s3cr3tpw" not in redact("password is s3cr3tpw")  # registered as a secret
    assert stores["utxo_batch_size"] == 256
    assert stores["data_dir"] == Path("/data")


def test_bad_batch_size_names_key_and_file(tmp_path):
    path = _write(tmp_path, "utxostore_utxoBatchSize = lots\n")
    with pytest.raises(ConfigError, match=r"settings.conf:1: utxostore_utxoBatchSize 'lots'"):
        stores_from_settings(load_settings(path, env={}))


def test_real_settings_quickstart_context():
    """The quick-start: SETTINGS_CONTEXT=docker.m, DATADIR=/app/data from the environment."""
    s = load_settings(REAL, env={"SETTINGS_CONTEXT": "docker.m", "DATADIR": "/app/data"})
    stores = stores_from_settings(s)
    assert stores["blobstores"] == {
        "subtreestore": Path("/app/data/subtreestore"),
        "blockstore": Path("/app/data/blockstore"),
        "external": Path("/app/data/external"),
    }
    assert stores["aerospike"] == {"hosts": ["aerospike:3000"], "namespace": "utxo-store", "set": "utxo"}
    assert stores["postgres_dsn"] == "postgresql://teranode@postgres:5432/teranode"
    assert stores["utxo_batch_size"] == 512
    assert stores["skipped"] == {"txstore": "null:///"}
    # real syntax: inline comments, empty values, quotes
    assert s.get("ALERT_P2P_PORT") == "9908"
    assert s.get("coinbase_grpcAddress") == ""
    assert s.get("legacy_config_Listeners") == "0.0.0.0"
    assert s.get("network") == "regtest"  # network.docker, "# used by ..." cut off in .dev


def test_real_settings_dev_context_relative_datadir():
    s = load_settings(REAL, env={})
    stores = stores_from_settings(s)
    base = REAL.parent.resolve()
    assert stores["data_dir"] == base / "data"
    assert stores["blobstores"] == {"subtreestore": base / "data/subtreestore", "blockstore": base / "data/blockstore"}
    assert stores["blobstore_details"]["blockstore"]["ttl_paths"] == ["./data/blockstore-ttl"]
    assert stores["aerospike"] is None and stores["skipped"]["utxostore"] == "sqlite:///utxostore"
    assert stores["utxo_batch_size"] == 128
    # docker context: blockchain_store needs ${blockchainDBUserPwd}, which is not set
    with pytest.raises(ConfigError, match="blockchainDBUserPwd"):
        stores_from_settings(load_settings(REAL, "docker", env={}))
