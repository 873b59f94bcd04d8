"""The repository interface every engine (native, restic) implements.

Sources hand the engine folders (TreeSpec) and byte streams; the engine hands back opaque
references that go into the snapshot manifest. An engine never knows what Teranode is.
"""

from __future__ import annotations

import abc
import datetime as dt
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from drtool.errors import ConfigError
from drtool.findings import Finding  # noqa: F401 (part of the engine interface)
from drtool.progress import Progress

FORMAT_VERSION = 1


@dataclass
class TreeSpec:
    """A folder to back up. `exclude(relpath, is_dir)` says what is not data; `exclude_globs`
    says the same for engines that walk by themselves (restic)."""

    name: str
    root: Path
    exclude: Callable[[str, bool], bool] = lambda rel, is_dir: False
    exclude_globs: list[str] = field(default_factory=list)


@dataclass
class BackupStats:
    files_new: int = 0
    files_unchanged: int = 0
    files_vanished: int = 0
    bytes_read: int = 0
    bytes_stored: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class RestoreStats:
    files: int = 0
    dirs: int = 0
    bytes_written: int = 0


@dataclass
class Manifest:
    """A snapshot's manifest: written last; a snapshot exists only once it is."""

    id: str
    doc: dict[str, Any]

    @property
    def time(self) -> dt.datetime:
        return dt.datetime.fromisoformat(self.doc["time"])

    @property
    def tags(self) -> list[str]:
        return list(self.doc.get("tags", []))

    @property
    def status(self) -> str:
        return self.doc.get("status", "complete")

    @property
    def parent(self) -> str | None:
        return self.doc.get("parent")

    @property
    def node(self) -> str:
        return self.doc.get("node", "")

    @property
    def sources(self) -> dict[str, Any]:
        return self.doc.get("sources", {})

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "time": self.doc["time"],
            "tags": self.tags,
            "status": self.status,
            "node": self.node,
            "best_block": self.doc.get("best_block"),
            "size": self.doc.get("size", 0),
            "sources": sorted(self.sources),
        }


_BLOB_ID = re.compile(r"[0-9a-f]{64}")


def is_blob_id(value: Any) -> bool:
    return isinstance(value, str) and _BLOB_ID.fullmatch(value) is not None


def is_count(value: Any, high: int = 2**63 - 1) -> bool:
    """A non-negative integer (not a bool) up to `high`."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= high


def _ref_problem(where: str, ref: Any) -> str | None:
    if not isinstance(ref, dict):
        return f"{where} is not an object"
    for key in ("tree", "stream"):
        if key in ref and not is_blob_id(ref[key]):
            # restic engine refs name restic snapshots instead; they carry their own ids
            if "restic_snapshot" not in ref:
                return f"{where}.{key} is not a blob id"
    for key in ("path", "name", "sha256"):
        if key in ref and not isinstance(ref[key], str):
            return f"{where}.{key} is not a string"
    for key in ("mode", "mtime_ns", "size", "bytes", "files"):
        if key in ref and not is_count(ref[key]):
            return f"{where}.{key} is not a non-negative integer"
    if "mode" in ref and ref["mode"] > 0o7777:
        return f"{where}.mode is not a file mode"
    return None


def manifest_problem(doc: Any) -> str | None:
    """What makes a manifest unusable (a tampered or damaged one), or None: checked before a
    manifest is listed, so code that reads it can rely on its shape."""
    if not isinstance(doc, dict):
        return "not a JSON object"
    try:
        when = dt.datetime.fromisoformat(doc["time"])
    except (KeyError, TypeError, ValueError):
        return "no valid time"
    if when.tzinfo is None:
        return "time has no time zone"
    if not isinstance(doc.get("tags", []), list) or not all(isinstance(t, str) for t in doc.get("tags", [])):
        return "tags are not a list of strings"
    for key in ("status", "node"):
        if key in doc and not isinstance(doc[key], str):
            return f"{key} is not a string"
    if doc.get("parent") is not None and not isinstance(doc["parent"], str):
        return "parent is not a snapshot id"
    if "size" in doc and not is_count(doc["size"]):
        return "size is not a non-negative integer"
    if doc.get("best_block") is not None and not isinstance(doc["best_block"], dict):
        return "best_block is not an object"
    sources = doc.get("sources", {})
    if not isinstance(sources, dict):
        return "sources is not an object"
    for name, src in sources.items():
        if not isinstance(src, dict):
            return f"sources.{name} is not an object"
        if name in ("blobstores", "files") and "items" not in src:
            return f"sources.{name} has no items"
        if "items" in src:
            if not isinstance(src["items"], dict):
                return f"sources.{name}.items is not an object"
            for item, ref in src["items"].items():
                problem = _ref_problem(f"sources.{name}.items.{item}", ref)
                if problem:
                    return problem
                if name in ("blobstores", "files") and not isinstance(ref.get("path"), str):
                    return f"sources.{name}.items.{item}.path is missing"
                if name == "files" and not all(is_count(ref.get(k)) for k in ("mode", "mtime_ns")):
                    return f"sources.{name}.items.{item} has no mode or mtime"
        else:
            problem = _ref_problem(f"sources.{name}", src)
            if problem:
                return problem
    return None


class BackupSession(abc.ABC):
    """One backup in progress: store trees and streams, then commit the manifest (or abort)."""

    stats: BackupStats

    @abc.abstractmethod
    def store_tree(self, spec: TreeSpec, parent_ref: dict | None, progress: Progress) -> dict:
        """Back up a folder; returns the reference for the manifest (with files/bytes counts)."""

    @abc.abstractmethod
    def store_stream(self, name: str, pieces: Iterable[bytes], progress: Progress, level: int | None = None) -> dict:
        """Back up a byte stream; returns its reference (with size and sha256). `level` overrides
        the repository's compression level for it (engines without levels ignore it)."""

    @abc.abstractmethod
    def commit(self, doc: dict[str, Any]) -> Manifest:
        """Write the manifest, last and put-if-absent. The snapshot exists from here on."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Give up: release locks; what was uploaded stays for the next run to reuse."""


