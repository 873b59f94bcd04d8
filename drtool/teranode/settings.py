"""Reading Teranode's settings the way Teranode does (its gocore configuration).

- `settings.conf`, then the sibling `settings_local.conf` (local overrides win);
- a line is `key = value` or `key.context = value`; everything after a `#` is a comment
  (gocore cuts the line at the first `#`, inside values too); a value wrapped in double
  quotes loses them;
- the context is the argument, else SETTINGS_CONTEXT, else `dev` (gocore's default); a key
  resolves by dropping context parts right to left: `x.docker.m`, `x.docker`, `x`;
- an environment variable named like the key wins over every file;
- `${NAME}` is replaced by the setting (or environment variable) NAME, resolved the same way.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from drtool.errors import ConfigError
from drtool.secrets import redact, register
from drtool.teranode.filetypes import DEFAULT_HASH_PREFIX

log = logging.getLogger(__name__)

LOCAL_FILE = "settings_local.conf"
DEFAULT_CONTEXT = "dev"
_REF = re.compile(r"\$\{(.*?)\}")
_MAX_EXPANSION_DEPTH = 32

# settings key -> blob store name; the external store hides inside `utxostore`
BLOB_STORE_KEYS = {"subtreestore": "subtreestore", "blockstore": "blockstore", "txstore": "txstore"}


def _read_conf(path: Path, into: dict[str, str], origin: dict[str, str]) -> None:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason})") from exc
    for lineno, line in enumerate(text.split("\n"), 1):
        line = line.split("#", 1)[0]
        key, eq, value = line.partition("=")
        if not eq:
            continue
        key, value = key.strip(), value.strip()
        if not key:
            log.debug("%s:%d: no key before '=', ignored", path, lineno)
            continue
        if len(value) > 2 and value[0] == '"' and value[-1] == '"':
            value = value[1:-1]
        into[key] = value
        origin[key] = f"{path}:{lineno}"


@dataclass
class Settings:
    values: dict[str, str]  # every `key[.context]` read, local overrides applied
    context: str
    env: Mapping[str, str] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    origin: dict[str, str] = field(default_factory=dict)  # key -> "file:line"

    def lookup(self, key: str) -> tuple[str, str] | None:
        """(raw value, where it came from) before `${}` expansion; None when unset."""
        if key in self.env:
            return self.env[key], f"environment variable {key}"
        k = f"{key}.{self.context}" if self.context else key
        while True:
            if k in self.values:
                return self.values[k], self.origin.get(k, k)
            if "." not in k or k == key:
                return None
            k = k.rsplit(".", 1)[0]

    def get(self, key: str, default: str | None = None) -> str | None:
        """The value of `key` in this context, `${}` references expanded."""
        found = self.lookup(key)
        if found is None:
            return default
        return self._expand(key, found[0], found[1], ())

    def _expand(self, key: str, value: str, where: str, chain: tuple[str, ...]) -> str:
        if len(chain) > _MAX_EXPANSION_DEPTH or key in chain:
            raise ConfigError(f"{where}: {key} refers to itself through {' -> '.join(chain + (key,))}")

        def repl(m: re.Match) -> str:
            name = m.group(1)
            found = self.lookup(name)
            if found is None:
                raise ConfigError(f"{where}: {key} refers to ${{{name}}}, which is not set")
            return self._expand(name, found[0], found[1], chain + (key,))

        return _REF.sub(repl, value)

    def where(self, key: str) -> str:
        found = self.lookup(key)
        return found[1] if found else f"{key} (unset)"


def load_settings(
    settings_path: str | os.PathLike, context: str | None = None, env: Mapping[str, str] = os.environ
) -> Settings:
    """Teranode's settings from `settings_path` (`settings.conf`) and its sibling
    `settings_local.conf` when present."""
    path = Path(settings_path)
    values: dict[str, str] = {}
    origin: dict[str, str] = {}
    files = []
    for p in (path, path.with_name(LOCAL_FILE)):
        try:
            _read_conf(p, values, origin)
        except FileNotFoundError:
            if p == path:
                raise ConfigError(f"{path}: Teranode settings file not found") from None
            continue
        except IsADirectoryError:
            raise ConfigError(f"{p}: is a folder, not a Teranode settings file") from None
        files.append(p)
    if context is None:
        context = env.get("SETTINGS_CONTEXT") or DEFAULT_CONTEXT
    return Settings(values, context, dict(env), files, origin)


# --- store locations -----------------------------------------------------------------


def _file_store(url: str, where: str, base_dir: Path, default_prefix: int) -> dict:
    """`file://PATH?hashPrefix=N&...` -> path, hash prefix and the local TTL store paths."""
    rest = url[len("file://") :]
    path_part, _, query = rest.partition("?")
    if not path_part:
        raise ConfigError(f"{where}: {redact(url)} has no path")
    params = parse_qs(query, keep_blank_values=True)
    prefix = default_prefix
    if "hashPrefix" in params:
        try:
            prefix = int(params["hashPrefix"][0])
        except ValueError:
            raise ConfigError(f"{where}: hashPrefix in {redact(url)} is not an integer") from None
    # A relative path (file://./data/x) is relative to where Teranode runs: the folder of
    # its settings.conf.
    path = Path(unquote(path_part))
    if not path.is_absolute():
        path = (base_dir / path).resolve()
    ttl = [p.strip() for v in params.get("localTTLStorePath", []) for p in v.split("|") if p.strip()]
    return {"path": path, "hash_prefix": prefix, "url": redact(url), "ttl_paths": ttl}


def _postgres(url: str) -> tuple[str, str | None]:
    """postgres://user:pass@host:port/db?x -> (postgresql://user@host:port/db?x, pass)."""
    parts = urlsplit(url)
    password = unquote(parts.password) if parts.password else None
    register(password)
    netloc = parts.hostname or ""
    if parts.port:
        netloc = f"{netloc}:{parts.port}"
    if parts.username:
        netloc = f"{parts.username}@{netloc}"
    dsn = f"postgresql://{netloc}{parts.path}" + (f"?{parts.query}" if parts.query else "")
    return dsn, password


