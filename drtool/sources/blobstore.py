"""Teranode's file stores (external txs, subtrees, blocks, a configured tx store).

What is data and what is not comes from Teranode's writers: `*.tmp` siblings of atomic
writes and `subtree_quorum/` lock files are skipped; `.sha256` and `.dah` sidecars are
ordinary files in the same folder, so they travel with their blobs.
"""

from __future__ import annotations

import os
from pathlib import Path

from drtool.errors import ConfigError, IntegrityError
from drtool.progress import Progress
from drtool.repo.base import BackupSession, Repository, RestoreStats, TreeSpec
from drtool.teranode.filetypes import IGNORED_DIRS, is_temporary

EXCLUDE_GLOBS = ["*.tmp", "subtree_quorum"]  # the same rules, for engines that walk by themselves


def _exclude(relpath: str, is_dir: bool) -> bool:
    name = relpath.rsplit("/", 1)[-1]
    return name in IGNORED_DIRS if is_dir else is_temporary(name)


def tree_spec(name: str, root: Path) -> TreeSpec:
    return TreeSpec(name=name, root=root, exclude=_exclude, exclude_globs=list(EXCLUDE_GLOBS))


def backup(session: BackupSession, stores: dict[str, Path], data_dir: Path, parent: dict | None) -> dict:
    """Store every configured blob store; returns the manifest's `blobstores` source."""
    items = {}
    parent_items = (parent or {}).get("items", {})
    for name, root in stores.items():
        with Progress(f"backup {name}") as progress:
            ref = session.store_tree(tree_spec(name, root), parent_items.get(name), progress)
        items[name] = {**ref, "path": display_path(root, data_dir)}
    return {"items": items}


def display_path(path: Path, data_dir: Path) -> str:
    """A store's path as the manifest records it: relative to data_dir when under it."""
    try:
        return str(path.relative_to(data_dir))
    except ValueError:
        return str(path)


def inside(target_dir: Path, relative: str, what: str) -> Path:
    """target_dir/relative, refusing what a tampered manifest could use to leave target_dir."""
    parts = Path(relative).parts
    if not relative or os.path.isabs(relative) or ".." in parts or "\0" in relative:
        raise IntegrityError(f"{what}: unsafe path {relative!r} in the manifest (tampered?); nothing restored")
    return target_dir / relative


def restore_target(name: str, recorded_path: str, target_dir: Path | None, configured: Path | None) -> Path:
    """Where a store goes back: under --target-dir at its data_dir-relative path (absolute
    stores under DIR/<name>), else its configured path (or the recorded one)."""
    if target_dir is not None:
        return inside(target_dir, name if os.path.isabs(recorded_path) else recorded_path, f"blob store {name}")
    if configured is not None:
        return configured
    raise ConfigError(f"blob store {name}: the snapshot holds it but drtool.toml does not configure it; "
                      "restore it with --target-dir")


def restore_into(repo: Repository, ref: dict, staging: Path, label: str, on_folder_done=None) -> RestoreStats:
    with Progress(f"restore {label}", total_bytes=ref.get("bytes")) as progress:
        return repo.restore_tree(ref, staging, progress, on_folder_done)
