"""Single files kept with every snapshot: configuration, the node's p2p key.

Each file is stored as a small stream; the manifest keeps its original path and mode so a
restore puts a secret back with the permissions it had.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from pathlib import Path

from drtool.errors import ConfigError, SourceError
from drtool.progress import Progress
from drtool.repo.base import BackupSession, Repository

log = logging.getLogger(__name__)


def item_name(path: Path, data_dir: Path) -> str:
    """The manifest key of a file: data_dir-relative when under it, else its absolute path."""
    try:
        return str(path.relative_to(data_dir))
    except ValueError:
        return str(path)


def backup(session: BackupSession, paths: list[Path], data_dir: Path, parent: dict | None = None) -> dict:
    """Store each file (small: always read; counted unchanged when its bytes are the parent's)."""
    items = {}
    parent_items = (parent or {}).get("items", {})
    with Progress("backup files") as progress:
        for path in paths:
            try:
                with open(path, "rb") as f:
                    st = os.fstat(f.fileno())
                    if not stat.S_ISREG(st.st_mode):
                        raise SourceError(f"[files] {path}: not a regular file")
                    if st.st_mode & stat.S_IROTH:
                        log.warning("%s is world-readable; it is kept with mode %o (consider chmod 600)",
                                    path, st.st_mode & 0o777)
                    ref = session.store_stream(item_name(path, data_dir), iter(lambda: f.read(1 << 20), b""), progress)
            except FileNotFoundError:
                raise SourceError(f"[files] {path}: no such file") from None
            except PermissionError:
                raise SourceError(f"[files] {path}: permission denied") from None
            items[item_name(path, data_dir)] = {**ref, "path": str(path), "mode": st.st_mode & 0o7777,
                                                "mtime_ns": st.st_mtime_ns}
            if parent_items.get(item_name(path, data_dir), {}).get("sha256") == ref["sha256"]:
                session.stats.files_unchanged += 1
            else:
                session.stats.files_new += 1
            progress.advance(files=1)
    return {"items": items}


def restore_target(name: str, ref: dict, target_dir: Path | None, configured: list[Path] = ()) -> Path:
    """Back to its original path (only if [files] still names it: a manifest never chooses
    where drtool writes), or under --target-dir: data_dir-relative files at their relative
    path, absolute ones under DIR/files/<absolute path>."""
    from drtool.sources.blobstore import inside

    if target_dir is None:
        path = Path(ref["path"])
        if path not in configured:
            raise ConfigError(f"[files] {path}: the snapshot holds it but drtool.toml does not list it; "
                              "restore it with --target-dir")
        return path
    return inside(target_dir, "files" + name if os.path.isabs(name) else name, f"[files] {name}")


def restore_file(repo: Repository, ref: dict, staging_file: Path) -> int:
    """Write one stored file to `staging_file` (which must not exist); returns its size."""
    staging_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(staging_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    size = 0
    digest = hashlib.sha256()
    try:
        for piece in repo.read_stream(ref):
            digest.update(piece)
            os.write(fd, piece)
            size += len(piece)
        os.fchmod(fd, ref["mode"])
        os.utime(fd, ns=(ref["mtime_ns"], ref["mtime_ns"]))
    finally:
        os.close(fd)
    return size
