"""Rebuild a node's data from a snapshot: staging -> check -> publish.

Every source is restored into staging space next to its target first (so publishing is a
rename on the same filesystem); every byte is checked against its recorded SHA-256 while it
is written, Teranode's own hashes after. Only when all of it passes is anything moved into
place, and nothing that was there is deleted: a non-empty target (allowed with --force) is
moved aside to `<target>.drtool-previous-<time>`.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import secrets as pysecrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drtool.config import Config
from drtool.errors import ConfigError, DrtoolError
from drtool.repo.base import Finding, Manifest, Repository
from drtool.repo.forked import die_with_parent
from drtool.sources import blobstore, files

log = logging.getLogger(__name__)


@dataclass
class Placement:
    """One restored item: where it is staged and where it is published."""

    source: str
    name: str
    ref: dict
    final: Path | None
    staging: Path | None = None
    kind: str = "tree"  # tree | file | database | utxo
    dsn: str | None = None  # database: the target
    staged_db: Any = None   # database: the checked scratch database, until published


@dataclass
class RestoreResult:
    snapshot: Manifest
    placements: list[Placement] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    moved_aside: list[str] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    published: bool = False
    next_steps: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.published and not [f for f in self.findings if f.severity == "error"]

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "snapshot": self.snapshot.id, "published": self.published,
                "restored": [{"source": p.source, "name": p.name, "path": str(p.final) if p.final else p.name}
                             for p in self.placements],
                "moved_aside": self.moved_aside, "files": self.files, "bytes": self.bytes,
                "findings": [f.as_dict() for f in self.findings], "next_steps": self.next_steps}


def plan(cfg: Config | None, snap: Manifest, target_dir: Path | None, only: list[str] | None,
         pg_dsn: str | None = None, aerospike_hosts: list[str] | None = None, force: bool = False) -> list[Placement]:
    out = []
    wanted = set(only) if only else None
    for source, src in snap.sources.items():
        if wanted is not None and source not in wanted:
            continue
        if source == "blobstores":
            for name, ref in src["items"].items():
                configured = cfg.blobstores.get(name) if cfg else None
                out.append(Placement(source, name, ref, blobstore.restore_target(name, ref["path"], target_dir, configured)))
        elif source == "files":
            for name, ref in src["items"].items():
                out.append(Placement(source, name, ref, files.restore_target(name, ref, target_dir, cfg.files if cfg else []),
                                     kind="file"))
        elif source == "postgres":
            dsn = pg_dsn or (cfg.postgres.dsn if cfg and cfg.postgres else None)
            if not dsn:
                raise ConfigError(f"snapshot {snap.id[:8]} holds the PostgreSQL database: give --pg-dsn, "
                                  "configure [postgres], or leave it out with --only")
            out.append(Placement(source, src.get("database", "teranode"), src, None, kind="database", dsn=dsn))
        elif source == "aerospike":
            if not (cfg and cfg.aerospike):
                raise ConfigError(f"snapshot {snap.id[:8]} holds the UTXO store: configure [aerospike] "
                                  "(engine, tool) or leave it out with --only")
            if not aerospike_hosts and not force:
                raise ConfigError(f"snapshot {snap.id[:8]} holds the UTXO store: name the target cluster with "
                                  "--aerospike HOST:PORT, or pass --force to write into the configured one")
            out.append(Placement(source, src.get("namespace", "utxo-store"), src, None, kind="utxo",
                                 dsn=",".join(aerospike_hosts or cfg.aerospike.hosts)))
    if wanted:
        missing = wanted - set(snap.sources)
        if missing:
            raise ConfigError(f"--only: snapshot {snap.id[:8]} holds no {', '.join(sorted(missing))}")
    return out


def _preflight(placements: list[Placement], force: bool) -> None:
    """Refuse before anything is written: a target that is a file, or one that is not empty."""
    for p in placements:
        final = p.final
        if p.kind in ("database", "utxo"):
            continue  # checked by their sources before they write anything
        if p.kind == "tree":
            if final.exists() and not final.is_dir():
                raise ConfigError(f"restore target {final}: exists and is not a directory")
            if final.is_dir() and any(final.iterdir()) and not force:
                raise ConfigError(f"restore target {final}: not empty (use --force: what is there is "
                                  "moved aside, not deleted)")
        else:
            if final.is_dir():
                raise ConfigError(f"restore target {final}: is a directory, expected a file")
            if final.exists() and not force:
                raise ConfigError(f"restore target {final}: exists (use --force: it is moved aside, not deleted)")
        for parent in final.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise ConfigError(f"restore target {final}: {parent} is a file")
                break


def restore(cfg: Config | None, repo: Repository, snap: Manifest, *, target_dir: Path | None = None,
            only: list[str] | None = None, force: bool = False, check_teranode: bool = True,
            pg_dsn: str | None = None, aerospike_hosts: list[str] | None = None) -> RestoreResult:
    placements = plan(cfg, snap, target_dir, only, pg_dsn, aerospike_hosts, force)
    if not placements:
        raise ConfigError(f"snapshot {snap.id[:8]}: nothing to restore" + (f" for --only {','.join(only)}" if only else ""))
    if target_dir is not None and target_dir.exists() and not target_dir.is_dir():
        raise ConfigError(f"--target-dir {target_dir}: exists and is not a directory")
    _preflight(placements, force)
    _check_compatible(cfg, snap, placements, force)
    result = RestoreResult(snap, placements)
    tag = f"{snap.id[:8]}-{pysecrets.token_hex(3)}"
    created: list[Path] = []  # folders this restore made, removed again if it fails
    current: Placement | None = None  # what is being written, for an error that names no file
    checker = _TeranodeChecker() if check_teranode else None
    try:
        for p in placements:
            current = p
            if p.kind == "database":
                _stage_database(cfg, repo, p, force, result)
                continue
            if p.kind == "utxo":
                continue  # written at publish: a cluster has no staging area to rename
            _make_parents(p.final.parent, created)
            p.staging = p.final.parent / f".{p.final.name}.drtool-staging-{tag}"
            if p.kind == "tree":
                p.staging.mkdir(mode=0o700)
                stats = blobstore.restore_into(repo, p.ref, p.staging, f"{p.source}/{p.name}",
                                               checker.submitter(p) if checker else None)
                result.files += stats.files
                result.bytes += stats.bytes_written
            else:
                result.bytes += files.restore_file(repo, p.ref, p.staging)
                result.files += 1
        if checker:
            result.findings.extend(checker.finish(placements))
            result.findings.extend(_cross_store_checks(placements))
        errors = [f for f in result.findings if f.severity == "error"]
        if errors:
            raise DrtoolError(f"restore checks failed ({len(errors)} findings; first: {errors[0]}); nothing published")
        _publish(placements, result, repo, cfg)
        result.next_steps = _next_steps(cfg, snap, placements)
    except BaseException as exc:
        if checker:
            checker.close()
        for p in placements:
            if p.staged_db is not None:
                p.staged_db.discard()
            if p.staging is not None and (p.staging.exists() or p.staging.is_symlink()):
                if p.staging.is_dir() and not p.staging.is_symlink():
                    shutil.rmtree(p.staging, ignore_errors=True)
                else:
                    p.staging.unlink(missing_ok=True)
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:
                pass
        if isinstance(exc, OSError):  # a full disk, a permission: say where, in one line
            where = exc.filename or (current.final if current and current.final else "the target")
            raise DrtoolError(f"restore failed writing {where}: {exc.strerror or exc}; "
                              "nothing was published, the staging was removed") from None
        raise
    return result


def _make_parents(folder: Path, created: list[Path]) -> None:
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir()
        created.append(path)


def _check_compatible(cfg: Config | None, snap: Manifest, placements: list[Placement], force: bool) -> None:
    """A UTXO store and DB only work with the Teranode version and utxoBatchSize they were
    written by: refuse a mismatch with the target's configuration unless forced."""
    from drtool.node import node_facts

    recorded = snap.doc.get("teranode") or {}
    if cfg is None or not any(p.kind in ("database", "utxo") for p in placements):
        return
    target = node_facts(cfg.node)
    for key, label in (("version", "Teranode version"), ("utxo_batch_size", "utxostore_utxoBatchSize")):
        was, now = recorded.get(key), target.get(key)
        if was is not None and now is not None and str(was) != str(now):
            message = (f"snapshot {snap.id[:8]} was taken with {label} {was}, the target is configured "
                       f"for {now}")
            if not force:
                raise ConfigError(message + " (use --force to restore anyway)")
            log.warning("%s: restoring anyway (--force)", message)
    kinds = {p.kind for p in placements}
    if kinds & {"database", "utxo"} and not {"database", "utxo", "tree"} <= kinds and len(snap.sources) > 1:
        log.warning("restoring part of a node snapshot: PostgreSQL, the UTXO store and the blob stores "
                    "only restore a working node as a matched set")


