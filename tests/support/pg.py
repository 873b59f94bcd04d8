"""PostgreSQL fixtures: a real, throwaway cluster (drtool.pgcluster) for the tests.

`pg_server` (session): one cluster, password-authenticated superuser over TCP (scram).
`pg_db` (function): a fresh empty database on it, as a DSN with the password in it.
`start_cluster()` is usable on its own (a second cluster a test may stop, the benchmark).
"""

from __future__ import annotations

import contextlib
import secrets

import pytest

from drtool.pgcluster import PG_BIN, PgServer, pg_available, start_cluster  # noqa: F401


@pytest.fixture(scope="session")
def pg_server():
    reason = pg_available()
    if reason:
        pytest.skip(reason)
    with start_cluster() as server:
        yield server


@pytest.fixture
def pg_db(pg_server):
    """A fresh, empty database; its DSN (URL form, password included)."""
    name = "t_" + secrets.token_hex(6)
    dsn = pg_server.create_database(name)
    yield dsn
    with contextlib.suppress(Exception):
        pg_server.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
