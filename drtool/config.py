"""drtool.toml: typed, strict configuration.

Every problem is one line naming the file, the section and the key:
    drtool.toml: [repository] url: missing required value
Environment variables DRTOOL_<SECTION>_<KEY> override the file (lists and tables as JSON).
A missing section means that source is not backed up.
"""

from __future__ import annotations

import json
import logging
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drtool import secrets
from drtool.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_CONFIG = "drtool.toml"
QUIESCE_MODES = ("none", "stop", "offline")
AEROSPIKE_ENGINES = ("tool", "native")

REQUIRED = object()  # marks a key without a default

# Secrets that come only from the environment, never from the file (and are not overrides).
ENV_SECRETS = ("DRTOOL_AEROSPIKE_PASSWORD", "DRTOOL_ENCRYPTION_KEY")

# section -> key -> (type, default). Types: str, int, float, bool, "list[str]", "table[str]".
SCHEMA: dict[str, dict[str, tuple[Any, Any]]] = {
    "node": {
        "name": (str, "teranode"),
        "data_dir": (str, REQUIRED),
        "quiesce": (str, "none"),
        "teranode_cli": ("list[str]", ["docker", "exec", "blockchain", "teranode-cli"]),
        "stop_command": ("list[str]", []),
        "start_command": ("list[str]", []),
        "max_quiesce": (str, "30m"),
        "catchingblocks_wait": (str, "10m"),
        "state_dir": (str, ""),
        "teranode_settings": (str, ""),
        "settings_context": (str, ""),
        "env_file": (str, ""),
    },
    "repository": {
        "url": (str, REQUIRED),
        "endpoint_url": (str, ""),
        "region": (str, ""),
        # Teranode's files are mostly hashes and signatures, which no entropy coder shrinks: zstd's
        # fast level -1 (matches only) stores the real fixtures within 0.5 % of level 1 and the
        # sample node's subtrees at the same size, 1.5x faster (docs/architecture.md).
        "compression_level": (int, -1),
        "sse": (str, ""),
        "sse_kms_key_id": (str, ""),
        "restic_path": (str, "restic"),
        "lock_wait": (str, "10m"),
        "encryption_key_file": (str, ""),
    },
    "postgres": {
        "dsn": (str, REQUIRED),
        "pg_dump": (str, ""),
        "pg_restore": (str, ""),
        "jobs": (int, 1),
        "compression_level": (int, 1),
    },
    "aerospike": {
        "hosts": ("list[str]", REQUIRED),
        "namespace": (str, "utxo-store"),
        "set": (str, ""),
        "engine": (str, "tool"),
        "command": ("list[str]", []),
        "timeout": (int, 600),
        "compression_level": (int, 1),  # asbackup's text (base64 values) needs level >= 1's entropy coding
        "parallel": (int, 0),
        "user": (str, ""),
        "extra_args": ("list[str]", []),
        "incremental": (bool, False),
        "full_every": (int, 6),
    },
    "blobstores": {},  # a table of name = path, checked below
    "files": {
        "paths": ("list[str]", []),
    },
    "policy": {
        "file": (str, ""),
    },
}


@dataclass
class NodeConfig:
    name: str
    data_dir: Path
    quiesce: str
    teranode_cli: list[str]
    stop_command: list[str]
    start_command: list[str]
    max_quiesce: str
    state_dir: Path
    catchingblocks_wait: str = "10m"
    teranode_settings: Path | None = None  # Teranode's settings.conf: utxoBatchSize, stores
    settings_context: str = ""
    env_file: Path | None = None  # the compose .env: TERANODE_VERSION


@dataclass
class RepositoryConfig:
    url: str
    endpoint_url: str
    region: str
    compression_level: int
    sse: str
    sse_kms_key_id: str
    restic_path: str
    lock_wait: str = "10m"
    encryption_key_file: str = ""  # client-side AES-256-GCM of every object (native engine)

    @property
    def lock_wait_seconds(self) -> float:
        from drtool.policy import parse_duration

        return parse_duration(self.lock_wait).total_seconds()


@dataclass
class PostgresConfig:
    dsn: str
    pg_dump: str
    pg_restore: str
    jobs: int
    compression_level: int = 1  # pg_dump's hex text: zstd 1 compresses it as well as 3, 4x faster


@dataclass
class AerospikeConfig:
    hosts: list[str]
    namespace: str
    set: str
    engine: str
    command: list[str]
    timeout: int
    parallel: int
    user: str
    extra_args: list[str]
    incremental: bool = False  # records modified since the parent snapshot, plus the live digest set
    full_every: int = 6        # incrementals before the next full backup
    compression_level: int = 1


