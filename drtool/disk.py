"""Disk usage against the policy's [disk] thresholds, and what `disk --enforce` may do about it.

Watched: the policy's `[disk] paths` (relative to the node's data_dir, or absolute), drtool's own
state directory (cache, staging) and the repository folder when [repository] url is file://.
Every path is reported; findings are raised once per filesystem (two paths on one disk are one
problem), naming the paths on it.

Thresholds (the policy's words: "above"): warning when used space is above warn_percent;
critical when above critical_percent, when less than min_free_bytes is free, or when more than
max_inode_percent of the inodes are used. Percentages are computed as df does:
used / (used + available to ordinary users), so root's reserved blocks count as full.

Enforcement, per critical filesystem, in this order and only until it is below critical:
  1. drtool's own cache (state_dir/cache) and leftover restore staging folders
     (`.<store>.drtool-staging-<snap8>-<hex6>` next to the configured blob stores, see restore.py);
  2. prune the repository when it is a local folder on that filesystem;
  3. only with `evict_expired_blobs = true`: blob-store files whose `<file>.dah` height has passed
     and that the latest complete, verified snapshot holds with the same size and mtime.
Nothing else is ever deleted. What remains critical raises DiskThresholdError (exit 4) naming the
filesystem, its usage and its largest folders.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from drtool.config import Config
from drtool.errors import DiskThresholdError, DrtoolError, LockError
from drtool.policy import DiskPolicy, Policy
from drtool.progress import human_bytes
from drtool.repo.base import Manifest, Repository
from drtool.teranode.filetypes import IGNORED_DIRS, is_temporary

log = logging.getLogger(__name__)

CACHE_DIR = "cache"                  # under cfg.node.state_dir
STAGING_GRACE = 15 * 60              # seconds: staging changed more recently may belong to a running restore
STAGING = re.compile(r"^\.(?P<store>.+)\.drtool-staging-(?P<tag>[0-9a-f]{8}-[0-9a-f]{6})$")
SIDECARS = (".sha256", ".dah")       # deleted with their blob (the .dah last)
DU_ENTRY_BUDGET = 200_000            # entries `holders` may stat in all: a bounded du


# ---------------------------------------------------------------------------------------------
# Usage and thresholds (pure where it can be)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PathUsage:
    """One path's filesystem, as statvfs sees it. `exists` False: nothing measured (see `error`)."""

    path: str
    exists: bool
    mount: str = ""
    device: int = 0
    total: int = 0          # bytes: f_blocks * f_frsize
    used: int = 0           # bytes: (f_blocks - f_bfree) * f_frsize
    free: int = 0           # bytes ordinary users may still write: f_bavail * f_frsize
    inodes_total: int = 0   # 0 on filesystems without a fixed inode table (btrfs): no inode limit
    inodes_used: int = 0
    error: str = ""

    @property
    def used_percent(self) -> float:
        room = self.used + self.free
        return 100.0 * self.used / room if room > 0 else (100.0 if self.used else 0.0)

    @property
    def inode_percent(self) -> float:
        return 100.0 * self.inodes_used / self.inodes_total if self.inodes_total else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "exists": self.exists, "mount": self.mount, "total_bytes": self.total,
                "used_bytes": self.used, "free_bytes": self.free, "used_percent": round(self.used_percent, 2),
                "inodes_total": self.inodes_total, "inodes_used": self.inodes_used,
                "inode_percent": round(self.inode_percent, 2), **({"error": self.error} if self.error else {})}


def mount_point(path: str | Path) -> str:
    p = os.path.realpath(path)
    while not os.path.ismount(p):
        p = os.path.dirname(p)
    return p


def usage(path: str | Path) -> PathUsage:
    """statvfs of `path`; a path that does not exist (or cannot be read) comes back with
    exists=False and the reason, never an exception."""
    text = str(path)
    try:
        st = os.statvfs(text)
        dev = os.stat(text).st_dev
    except OSError as exc:
        reason = "does not exist" if isinstance(exc, FileNotFoundError) else (exc.strerror or str(exc))
        return PathUsage(text, False, error=reason)
    frsize = st.f_frsize or st.f_bsize
    return PathUsage(text, True, mount=mount_point(text), device=dev, total=st.f_blocks * frsize,
                     used=(st.f_blocks - st.f_bfree) * frsize, free=st.f_bavail * frsize,
                     inodes_total=st.f_files, inodes_used=st.f_files - st.f_ffree)


