"""One consistent node snapshot, start to finish.

lock (shared) -> quiesce the node (per [node] quiesce) -> every source -> resume ->
manifest, written last. Any failure aborts before the manifest: no half snapshot is ever
listed, and what was uploaded is reused by the next run.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from drtool import __version__
from drtool.config import Config
from drtool.errors import ConfigError
from drtool.repo.base import BackupStats, Manifest, Repository
from drtool.sources import blobstore, files

log = logging.getLogger(__name__)

SOURCES = ("postgres", "aerospike", "blobstores", "files")


@dataclass
class BackupResult:
    manifest: Manifest | None  # None on --dry-run
    stats: BackupStats
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        snap = None
        if self.manifest:
            m = self.manifest
            snap = {"id": m.id, "time": m.doc["time"], "tags": m.tags, "status": m.status,
                    "best_block": m.doc.get("best_block"), "parent": m.parent,
                    "sources": {name: _source_summary(src) for name, src in m.sources.items()}}
        return {"snapshot": snap, "dry_run": self.manifest is None,
                "stats": {**self.stats.as_dict(), "seconds": round(self.seconds, 3)}}


def _source_summary(src: dict) -> dict:
    """What `backup --json` shows of a source: counts and sizes, not blob ids."""
    drop = {"tree", "stream", "items", "chunks"}
    out = {k: v for k, v in src.items() if k not in drop}
    if "items" in src:
        out["items"] = {name: {k: v for k, v in item.items() if k not in drop}
                        for name, item in src["items"].items()}
    return out


def select_sources(cfg: Config, only: list[str] | None) -> list[str]:
    configured = cfg.sources()
    if not only:
        if not configured:
            raise ConfigError(f"{cfg.path.name}: nothing to back up: configure [blobstores], [files], "
                              "[postgres] or [aerospike]")
        return configured
    for name in only:
        if name not in SOURCES:
            raise ConfigError(f"--only: unknown source {name!r} (one of {', '.join(SOURCES)})")
        if name not in configured:
            raise ConfigError(f"--only {name}: {cfg.path.name} has no [{name}] section")
    return [s for s in configured if s in only]


def find_parent(repo: Repository, node: str) -> Manifest | None:
    """The newest snapshot of this node: its file lists let unchanged files go unread."""
    snaps = [s for s in repo.snapshots() if s.node == node]
    return snaps[-1] if snaps else None


def quiesce(cfg: Config) -> contextlib.AbstractContextManager:
    if cfg.node.quiesce != "stop":
        return contextlib.nullcontext()
    from drtool.node import make_node_control

    return make_node_control(cfg.node).quiesce()


def take(cfg: Config, repo: Repository, *, tags: list[str] = (), only: list[str] | None = None,
         dry_run: bool = False) -> BackupResult:
    sources = select_sources(cfg, only)
    started = time.monotonic()
    parent = find_parent(repo, cfg.node.name)
    if cfg.node.quiesce == "stop":
        from drtool.node import make_node_control

        message = make_node_control(cfg.node).recover_leftover_quiesce()
        if message:
            log.warning("%s", message)
    now = dt.datetime.now(dt.timezone.utc)
    doc: dict[str, Any] = {
        "version": 1, "tool": f"drtool {__version__}", "node": cfg.node.name,
        "hostname": socket.gethostname(), "pid": os.getpid(), "time": now.isoformat(timespec="microseconds"),
        "tags": sorted(set(tags)), "parent": parent.id if parent else None,
        "quiesce": cfg.node.quiesce, "sources": {},
    }
    from drtool.node import node_facts

    doc["teranode"] = node_facts(cfg.node)
    session = repo.begin_backup("backup --dry-run" if dry_run else "backup", wait=cfg.repository.lock_wait_seconds,
                                dry_run=dry_run)
    try:
        with quiesce(cfg):
            best_at_start = _best_block_now(cfg, sources)
            for name in sources:
                log.info("backing up %s", name)
                parent_src = parent.sources.get(name) if parent else None
                doc["sources"][name] = _backup_source(name, cfg, session, parent_src, doc,
                                                      parent.time if parent else None)
            best_at_end = _best_block_now(cfg, sources)
        doc["end_time"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")
        doc["status"] = "complete" if cfg.node.quiesce in ("stop", "offline") else "fuzzy"
        if best_at_start or best_at_end:
            doc["best_block_range"] = {"start": best_at_start, "end": best_at_end}
            if best_at_start != best_at_end and doc["status"] == "complete":
                log.warning("the best block moved during the backup (%s -> %s) although the node was quiesced",
                            best_at_start, best_at_end)
        if doc["status"] == "fuzzy":
            log.warning("hot snapshot (quiesce = \"none\"): each source is consistent on its own; a node "
                        "restored from it needs a resync from the start of its block range")
        doc["size"] = sum(_source_size(src) for src in doc["sources"].values())
        if dry_run:
            session.abort()
            return BackupResult(None, session.stats, time.monotonic() - started)
        manifest = session.commit(doc)
    except BaseException:
        session.abort()
        raise
    log.info("snapshot %s saved (%s)", manifest.id[:8], manifest.status)
    return BackupResult(manifest, session.stats, time.monotonic() - started)


def _best_block_now(cfg: Config, sources: list[str]) -> dict | None:
    if "postgres" not in sources:
        return None
    from drtool.sources import postgres

    return postgres.current_best_block(cfg.postgres.dsn)


def _backup_source(name: str, cfg: Config, session, parent_src: dict | None, doc: dict,
                   parent_time: dt.datetime | None = None) -> dict:
    if name == "blobstores":
        return blobstore.backup(session, cfg.blobstores, cfg.node.data_dir, parent_src)
    if name == "files":
        return files.backup(session, cfg.files, cfg.node.data_dir, parent_src)
    if name == "postgres":
        from drtool.sources import postgres

        src = postgres.backup(session, cfg.postgres.dsn, pg_dump=cfg.postgres.pg_dump or None,
                              level=cfg.postgres.compression_level)
        if src.get("best_block"):
            doc["best_block"] = src["best_block"]  # read in the dump's own transaction snapshot
        return src
    if name == "aerospike":
        from drtool.sources import aerospike

        return aerospike.backup(session, cfg.aerospike, parent_src, parent_time)
    raise ConfigError(f"unknown source {name}")


def _source_size(src: dict) -> int:
    if "items" in src:
        return sum(item.get("bytes", item.get("size", 0)) for item in src["items"].values())
    return src.get("bytes", src.get("size", 0))