@dataclass
class Config:
    path: Path
    node: NodeConfig
    repository: RepositoryConfig
    blobstores: dict[str, Path] = field(default_factory=dict)  # name -> absolute path
    files: list[Path] = field(default_factory=list)
    postgres: PostgresConfig | None = None
    aerospike: AerospikeConfig | None = None
    policy_file: Path | None = None

    def sources(self) -> list[str]:
        """The sources this configuration backs up, in snapshot order."""
        out = []
        if self.postgres:
            out.append("postgres")
        if self.aerospike:
            out.append("aerospike")
        if self.blobstores:
            out.append("blobstores")
        if self.files:
            out.append("files")
        return out


def _check_type(where: str, value: Any, kind: Any) -> Any:
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {_show(value)}")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {_show(value)}")
        value = float(value)
    elif kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {_show(value)}")
    elif kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {_show(value)}")
    elif kind == "list[str]":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected a list of strings, got {_show(value)}")
    return value


def _show(value: Any) -> str:
    text = secrets.redact(repr(value))
    return text if len(text) <= 60 else text[:57] + "..."


def _env_value(raw: str, kind: Any, where: str) -> Any:
    """Environment overrides are strings; lists and tables come as JSON."""
    if kind is str:
        return raw
    if kind is int:
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {_show(raw)}") from None
    if kind is bool:
        if raw.lower() in ("1", "true", "yes"):
            return True
        if raw.lower() in ("0", "false", "no"):
            return False
        raise ConfigError(f"{where}: expected true or false, got {_show(raw)}")
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        raise ConfigError(f"{where}: expected JSON (a list or table), got {_show(raw)}") from None


def _apply_env(data: dict[str, Any], env: dict[str, str], name: str) -> None:
    for var, raw in env.items():
        if not var.startswith("DRTOOL_") or var in ("DRTOOL_CONFIG", *ENV_SECRETS) or var.startswith("DRTOOL_TEST"):
            continue
        rest = var[len("DRTOOL_"):].lower()
        for section in SCHEMA:
            if rest.startswith(section + "_"):
                key = rest[len(section) + 1:]
                where = f"environment {var} ([{section}] {key})"
                if section == "blobstores":
                    data.setdefault(section, {})[key] = raw
                elif key in SCHEMA[section]:
                    data.setdefault(section, {})[key] = _env_value(raw, SCHEMA[section][key][0], where)
                else:
                    raise ConfigError(f"{where}: unknown key")
                break