def _aerospike(url: str) -> dict:
    rest = url[len("aerospike://") :]
    hosts_part, _, after = rest.partition("/")
    ns_part, _, query = after.partition("?")
    params = parse_qs(query, keep_blank_values=True)
    return {
        "hosts": [h for h in hosts_part.split(",") if h],
        "namespace": unquote(ns_part) or None,
        "set": params.get("set", [None])[0],
        "external_store": params.get("externalStore", [None])[0],
    }


def stores_from_settings(settings: Settings) -> dict:
    """Where a node keeps its data, from its settings.

    Returns {"data_dir", "blobstores": {name: Path}, "blobstore_details": {name: {path,
    hash_prefix, url, ttl_paths}}, "postgres_dsn" (postgresql://, no password),
    "postgres_password", "aerospike": {hosts, namespace, set} | None, "utxo_batch_size",
    "skipped": {name: url}} -- stores that are not local folders (null:///, s3://, ...)
    are listed in "skipped" with their (redacted) URL.
    """
    base_dir = settings.files[0].parent if settings.files else Path.cwd()
    details: dict[str, dict] = {}
    skipped: dict[str, str] = {}

    def add_blob(name: str, url: str, where: str) -> None:
        if url.startswith("file://"):
            details[name] = _file_store(url, where, base_dir, DEFAULT_HASH_PREFIX.get(name, 2))
        else:
            skipped[name] = redact(url)

    data_dir = settings.get("DATADIR")
    for key, name in BLOB_STORE_KEYS.items():
        url = settings.get(key)
        if url:
            add_blob(name, url, settings.where(key))

    aerospike = None
    utxostore = settings.get("utxostore")
    if utxostore and utxostore.startswith("aerospike://"):
        aerospike = _aerospike(utxostore)
        external = aerospike.pop("external_store")
        if external:
            add_blob("external", external, settings.where("utxostore") + " (externalStore)")
    elif utxostore:
        skipped["utxostore"] = redact(utxostore)

    dsn = password = None
    chain = settings.get("blockchain_store")
    if chain and chain.startswith(("postgres://", "postgresql://")):
        dsn, password = _postgres(chain)
    elif chain:
        skipped["blockchain_store"] = redact(chain)

    batch = settings.get("utxostore_utxoBatchSize")
    try:
        batch_size = int(batch) if batch else None
    except ValueError:
        raise ConfigError(f"{settings.where('utxostore_utxoBatchSize')}: utxostore_utxoBatchSize "
                          f"{batch!r} is not an integer") from None

    return {
        "data_dir": (base_dir / data_dir).resolve() if data_dir else None,
        "blobstores": {name: d["path"] for name, d in details.items()},
        "blobstore_details": details,
        "postgres_dsn": dsn,
        "postgres_password": password,
        "aerospike": aerospike,
        "utxo_batch_size": batch_size,
        "skipped": skipped,
    }