@dataclass(frozen=True)
class Crossing:
    """A threshold a filesystem is past: `threshold` is the policy key."""

    threshold: str
    severity: str          # "warning" (warn_percent) | "error" (critical)
    value: float
    limit: float
    text: str


def crossings(u: PathUsage, limits: DiskPolicy) -> list[Crossing]:
    """Every threshold `u` is past; the critical ones have severity "error"."""
    if not u.exists:
        return []
    out = []
    pct = u.used_percent
    if pct > limits.critical_percent:
        out.append(Crossing("critical_percent", "error", pct, limits.critical_percent,
                            f"{pct:.1f}% used, above critical_percent {limits.critical_percent:g}"))
    elif pct > limits.warn_percent:
        out.append(Crossing("warn_percent", "warning", pct, limits.warn_percent,
                            f"{pct:.1f}% used, above warn_percent {limits.warn_percent:g}"))
    if limits.min_free_bytes and u.free < limits.min_free_bytes:
        out.append(Crossing("min_free_bytes", "error", u.free, limits.min_free_bytes,
                            f"{human_bytes(u.free)} free, below min_free_bytes {human_bytes(limits.min_free_bytes)}"))
    if u.inodes_total and u.inode_percent > limits.max_inode_percent:
        out.append(Crossing("max_inode_percent", "error", u.inode_percent, limits.max_inode_percent,
                            f"{u.inode_percent:.1f}% of inodes used, above max_inode_percent "
                            f"{limits.max_inode_percent:g}"))
    return out


def status_of(u: PathUsage, crossed: list[Crossing]) -> str:
    if not u.exists:
        return "missing"
    if any(c.severity == "error" for c in crossed):
        return "critical"
    return "warn" if crossed else "ok"


def is_critical(u: PathUsage, limits: DiskPolicy) -> bool:
    return any(c.severity == "error" for c in crossings(u, limits))


def spool_crossing(u: PathUsage, needed_bytes: int, limits: DiskPolicy) -> Crossing | None:
    """The critical threshold writing `needed_bytes` more onto `u`'s filesystem would be past."""
    after = dataclasses.replace(u, used=u.used + needed_bytes, free=u.free - needed_bytes)
    for c in crossings(after, limits):
        if c.severity == "error" and c.threshold != "max_inode_percent":
            return c
    return None


def check_spool(path: str | Path, needed_bytes: int, policy: Policy | DiskPolicy) -> PathUsage:
    """Refuse (DiskThresholdError) to write `needed_bytes` under `path` when that would take its
    filesystem past a critical threshold. `path` may not exist yet: its nearest parent is measured."""
    limits = _limits(policy)
    u = usage(nearest_existing(Path(path)))
    if not u.exists:
        raise DiskThresholdError(f"{path}: cannot measure free space before spooling: {u.error}")
    crossed = spool_crossing(u, max(0, int(needed_bytes)), limits)
    if crossed:
        raise DiskThresholdError(
            f"{path}: spooling {human_bytes(needed_bytes)} would leave the filesystem at {u.mount} with "
            f"{crossed.text} (now {u.used_percent:.1f}% used, {human_bytes(u.free)} free); "
            "free space first (drtool disk --enforce)")
    return u


def nearest_existing(path: Path) -> Path:
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def _limits(policy: Policy | DiskPolicy) -> DiskPolicy:
    return policy if isinstance(policy, DiskPolicy) else policy.disk


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WatchedPath:
    path: Path
    role: str   # "policy" ([disk] paths) | "state" (drtool's cache and staging) | "repository"


