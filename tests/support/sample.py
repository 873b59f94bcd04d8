"""Fixtures: the shared Teranode fixture files, and a small deterministic sample node."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from drtool.teranode.sample import SampleNode, build_sample_node

REPO = Path(__file__).resolve().parents[2]


def shared_dir() -> Path:
    """The shared folder: DRTOOL_SHARED_DIR, else `<repo>/../shared`."""
    env = os.environ.get("DRTOOL_SHARED_DIR")
    return Path(env) if env else REPO.parent / "shared"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """Real Teranode files and other shared fixtures (read-only: copy before changing)."""
    path = shared_dir() / "fixtures"
    if not (path / "teranode").is_dir():
        pytest.fail(f"shared fixtures not found at {path} (set DRTOOL_SHARED_DIR to the shared folder)")
    return path


@pytest.fixture
def sample_node(tmp_path: Path) -> SampleNode:
    """A small sample data directory at tmp_path/node: 300 tx files, 5 subtrees of at most
    256 KiB, 5 blocks (genesis included)."""
    return build_sample_node(
        tmp_path / "node", seed=1, tx_files=300, subtrees=5, blocks=5, subtree_size_range=(16 * 1024, 256 * 1024)
    )