def _next_steps(cfg: Config | None, snap: Manifest, placements: list[Placement]) -> list[str]:
    if not any(p.kind in ("database", "utxo") for p in placements):
        return []
    steps = ["the node's FSM is left as the snapshot recorded it (IDLE when quiesced): run the checks you "
             "need before starting it"]
    if cfg and cfg.node.start_command:
        steps.append("start the Teranode services: " + " ".join(cfg.node.start_command))
    steps.append("set the FSM running: " + " ".join((cfg.node.teranode_cli if cfg else ["teranode-cli"])
                                                    + ["setfsmstate", "--fsmstate", "running"]))
    best = snap.doc.get("best_block")
    if best:
        steps.append(f"the node catches up from peers from block {best['height']} ({best['hash']})")
    return steps


def _stage_database(cfg: Config | None, repo: Repository, p: Placement, force: bool, result: RestoreResult) -> None:
    """pg_restore into a scratch database beside the target, checked against the manifest
    (row counts, chain linkage, best block); renamed into place only at publish."""
    from drtool.errors import IntegrityError
    from drtool.sources import postgres

    pg = cfg.postgres if cfg else None
    if pg and pg.jobs > 1 and cfg.policy_file:
        # pg_restore -j spools the dump: refuse before the spool would cross the critical threshold.
        from drtool.disk import check_spool
        from drtool.policy import load_policy

        check_spool(cfg.node.state_dir, int(p.ref.get("size", 0)), load_policy(cfg.policy_file).disk)
    try:
        p.staged_db = postgres.stage_restore(
            repo.read_stream(p.ref, views=True), p.dsn, jobs=pg.jobs if pg else 1, force=force,
            spool_dir=cfg.node.state_dir if cfg else None, size_hint=p.ref.get("size"), expected=p.ref,
            pg_restore=(pg.pg_restore or None) if pg else None, no_owner=True)
    except IntegrityError as exc:
        result.findings.extend(getattr(exc, "findings", []))
        raise
    result.bytes += p.staged_db.bytes_restored
    result.findings.extend(p.staged_db.findings)