def watched_paths(cfg: Config, policy: Policy | DiskPolicy) -> list[WatchedPath]:
    """The policy's paths, drtool's state directory, and a file:// repository folder; each once."""
    out: list[WatchedPath] = []
    seen: set[Path] = set()

    def add(path: Path, role: str) -> None:
        path = Path(os.path.normpath(path))
        if path not in seen:
            seen.add(path)
            out.append(WatchedPath(path, role))

    for text in _limits(policy).paths:
        add(cfg.node.data_dir / os.path.expanduser(text), "policy")
    add(cfg.node.state_dir, "state")
    local = local_repository_path(cfg)
    if local is not None:
        add(local, "repository")
    return out


def local_repository_path(cfg: Config) -> Path | None:
    url = cfg.repository.url
    return Path(url[len("file://"):]) if url.startswith("file://") else None


@dataclass
class PathStatus:
    watched: WatchedPath
    usage: PathUsage
    crossed: list[Crossing]

    @property
    def status(self) -> str:
        return status_of(self.usage, self.crossed)

    def as_dict(self) -> dict[str, Any]:
        measured = {"measured_at": self.usage.path} if self.usage.path != str(self.watched.path) else {}
        return {**self.usage.as_dict(), "path": str(self.watched.path), "role": self.watched.role,
                **measured, "status": self.status, "crossed": [c.threshold for c in self.crossed]}


@dataclass
class DiskFinding:
    """What is wrong with one filesystem (or a path): names the path(s) and the threshold."""

    subject: str
    problem: str
    severity: str                      # "error" (critical) | "warning"
    threshold: str = ""
    mount: str = ""
    paths: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"subject": self.subject, "path": self.subject, "problem": self.problem,
                "severity": self.severity, "threshold": self.threshold, "mount": self.mount,
                "paths": self.paths}

    def __str__(self) -> str:
        return f"{self.subject}: {self.problem}"


@dataclass
class Action:
    """One thing enforcement did to free space."""

    action: str        # "drop-cache" | "drop-staging" | "prune" | "evict-blobs"
    mount: str
    items: int
    bytes: int
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class DiskReport:
    paths: list[PathStatus]
    findings: list[DiskFinding] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)
    enforced: bool = False

    @property
    def ok(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)

    def filesystems(self) -> list[list[PathStatus]]:
        """Existing paths grouped by filesystem, in watch order."""
        groups: dict[int, list[PathStatus]] = {}
        for p in self.paths:
            if p.usage.exists:
                groups.setdefault(p.usage.device, []).append(p)
        return list(groups.values())

    def critical(self) -> list[list[PathStatus]]:
        return [fs for fs in self.filesystems() if fs[0].status == "critical"]

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "enforced": self.enforced, "findings": [f.as_dict() for f in self.findings],
                "paths": [p.as_dict() for p in self.paths], "actions": [a.as_dict() for a in self.actions]}


def report(cfg: Config, policy: Policy | DiskPolicy) -> DiskReport:
    limits = _limits(policy)
    statuses = []
    for w in watched_paths(cfg, policy):
        # drtool creates its own folders when it first needs them: until then, the filesystem
        # they will be created on is the one that matters.
        u = usage(w.path if w.role == "policy" else nearest_existing(w.path))
        statuses.append(PathStatus(w, u, crossings(u, limits)))
    rep = DiskReport(statuses)
    for p in statuses:
        if not p.usage.exists and p.watched.role == "policy":
            rep.findings.append(DiskFinding(str(p.watched.path), f"watched path {p.usage.error} ([disk] paths)",
                                            "warning", threshold="paths"))
    for fs in rep.filesystems():
        names = [str(p.watched.path) for p in fs]
        for c in fs[0].crossed:
            also = f" (also holds {', '.join(names[1:])})" if len(names) > 1 else ""
            rep.findings.append(DiskFinding(names[0], f"filesystem {fs[0].usage.mount}: {c.text}{also}",
                                            c.severity, threshold=c.threshold, mount=fs[0].usage.mount,
                                            paths=names))
    return rep