class Repository(abc.ABC):
    url: str

    @abc.abstractmethod
    def snapshots(self) -> list[Manifest]:
        """Every snapshot, oldest first."""

    def find(self, ref: str) -> Manifest:
        """A snapshot by id, unique id prefix, or `latest`."""
        snaps = self.snapshots()
        if ref == "latest":
            if not snaps:
                raise ConfigError("snapshot latest: the repository has no snapshots")
            return snaps[-1]
        matches = [s for s in snaps if s.id.startswith(ref)] if ref else []
        if not matches:
            raise ConfigError(f"snapshot {ref}: no such snapshot")
        if len(matches) > 1:
            raise ConfigError(f"snapshot {ref}: prefix is ambiguous ({len(matches)} snapshots match)")
        return matches[0]

    @abc.abstractmethod
    def begin_backup(self, command: str = "backup", wait: float = 0.0, dry_run: bool = False) -> BackupSession:
        """Start a backup under a shared lock, waiting up to `wait` seconds for an exclusive one.
        A dry run reads and measures what would be stored, and stores nothing."""

    @abc.abstractmethod
    def restore_tree(self, ref: dict, dest: Path, progress: Progress,
                     on_folder_done: Callable[[Path], None] | None = None) -> RestoreStats:
        """Write a stored folder into `dest` (which exists and is empty), checking every byte.
        `on_folder_done(path)` is called for each top-level folder once all of it is written
        (an engine that cannot tell may not call it at all), so checks can overlap the writing."""

    @abc.abstractmethod
    def read_stream(self, ref: dict, views: bool = False) -> Iterator[bytes]:
        """The bytes of a stored stream, each piece checked before it is yielded. `views`: the
        consumer only writes the pieces on, so they may be memoryviews (no copy of each chunk)."""

    @abc.abstractmethod
    def check(self, snapshots: list[Manifest], read_fraction: float, progress: Progress) -> list[Finding]:
        """Repository integrity for these snapshots; read and hash `read_fraction` of the data."""

    @abc.abstractmethod
    def lock(self, command: str, exclusive: bool, break_stale: bool = False, wait: float = 0.0):
        """A repository lock (with .release()); waits up to `wait` seconds for others to finish."""

    @abc.abstractmethod
    def forget(self, manifests: list[Manifest]) -> None:
        """Remove these snapshots' manifests (their data stays until collect_garbage)."""

    @abc.abstractmethod
    def collect_garbage(self, progress: Progress) -> dict[str, int]:
        """Delete what no remaining snapshot references: {"objects_deleted", "bytes_freed", ...}."""

    def close(self) -> None:
        pass