def _cross_store_checks(placements: list[Placement]) -> list[Finding]:
    """The staged database against the staged block and subtree stores (a matched set)."""
    from drtool.verify import cross_store_checks

    db = next((p for p in placements if p.kind == "database" and p.staged_db is not None), None)
    stores = {p.name: p.staging for p in placements if p.kind == "tree"}
    if db is None or not ({"blockstore", "subtreestore"} & set(stores)):
        return []
    return cross_store_checks(db.staged_db.scratch_dsn, stores.get("blockstore"), stores.get("subtreestore"))


def _check_folder(path: str) -> tuple[list[tuple[str, str, str]], int, int]:
    """Teranode checks of one folder (runs in a worker process)."""
    from drtool.teranode import checks

    report = checks.check_tree(path).run()
    return [(f.path, f.problem, f.severity) for f in report.findings], report.checked, report.unchecked


class _TeranodeChecker:
    """Teranode's own hashes of every restored blob-store file: names = hashes of content,
    sidecars match. CPU-bound (merkle roots), so run in worker processes, each hash-prefix
    folder as soon as the engine has written it: the checks overlap the writing."""

    def __init__(self) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # Workers are forked now, before the restore starts its writer threads (forking a
        # process with running threads is not safe); with "fork" they all start on this submit.
        # A restore killed with -9 cannot shut the pool down: Linux kills them with it.
        self.pool = ProcessPoolExecutor(max_workers=os.cpu_count() or 2,
                                        mp_context=multiprocessing.get_context("fork"),
                                        initializer=die_with_parent, initargs=(os.getpid(),))
        self.pool.submit(int).result()
        self.jobs: dict[str, list] = {}  # placement name -> [(folder, future)]

    def submitter(self, p: Placement):
        jobs = self.jobs.setdefault(f"{p.source}/{p.name}", [])
        return lambda folder: jobs.append((str(folder), self.pool.submit(_check_folder, str(folder))))

    def finish(self, placements: list[Placement]) -> list[Finding]:
        from drtool.teranode import checks
        from drtool.teranode.filetypes import IGNORED_DIRS

        findings = []
        try:
            for p in placements:
                if p.kind != "tree":
                    continue
                jobs = self.jobs.setdefault(f"{p.source}/{p.name}", [])
                done = {folder for folder, _ in jobs}
                for e in os.scandir(p.staging):  # what the engine did not report (restic)
                    if e.is_dir(follow_symlinks=False) and e.name not in IGNORED_DIRS and e.path not in done:
                        jobs.append((e.path, self.pool.submit(_check_folder, e.path)))
                results = [fut.result() for _, fut in jobs]
                for e in os.scandir(p.staging):
                    if e.is_file(follow_symlinks=False):
                        detail = checks.check_file_detail(e.path)
                        results.append(([(f.path, f.problem, f.severity) for f in detail.findings],
                                        int(detail.checked), int(not detail.checked)))
                log.info("%s/%s: Teranode checks on %d files (%d of types without a check)",
                         p.source, p.name, sum(r[1] for r in results), sum(r[2] for r in results))
                for found, _c, _u in results:
                    for path, problem, severity in found:
                        rel = os.path.relpath(path, p.staging) if os.path.isabs(path) else path
                        findings.append(Finding(f"{p.source}/{p.name} {rel}", problem, severity))
        finally:
            self.close()
        return findings

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _publish(placements: list[Placement], result: RestoreResult, repo: Repository, cfg: Config | None) -> None:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for p in sorted(placements, key=lambda p: p.kind == "utxo"):  # the UTXO store last
        if p.kind == "utxo":
            from drtool.sources import aerospike

            done = aerospike.restore(repo, p.ref, cfg.aerospike, p.dsn.split(","))
            if done.get("reconcile"):
                log.info("UTXO store: %d records deleted that were not live at the snapshot",
                         done["reconcile"].get("deleted", 0))
            result.files += done["records"]
            continue
        if p.kind == "database":
            published = p.staged_db.publish()
            p.staged_db = None
            if published.previous_database:
                result.moved_aside.append(f"database {published.previous_database}")
            continue
        final = p.final
        if final.is_dir() and not final.is_symlink() and not any(final.iterdir()):
            final.rmdir()
        elif final.exists() or final.is_symlink():
            aside = final.with_name(f"{final.name}.drtool-previous-{stamp}")
            os.rename(final, aside)
            result.moved_aside.append(str(aside))
            log.warning("%s was not empty: moved aside to %s", final, aside)
        os.rename(p.staging, final)
        p.staging = None
    result.published = True