def critical_error(rep: DiskReport, notes: Iterable[str] = ()) -> DiskThresholdError | None:
    """The exit-4 error for what is still critical in `rep` (None when nothing is), naming each
    filesystem's first path, its usage and the largest folders holding its space: under the
    watched paths, and on the whole filesystem (what fills it may be no one's we watch)."""
    parts = []
    for fs in rep.critical():
        u = fs[0].usage
        crossed = "; ".join(c.text for c in fs[0].crossed if c.severity == "error")
        watched = [p.watched.path for p in fs]
        text = (f"{fs[0].watched.path} (filesystem {u.mount}, {human_bytes(u.free)} free of {human_bytes(u.total)}): "
                f"{crossed}; largest: {_holders_text(holders(watched, u.device))}")
        if Path(u.mount) not in watched:
            text += f"; largest on {u.mount}: {_holders_text(holders([Path(u.mount)], u.device))}"
        parts.append(text)
    if not parts:
        return None
    verb = "still critical after enforcement" if rep.enforced else "critical"
    note = "".join(f" ({n})" for n in dict.fromkeys(notes))
    err = DiskThresholdError(f"disk {verb}: " + " | ".join(parts) + note)
    err.report = rep  # type: ignore[attr-defined]
    return err


def _holders_text(found: list[tuple[str, int, bool]]) -> str:
    return ", ".join(f"{path} {'>= ' if approx else ''}{human_bytes(size)}" for path, size, approx in found) \
        or "nothing drtool can read"