def parse(data: dict[str, Any], path: Path, env: dict[str, str] | None = None) -> Config:
    """Validate a TOML document (already parsed) and build a Config."""
    name = path.name
    env = dict(os.environ) if env is None else env
    _apply_env(data, env, name)
    for section in data:
        if section not in SCHEMA:
            raise ConfigError(f"{name}: [{section}]: unknown section")
        if not isinstance(data[section], dict):
            raise ConfigError(f"{name}: {section}: expected a [{section}] table")
    values: dict[str, dict[str, Any]] = {}
    for section, keys in SCHEMA.items():
        if section not in data or section == "blobstores":
            continue
        given = data[section]
        for key in given:
            if key not in keys:
                raise ConfigError(f"{name}: [{section}] {key}: unknown key")
        out = {}
        for key, (kind, default) in keys.items():
            where = f"{name}: [{section}] {key}"
            if key in given:
                out[key] = _check_type(where, given[key], kind)
            elif default is REQUIRED:
                raise ConfigError(f"{where}: missing required value")
            else:
                out[key] = list(default) if isinstance(default, list) else default
        values[section] = out
    for section in ("node", "repository"):
        if section not in values:
            first = next(k for k, (_, d) in SCHEMA[section].items() if d is REQUIRED)
            raise ConfigError(f"{name}: [{section}] {first}: missing required value (no [{section}] section)")

    base = path.parent
    node = values["node"]
    if node["quiesce"] not in QUIESCE_MODES:
        raise ConfigError(f"{name}: [node] quiesce: expected one of {', '.join(QUIESCE_MODES)}, got {_show(node['quiesce'])}")
    if node["quiesce"] == "stop":
        for key in ("stop_command", "start_command", "teranode_cli"):
            if not node[key]:
                raise ConfigError(f"{name}: [node] {key}: required when quiesce = \"stop\"")
    from drtool.policy import parse_duration  # shared duration syntax ("30m", "6h")

    for key in ("max_quiesce", "catchingblocks_wait"):
        try:
            parse_duration(node[key])
        except (ValueError, ConfigError) as exc:
            raise ConfigError(f"{name}: [node] {key}: {exc}") from None
    data_dir = (base / os.path.expanduser(node["data_dir"])).resolve()
    state_dir = node["state_dir"] or str(Path.home() / ".local" / "state" / "drtool" / node["name"])
    node_cfg = NodeConfig(
        name=node["name"], data_dir=data_dir, quiesce=node["quiesce"], teranode_cli=node["teranode_cli"],
        stop_command=node["stop_command"], start_command=node["start_command"],
        max_quiesce=node["max_quiesce"], state_dir=(base / os.path.expanduser(state_dir)).resolve(),
        catchingblocks_wait=node["catchingblocks_wait"],
        teranode_settings=(base / node["teranode_settings"]).resolve() if node["teranode_settings"] else None,
        settings_context=node["settings_context"],
        env_file=(base / node["env_file"]).resolve() if node["env_file"] else None,
    )

    repo = values["repository"]
    url = repo["url"]
    scheme = url.split(":", 1)[0] if ":" in url else ""
    if scheme not in ("file", "s3", "restic") and not (url.startswith("/") or url.startswith(".")):
        raise ConfigError(f"{name}: [repository] url: unknown scheme {scheme!r} in {secrets.redact(url)!r} "
                          "(use file://, s3:// or restic:)")
    if scheme == "" :
        url = "file://" + str((base / url).resolve())
    _check_level(name, "repository", repo["compression_level"])
    try:
        parse_duration(repo["lock_wait"])
    except ValueError as exc:
        raise ConfigError(f"{name}: [repository] lock_wait: {exc}") from None
    if repo["sse"] not in ("", "AES256", "aws:kms"):
        raise ConfigError(f"{name}: [repository] sse: expected \"AES256\" or \"aws:kms\", got {_show(repo['sse'])}")
    if repo["encryption_key_file"]:
        if scheme == "restic":
            raise ConfigError(f"{name}: [repository] encryption_key_file: a restic repository encrypts by itself "
                              "(RESTIC_PASSWORD); leave this out")
        repo["encryption_key_file"] = str((base / os.path.expanduser(repo["encryption_key_file"])).resolve())
    repo_cfg = RepositoryConfig(**{**repo, "url": url})

    cfg = Config(path=path, node=node_cfg, repository=repo_cfg)
    for store, store_path in (data.get("blobstores") or {}).items():
        if not isinstance(store_path, str) or not store_path:
            raise ConfigError(f"{name}: [blobstores] {store}: expected a path (a string), got {_show(store_path)}")
        if not store.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"{name}: [blobstores] {store}: a store name must be letters, digits, - or _")
        cfg.blobstores[store] = (data_dir / os.path.expanduser(store_path)).resolve()
    if "files" in values:
        cfg.files = [(data_dir / os.path.expanduser(p)).resolve() for p in values["files"]["paths"]]
    if "postgres" in values:
        pg = values["postgres"]
        _check_level(name, "postgres", pg["compression_level"])
        secrets.register(_dsn_password(pg["dsn"]))
        cfg.postgres = PostgresConfig(**pg)
    if "aerospike" in values:
        aero = values["aerospike"]
        if aero["engine"] not in AEROSPIKE_ENGINES:
            raise ConfigError(f"{name}: [aerospike] engine: expected one of {', '.join(AEROSPIKE_ENGINES)}, got {_show(aero['engine'])}")
        if not aero["hosts"]:
            raise ConfigError(f"{name}: [aerospike] hosts: at least one host:port is required")
        _check_level(name, "aerospike", aero["compression_level"])
        cfg.aerospike = AerospikeConfig(**aero)
    if "policy" in values and values["policy"]["file"]:
        cfg.policy_file = (base / values["policy"]["file"]).resolve()
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "PGPASSWORD", "RESTIC_PASSWORD", *ENV_SECRETS):
        secrets.register(env.get(var))
    return cfg


def _check_level(name: str, section: str, level: int) -> None:
    """zstd levels 1..22, or its fast levels -7..-1 (matches only, no entropy coding: as small as
    level 1 on hashes and signatures, much larger on text such as pg_dump's hex)."""
    if not (1 <= level <= 22 or -7 <= level <= -1):
        raise ConfigError(f"{name}: [{section}] compression_level: expected 1..22 or a fast level -7..-1, got {level}")


def _dsn_password(dsn: str) -> str | None:
    try:
        from psycopg.conninfo import conninfo_to_dict

        return conninfo_to_dict(dsn).get("password")  # type: ignore[return-value]
    except Exception:
        return None


def load(path: str | Path | None = None, env: dict[str, str] | None = None) -> Config:
    """Read and validate drtool.toml (or $DRTOOL_CONFIG)."""
    env = dict(os.environ) if env is None else env
    path = Path(path or env.get("DRTOOL_CONFIG") or DEFAULT_CONFIG)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file (create one with `drtool init`)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path.name}: not valid TOML: {exc}") from None
    cfg = parse(data, path.resolve() if path.exists() else path, env)
    if cfg.postgres and _dsn_password(cfg.postgres.dsn) and path.stat().st_mode & 0o004:
        log.warning("%s holds a PostgreSQL password and is world-readable: chmod 600 it, or move the password "
                    "to PGPASSWORD / ~/.pgpass", path)
    return cfg


def render_toml(sections: dict[str, dict[str, Any]]) -> str:
    """Write a drtool.toml from plain values (used by `init` and `demo`)."""
    lines: list[str] = []
    for section, values in sections.items():
        if lines:
            lines.append("")
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string
