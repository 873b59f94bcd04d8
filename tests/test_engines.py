"""The engine-independent end-to-end tests of test_backup_restore.py, run again against the
restic engine, so the two engines cannot drift apart.

pytest collects the imported test functions here and resolves their `node` / `local_node`
arguments with this module's fixtures, which give the same sample node a restic repository
(local, and S3 on moto_server). test_backup_restore.py runs them on the native engine.

From test_whole_node.py, the quiesced whole-node snapshot, rebuild and drill (blob stores +
PostgreSQL) runs here too, its `whole_node` moved onto a restic repository.

Not reused, because they look at the native format itself: test_incremental_uploads_only_new_bytes
(reads native pack headers), test_unchanged_node_uploads_no_data (lists native object keys),
test_dry_run_stores_nothing (--dry-run is native-only). test_restic.py covers incremental
backups, damage and the unchanged case for restic in its own terms.
"""

from __future__ import annotations

import shutil
import tomllib

import pytest

from drtool import config as config_mod
from tests import test_whole_node
from tests.support.node import Node
from tests.test_backup_restore import (  # noqa: F401  (collected here, with the fixtures below)
    test_restore_refuses_nonempty_target_and_keeps_it,
    test_restore_target_that_is_a_file,
    test_round_trip_is_byte_identical,
    test_skips_temporaries_and_quorum_and_never_follows_symlinks,
)
from tests.test_restic import PASSWORD, make_restic_node, pytestmark, restic_template  # noqa: F401
from tests.test_whole_node import test_quiesced_snapshot_rebuild_and_drill  # noqa: F401


@pytest.fixture(params=["restic-local", "restic-s3"])
def node(request, tmp_path) -> Node:
    return make_restic_node(tmp_path, request, request.param.split("-", 1)[1])


@pytest.fixture
def local_node(request, tmp_path) -> Node:
    return make_restic_node(tmp_path, request, "local")


@pytest.fixture
def whole_node(tmp_path, pg_server, pg_db, restic_template) -> Node:
    """test_whole_node's node (blob stores, PostgreSQL, a fake Teranode), on a restic repository."""
    node = test_whole_node.whole_node.__wrapped__(tmp_path, pg_server, pg_db)
    sections = tomllib.loads(node.config.read_text())
    node.repo_url = sections["repository"]["url"] = f"restic:{tmp_path / 'restic-repo'}"
    node.config.write_text(config_mod.render_toml(sections))
    shutil.copytree(restic_template, tmp_path / "restic-repo")
    node.env.update(RESTIC_PASSWORD=PASSWORD, XDG_CACHE_HOME=str(tmp_path / "cache"))
    return node