def holders(paths: list[Path], device: int, top: int = 3,
            budget: int = DU_ENTRY_BUDGET) -> list[tuple[str, int, bool]]:
    """The largest top-level entries under `paths` on filesystem `device`: (path, bytes on disk,
    approximate). A bounded du: each entry may look at its share of `budget` entries; what it
    could not look at makes its size 'at least'."""
    roots = [p for p in paths if not any(q != p and q in p.parents for q in paths)]  # outermost only
    entries: list[str] = []
    for root in roots:
        try:
            with os.scandir(root) as it:
                entries += [de.path for de in it]
        except OSError:
            continue
    share = max(1000, budget // max(1, len(entries)))
    sizes = [(path, *_du(path, device, [share])) for path in entries]
    sizes.sort(key=lambda s: s[1], reverse=True)
    return sizes[:top]


def _du(path: str, device: int, left: list[int]) -> tuple[int, bool]:
    """Bytes allocated under `path` without leaving the filesystem; spends `left[0]` entries."""
    total, stack = 0, [path]
    while stack:
        current = stack.pop()
        if left[0] <= 0:
            return total, True
        left[0] -= 1
        try:
            st = os.lstat(current)
        except OSError:
            continue
        if st.st_dev != device:
            continue
        total += st.st_blocks * 512
        if stat.S_ISDIR(st.st_mode):
            try:
                with os.scandir(current) as it:
                    stack.extend(de.path for de in it)
            except OSError:
                continue
    return total, False


# ---------------------------------------------------------------------------------------------
# Enforcement
# ---------------------------------------------------------------------------------------------


def enforce(cfg: Config, policy: Policy, repo_factory: Callable[[], Repository], *,
            verified_snapshot_ids: Iterable[str] | None = None, best_height: int | None = None,
            staging_grace: float = STAGING_GRACE) -> DiskReport:
    """Free space on every critical filesystem (see the module doc for the order); returns the
    report measured afterwards with the actions taken. DiskThresholdError (its `.report` set)
    when a filesystem is still critical."""
    first = report(cfg, policy)
    run = _Enforcement(cfg, policy, repo_factory, set(verified_snapshot_ids or ()), best_height, staging_grace)
    try:
        for fs in first.critical():
            run.free(fs[0].usage)
    finally:
        run.close()
    final = report(cfg, policy)
    final.enforced = True
    final.actions = run.actions
    final.findings.extend(run.findings)
    err = critical_error(final, run.notes)
    if err:
        raise err
    return final


class _Enforcement:
    def __init__(self, cfg: Config, policy: Policy, repo_factory: Callable[[], Repository],
                 verified: set[str], best_height: int | None, staging_grace: float):
        self.cfg, self.policy, self.limits = cfg, policy, policy.disk
        self.repo_factory = repo_factory
        self.verified = verified
        self.best_height = best_height
        self.staging_grace = staging_grace
        self.actions: list[Action] = []
        self.findings: list[DiskFinding] = []
        self.notes: list[str] = []
        self._repo: Repository | None = None
        self._pruned = False

    # ---- plumbing ---------------------------------------------------------------------------
    def repo(self) -> Repository:
        if self._repo is None:
            self._repo = self.repo_factory()
        return self._repo

    def close(self) -> None:
        if self._repo is not None:
            self._repo.close()

    def still_critical(self, mount: str) -> bool:
        return is_critical(usage(mount), self.limits)

    def skipped(self, subject: str, problem: str) -> None:
        log.warning("disk enforcement: %s: %s", subject, problem)
        self.findings.append(DiskFinding(subject, problem, "warning", threshold="enforce"))

    def free(self, u: PathUsage) -> None:
        for step in (self.drop_cache, self.drop_staging, self.prune, self.evict_blobs):
            if not self.still_critical(u.mount):
                return
            step(u)

    @staticmethod
    def _on(path: Path, device: int) -> bool:
        try:
            return os.lstat(path).st_dev == device
        except OSError:
            return False

    # ---- 1. drtool's own cache and restore staging -------------------------------------------
    def drop_cache(self, u: PathUsage) -> None:
        cache = self.cfg.node.state_dir / CACHE_DIR
        if not cache.is_dir() or cache.is_symlink() or not self._on(cache, u.device):
            return
        items = nbytes = 0
        with os.scandir(cache) as it:
            entries = list(it)
        for de in entries:
            nbytes += _remove(Path(de.path))
            items += 1
        if items:
            self.actions.append(Action("drop-cache", u.mount, items, nbytes, f"emptied {cache}"))
            log.info("disk: dropped drtool's cache %s: %d entries, %s", cache, items, human_bytes(nbytes))

    def drop_staging(self, u: PathUsage) -> None:
        leftovers = staging_leftovers(self.cfg)
        busy_tags = {tag for tag, paths in _by_tag(leftovers).items()
                     if any(_in_use(p, self.staging_grace) for p in paths)}
        removed, nbytes = [], 0
        for path, tag in leftovers:
            if not self._on(path, u.device):
                continue
            if tag in busy_tags:
                self.skipped(str(path), f"restore staging changed in the last {self.staging_grace:.0f}s or is "
                             "open: it may belong to a running restore; kept")
                continue
            nbytes += _remove(path)
            removed.append(path.name)
        if removed:
            self.actions.append(Action("drop-staging", u.mount, len(removed), nbytes,
                                       "removed leftover restore staging " + ", ".join(removed)))
            log.info("disk: removed %d leftover restore staging folders, %s", len(removed), human_bytes(nbytes))

    # ---- 2. prune a local repository on this filesystem ---------------------------------------
    def prune(self, u: PathUsage) -> None:
        local = local_repository_path(self.cfg)
        if self._pruned or local is None or not self._on(local, u.device):
            return
        from drtool import prune as prune_mod

        self._pruned = True
        try:
            result = prune_mod.prune(self.repo(), self.policy.retention, lock_wait=0.0)
        except LockError as exc:
            self.skipped(str(local), f"prune skipped: {exc}")
            return
        except DrtoolError as exc:
            self.skipped(str(local), f"prune failed: {exc}")
            return
        freed = result.garbage.get("bytes_freed", 0)
        self.actions.append(Action("prune", u.mount, len(result.forgotten), freed,
                                   f"{local}: forgot {len(result.forgotten)} snapshots ({result.policy}), "
                                   f"deleted {result.garbage.get('objects_deleted', 0)} objects"))

    # ---- 3. expired blobs that a verified snapshot holds ------------------------------------
    def evict_blobs(self, u: PathUsage) -> None:
        stores = {name: root for name, root in self.cfg.blobstores.items() if self._on(root, u.device)}
        if not stores:
            return
        if not self.limits.evict_expired_blobs:
            self.notes.append("blob eviction is off: [disk] evict_expired_blobs = false")
            return
        try:
            repo = self.repo()
            snap = self.verified_snapshot(repo)
        except DrtoolError as exc:
            self.skipped(u.mount, f"blob eviction skipped: {exc}")
            return
        if snap is None:
            return
        height = self.best_height if self.best_height is not None else best_block_height(snap)
        if height is None:
            self.skipped(u.mount, f"blob eviction skipped: snapshot {snap.id[:8]} records no best block "
                         "height (pass --best-height)")
            return
        items = snap.sources.get("blobstores", {}).get("items", {})
        files = nbytes = 0
        try:
            for name, root in stores.items():
                ref = items.get(name)
                if not isinstance(ref, dict) or "tree" not in ref:
                    continue
                n, b, done = self._evict_store(repo, name, root, ref["tree"], height, u.mount)
                files, nbytes = files + n, nbytes + b
                if done:
                    break
        except DrtoolError as exc:  # an unreadable tree: stop evicting, keep what is left
            self.skipped(u.mount, f"blob eviction stopped: {exc}")
        if files:
            self.actions.append(Action("evict-blobs", u.mount, files, nbytes,
                                       f"blob files with delete-at-height <= {height} held by verified "
                                       f"snapshot {snap.id[:8]}"))
        else:
            self.notes.append(f"no blob file has passed its delete-at-height ({height}) while held by "
                              f"verified snapshot {snap.id[:8]}")

    def verified_snapshot(self, repo: Repository) -> Manifest | None:
        snaps = [s for s in repo.snapshots() if s.node == self.cfg.node.name and s.status == "complete"]
        if not snaps:
            self.skipped(self.cfg.node.name, "blob eviction skipped: no complete snapshot of this node")
            return None
        snap = snaps[-1]
        if not hasattr(repo, "load_tree"):
            self.skipped(repo.url, "blob eviction skipped: needs the native repository engine (tree listing)")
            return None
        if any(len(v) >= 8 and snap.id.startswith(v) for v in self.verified):
            return snap
        from drtool.progress import Progress

        with Progress(f"disk: verify {snap.id[:8]}") as progress:
            problems = [f for f in repo.check([snap], 0.0, progress) if f.severity == "error"]
        if problems:
            self.skipped(snap.id[:8], f"blob eviction skipped: verify of the latest snapshot found "
                         f"{len(problems)} problems (first: {problems[0]})")
            return None
        return snap

    def _evict_store(self, repo, name: str, root: Path, tree_id: str, height: int,
                     mount: str) -> tuple[int, int, bool]:
        """Evict from one store; (files, bytes, below critical now)."""
        files = nbytes = 0
        lookup = _TreeLookup(repo, tree_id, name)
        for rel in expired_blobs(root, height):
            blob = root / rel
            try:
                st = os.lstat(blob)
            except FileNotFoundError:
                continue
            entry = lookup.entry(rel)
            if (entry is None or entry.get("type") != "file" or entry.get("size") != st.st_size
                    or entry.get("mtime_ns") != st.st_mtime_ns or not stat.S_ISREG(st.st_mode)):
                continue  # not safely in the snapshot (absent, or changed since): kept
            nbytes += _remove(blob)
            for suffix in SIDECARS:
                nbytes += _remove(blob.with_name(blob.name + suffix))
            files += 1
            log.debug("disk: evicted %s/%s", name, rel)
            if not self.still_critical(mount):
                return files, nbytes, True
        return files, nbytes, False


def best_block_height(snap: Manifest) -> int | None:
    """The best block height a manifest records: `best_block` (or its `end`/`start`), else the
    postgres source's."""
    for value in (snap.doc.get("best_block"), snap.sources.get("postgres", {}).get("best_block")):
        if isinstance(value, dict):
            for candidate in (value, value.get("end"), value.get("start")):
                if isinstance(candidate, dict) and isinstance(candidate.get("height"), int):
                    return candidate["height"]
    return None


def expired_blobs(root: Path, height: int) -> Iterable[str]:
    """Relative paths of files under `root` whose `<file>.dah` sidecar holds a height <= `height`,
    directory by directory (so the tree lookup holds one directory's listing at a time)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in IGNORED_DIRS)
        names = set(filenames)
        for fname in sorted(filenames):
            if not fname.endswith(".dah") or is_temporary(fname) or fname[:-4] not in names:
                continue
            try:
                dah = int(Path(dirpath, fname).read_text().strip())
            except (OSError, ValueError):
                continue  # unreadable or not a height: not provably expired
            if dah <= height:
                yield os.path.relpath(os.path.join(dirpath, fname[:-4]), root)


class _TreeLookup:
    """A file's entry in a stored tree, loading each directory's tree once, one directory at a time."""

    def __init__(self, repo, tree_id: str, label: str):
        self.repo, self.root, self.label = repo, tree_id, label
        self._dir: str | None = None
        self._entries: dict[str, dict] = {}

    def entry(self, rel: str) -> dict | None:
        folder, _, name = rel.rpartition("/")
        if folder != self._dir:
            self._dir, self._entries = folder, self._load(folder)
        return self._entries.get(name)

    def _load(self, folder: str) -> dict[str, dict]:
        tree_id = self.root
        for part in [p for p in folder.split("/") if p]:
            sub = {e["name"]: e for e in self.repo.load_tree(tree_id, f"{self.label}/{folder}")}.get(part)
            if not sub or sub.get("type") != "dir":
                return {}
            tree_id = sub["subtree"]
        return {e["name"]: e for e in self.repo.load_tree(tree_id, f"{self.label}/{folder}")}


def staging_leftovers(cfg: Config) -> list[tuple[Path, str]]:
    """(folder, restore tag) of every restore staging folder next to a configured blob store:
    `.<store folder name>.drtool-staging-<snap8>-<hex6>`, a real directory. Nothing else matches."""
    out = []
    by_parent: dict[Path, set[str]] = {}
    for root in cfg.blobstores.values():
        by_parent.setdefault(root.parent, set()).add(root.name)
    for parent, names in by_parent.items():
        try:
            with os.scandir(parent) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue
        for de in entries:
            m = STAGING.match(de.name)
            if m and m.group("store") in names and de.is_dir(follow_symlinks=False):
                out.append((Path(de.path), m.group("tag")))
    return out


def _by_tag(leftovers: list[tuple[Path, str]]) -> dict[str, list[Path]]:
    groups: dict[str, list[Path]] = {}
    for path, tag in leftovers:
        groups.setdefault(tag, []).append(path)
    return groups


def _in_use(path: Path, grace: float) -> bool:
    """A running restore changes its staging (new entries: ctime, which nothing can set back) or
    holds something under it open. Looked at: the folder and two levels below (Teranode's layout)."""
    now = time.time()
    if grace > 0:
        level = [str(path)]
        for _depth in range(3):
            below = []
            for p in level:
                try:
                    if now - os.lstat(p).st_ctime < grace:
                        return True
                    if os.path.isdir(p) and not os.path.islink(p):
                        with os.scandir(p) as it:
                            below.extend(de.path for de in it)
                except OSError:
                    continue
            level = below[:10_000]
    return _open_under(str(path))


def _open_under(folder: str) -> bool:
    """Does any process (that we may look at) have a file or its cwd under `folder`?"""
    prefix = folder.rstrip("/") + "/"
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return False
    for pid in pids:
        links = [f"/proc/{pid}/cwd"]
        try:
            links += [f"/proc/{pid}/fd/{fd}" for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            pass
        for link in links:
            try:
                target = os.readlink(link)
            except OSError:
                continue
            if target == folder or target.startswith(prefix):
                return True
    return False


def _remove(path: Path) -> int:
    """Delete a file or a folder (symlinks are removed, never followed); returns the bytes freed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        path.unlink(missing_ok=True)
        return st.st_size
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for fname in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, fname)).st_size
            except OSError:
                pass
    shutil.rmtree(path, ignore_errors=True)
    return total


