"""`drtool init`: a drtool.toml for a node, from Teranode's own settings when given."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from drtool import config as config_mod

QUICKSTART_SERVICES = ["blockchain", "asset", "rpc", "subtreevalidation", "blockvalidation",
                       "blockassembly", "propagation", "pruner"]


def render_config(*, settings_path: Path | None, context: str | None, data_dir: Path | None,
                  repo_url: str | None) -> tuple[str, list[str]]:
    """The drtool.toml text and the list of what was found in Teranode's settings."""
    found: list[str] = []
    stores: dict[str, Any] = {}
    if settings_path is not None:
        from drtool.teranode.settings import load_settings, stores_from_settings

        stores = stores_from_settings(load_settings(settings_path, context=context))
    data_dir = Path(data_dir or stores.get("data_dir") or "data").resolve()
    sections: dict[str, dict[str, Any]] = {
        "node": {
            "name": "teranode-1", "data_dir": str(data_dir), "quiesce": "stop",
            "teranode_cli": ["docker", "exec", "blockchain", "teranode-cli"],
            "stop_command": ["docker", "compose", "stop", *QUICKSTART_SERVICES],
            "start_command": ["docker", "compose", "start", *QUICKSTART_SERVICES],
            "max_quiesce": "30m",
        },
        "repository": {"url": repo_url or "file:///var/backups/drtool/teranode-1", "compression_level": -1},
    }
    if stores.get("postgres_dsn"):
        sections["postgres"] = {"dsn": stores["postgres_dsn"]}
        found.append("postgres")
    if stores.get("aerospike"):
        aero = stores["aerospike"]
        sections["aerospike"] = {"hosts": aero["hosts"], "namespace": aero["namespace"],
                                 **({"set": aero["set"]} if aero.get("set") else {})}
        found.append("aerospike")
    blob = {}
    for name, path in (stores.get("blobstores") or {}).items():
        path = Path(path)
        try:
            blob[name] = str(path.relative_to(data_dir))
        except ValueError:
            blob[name] = str(path)
        found.append(f"blobstore {name}")
    if not settings_path:
        blob = {"external": "external", "subtreestore": "subtreestore", "blockstore": "blockstore"}
    if blob:
        sections["blobstores"] = blob
    sections["files"] = {"paths": ["p2p.key"]}
    text = config_mod.render_toml(sections)
    header = ["# drtool configuration (see docs/cli.md). Passwords never go here: use PGPASSWORD or",
              "# ~/.pgpass for PostgreSQL, the AWS credential chain for S3."]
    if stores.get("postgres_password"):
        header.append("# Teranode's settings hold a PostgreSQL password: put it in ~/.pgpass or PGPASSWORD.")
    for name, url in (stores.get("skipped") or {}).items():
        header.append(f"# not backed up as a folder: {name} = {url}")
    if stores.get("utxo_batch_size"):
        header.append(f"# utxostore_utxoBatchSize = {stores['utxo_batch_size']} (recorded in every snapshot)")
    return "\n".join(header) + "\n\n" + text, found
