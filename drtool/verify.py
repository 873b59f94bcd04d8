"""Verification: the repository's integrity (and, with --drill, a restore into scratch space).

Layer 1 (every run): every object a manifest references exists with its recorded size.
With --read-data[=FRACTION]: packs are downloaded and every blob hashed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drtool.progress import Progress
from drtool.findings import Finding
from drtool.repo.base import Manifest, Repository

log = logging.getLogger(__name__)


@dataclass
class VerifyResult:
    snapshots: list[Manifest]
    read_fraction: float
    findings: list[Finding] = field(default_factory=list)
    drill: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return not [f for f in self.findings if f.severity == "error"]

    def as_dict(self) -> dict[str, Any]:
        out = {"ok": self.ok, "snapshots": [s.id for s in self.snapshots], "read_data": self.read_fraction,
               "findings": [f.as_dict() for f in self.findings]}
        if self.drill is not None:
            out["drill"] = self.drill
        return out


def verify(repo: Repository, snapshots: list[Manifest], read_fraction: float = 0.0) -> VerifyResult:
    result = VerifyResult(snapshots, read_fraction)
    with Progress("verify") as progress:
        result.findings.extend(repo.check(snapshots, read_fraction, progress))
    return result


RECENT_BLOCKS = 10  # blocks whose subtrees a node still keeps


def cross_store_checks(dsn: str, block_store: Path | None, subtree_store: Path | None) -> list[Finding]:
    """The DB and the blob folders from the same moment: every block PostgreSQL marks as
    persisted has its block-store file; the recent main-chain blocks' subtrees exist."""
    import contextlib

    from drtool.sources import postgres
    from drtool.teranode import filetypes as ft

    findings: list[Finding] = []
    with contextlib.closing(postgres.connect(dsn, what="cross-store checks")) as conn:
        if block_store is not None:
            rows = conn.execute("SELECT height, hash FROM blocks WHERE persisted_at IS NOT NULL AND NOT invalid "
                                "ORDER BY height").fetchall()
            for height, raw in rows:
                name = bytes(raw)[::-1].hex()
                path = block_store / ft.relative_path(name, "block", -2)
                if not path.exists():
                    findings.append(Finding(f"blocks row height {height} ({name})",
                                            f"persisted_at is set but the block store has no {path.name}"))
        if subtree_store is not None:
            rows = conn.execute("SELECT height, hash, subtrees FROM blocks WHERE on_main_chain AND NOT invalid "
                                "ORDER BY height DESC LIMIT %s", (RECENT_BLOCKS,)).fetchall()
            for height, raw, subtrees in rows:
                data = bytes(subtrees or b"")
                for i in range(0, len(data) - len(data) % 32, 32):
                    name = data[i:i + 32][::-1].hex()
                    if not any((subtree_store / ft.relative_path(name, ext, 2)).exists()
                               for ext in ("subtree", "subtreeToCheck")):
                        findings.append(Finding(f"blocks row height {height} ({bytes(raw)[::-1].hex()[:16]}…)",
                                                f"its subtree {name} is missing from the subtree store"))
    return findings


def drill(cfg, repo: Repository, snap: Manifest, aerospike_hosts: list[str] | None = None) -> dict:
    """Restore a snapshot into scratch space (a temporary folder, a scratch database on the
    configured server), run every check, time it, and remove the scratch, also on failure.
    The UTXO store is drilled only into a cluster named with `aerospike_hosts`."""
    import secrets as pysecrets
    import shutil
    import tempfile
    import time

    from drtool import restore as restore_mod
    from drtool.errors import DrtoolError

    cfg.node.state_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="drill-", dir=cfg.node.state_dir))
    only = [s for s in snap.sources if s != "aerospike" or aerospike_hosts]
    pg_dsn = None
    if "postgres" in snap.sources and "postgres" in only:
        if not cfg.postgres:
            only.remove("postgres")
        else:
            from drtool.sources import postgres

            pg_dsn = postgres.dsn_with(cfg.postgres.dsn, dbname=f"drtool_drill_{pysecrets.token_hex(4)}")
    started = time.monotonic()
    report: dict = {"snapshot": snap.id, "sources": only, "skipped": sorted(set(snap.sources) - set(only)),
                    "findings": []}
    try:
        result = restore_mod.restore(cfg, repo, snap, target_dir=scratch / "node", only=only, pg_dsn=pg_dsn,
                                     aerospike_hosts=aerospike_hosts)
        report["findings"] = [f.as_dict() for f in result.findings]
        report["files"] = result.files
        report["bytes"] = result.bytes
        report["ok"] = result.ok
    except DrtoolError as exc:
        report["ok"] = False
        report["findings"].append(Finding(f"drill of {snap.id[:8]}", str(exc)).as_dict())
        report["findings"].extend(f.as_dict() for f in getattr(exc, "findings", []))
    finally:
        report["time_to_restore_seconds"] = round(time.monotonic() - started, 3)
        shutil.rmtree(scratch, ignore_errors=True)
        if pg_dsn:
            _drop_drill_databases(pg_dsn)
    return report


def _drop_drill_databases(pg_dsn: str) -> None:
    """The drill's scratch database and any staging database the restore left."""
    import contextlib

    from psycopg import sql

    from drtool.sources import postgres

    name = postgres.database_name(pg_dsn)
    with contextlib.suppress(Exception), contextlib.closing(
            postgres.connect(postgres.dsn_with(pg_dsn, dbname="postgres"), autocommit=True, what="drop drill")) as conn:
        rows = conn.execute("SELECT datname FROM pg_database WHERE datname = %s OR datname LIKE %s",
                            (name, name + "\\_\\_drtool\\_%")).fetchall()
        for (db,) in rows:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db)))
