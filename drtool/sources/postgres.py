"""The PostgreSQL source: Teranode's blockchain database.

Backup: `dump_stream` runs `pg_dump -Fc -Z0` (drtool compresses) inside an exported
REPEATABLE READ snapshot, so the row counts and best block it records describe exactly the
rows in the dump. The dump is handed on as an iterator of byte chunks and is never staged on
local disk; it fails (SourceError) when pg_dump fails or is killed, before the stream ends.

Restore: `restore_stream` never touches the target database until the restore has succeeded
and been checked. It restores into a fresh scratch database on the same server, runs
`check_database`, then swaps the scratch database in with ALTER DATABASE ... RENAME. A
non-empty target is refused without `force`; with `force` it is renamed aside
(`<name>__drtool_old_<time>`), never dropped, so an operator can still go back to it.
An existing but empty target (no user tables) is dropped before the swap.

Passwords: taken from the DSN, PGPASSWORD or .pgpass (libpq reads those itself). A DSN
password is given to child processes through the PGPASSWORD environment variable, never on
their command line, and is registered with drtool.secrets so no message can show it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import glob
import hashlib
import logging
import os
import random
import re
import secrets as pysecrets
import shutil
import signal
import struct
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import psycopg
from psycopg import conninfo as pg_conninfo
from psycopg import sql

from drtool.errors import ConfigError, DrtoolError, IntegrityError, SourceError
from drtool.findings import Finding
from drtool.secrets import redact, register

log = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 20  # bytes read from pg_dump at a time: bounds the memory a dump needs
STDERR_TAIL = 8192  # bytes of a child's stderr kept for error messages
MAINTENANCE_DB = "postgres"
PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"
SYSTEM_SCHEMAS = ("pg_catalog", "information_schema", "pg_toast")

# Teranode's tip, as its store reads it (GetBestBlockHeader.go)
BEST_BLOCK_SQL = """
    SELECT id, height, hash FROM blocks WHERE invalid = false
    ORDER BY chain_work DESC, peer_id ASC, id ASC LIMIT 1
"""


# ---------------------------------------------------------------------------------------
# DSNs
# ---------------------------------------------------------------------------------------


def parse_dsn(dsn: str) -> dict[str, str]:
    """The libpq parameters of a URL or key=value DSN; registers its password as a secret."""
    try:
        params = pg_conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise ConfigError(f"postgres DSN {redact(dsn)!r}: {redact(str(exc)).splitlines()[0]}") from None
    register(params.get("password"))
    register(os.environ.get("PGPASSWORD"))
    return {k: str(v) for k, v in params.items() if v is not None}


def display_dsn(dsn: str) -> str:
    """The DSN as key=value text with the password masked: safe for logs and messages."""
    try:
        params = parse_dsn(dsn)
    except ConfigError:
        return redact(dsn)
    if "password" in params:
        params["password"] = "****"
    return redact(pg_conninfo.make_conninfo(**params))


def dsn_with(dsn: str, **changes: str) -> str:
    """The DSN with some parameters replaced, e.g. another dbname on the same server."""
    params = parse_dsn(dsn)
    params.update(changes)
    return pg_conninfo.make_conninfo(**params)


def database_name(dsn: str) -> str:
    """The database a DSN names (libpq's default: the user name)."""
    params = parse_dsn(dsn)
    name = params.get("dbname") or params.get("user") or os.environ.get("PGDATABASE") or os.environ.get("PGUSER")
    if not name:
        raise ConfigError(f"postgres DSN {display_dsn(dsn)}: names no database")
    return name


def child_conninfo(dsn: str) -> tuple[str, dict[str, str]]:
    """(conninfo without password, environment) for running pg_dump/pg_restore on a DSN.

    The password moves from the DSN into PGPASSWORD, so it never shows on a command line
    (visible to every user through /proc). TLS and other parameters stay in the conninfo.
    """
    params = parse_dsn(dsn)
    env = dict(os.environ)
    password = params.pop("password", None)
    if password is not None:
        env["PGPASSWORD"] = password
    return pg_conninfo.make_conninfo(**params), env


def connect(dsn: str, *, autocommit: bool = False, what: str = "connect") -> psycopg.Connection:
    """A psycopg connection, or SourceError naming the (redacted) DSN."""
    params = parse_dsn(dsn)  # also registers the password before any message can carry it
    timeout = {} if "connect_timeout" in params else {"connect_timeout": int(os.environ.get("PGCONNECT_TIMEOUT", "10"))}
    try:
        return psycopg.connect(dsn, autocommit=autocommit, **timeout)
    except psycopg.Error as exc:
        raise SourceError(f"postgres {display_dsn(dsn)}: cannot {what}: {_one_line(exc)}") from None


def _one_line(exc: BaseException | str) -> str:
    text = " ".join(str(exc).split())
    return redact(text)[:500]


# ---------------------------------------------------------------------------------------
# pg_dump / pg_restore binaries
# ---------------------------------------------------------------------------------------

_VERSION = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")


def tool_major(path: str) -> int:
    """The major version of a PostgreSQL client program (`pg_dump --version`)."""
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30, check=False).stdout
    except OSError as exc:
        raise ConfigError(f"{path}: cannot run: {exc.strerror}") from None
    m = _VERSION.search(out)
    if not m:
        raise ConfigError(f"{path}: not a PostgreSQL tool (--version said {out.strip()[:80]!r})")
    return int(m.group(1))


def find_pg_tool(name: str, configured_path: str | None = None, *, server_major: int | None = None) -> str:
    """Path of pg_dump/pg_restore: the configured one, else PATH, else the newest in
    /usr/lib/postgresql/*/bin. With `server_major`, a tool older than the server is an error
    (pg_dump refuses newer servers, and an older pg_restore may not read the archive)."""
    if configured_path:
        if not (os.path.isfile(configured_path) and os.access(configured_path, os.X_OK)):
            raise ConfigError(f"[postgres] {name} = {configured_path!r}: not an executable file")
        candidates = [configured_path]
    else:
        on_path = shutil.which(name)
        versioned = sorted(glob.glob(os.path.join(PG_BIN_GLOB, name)), key=_bin_dir_version, reverse=True)
        versioned = [p for p in versioned if os.access(p, os.X_OK)]
        if on_path and os.path.basename(os.path.realpath(on_path)) == "pg_wrapper":
            # Debian's wrapper (Perl) picks the newest installed version too, 70 ms later per
            # run: the binaries it would pick come first.
            candidates = versioned + [on_path]
        else:
            candidates = ([on_path] if on_path else []) + versioned
        if not candidates:
            raise ConfigError(f"{name}: not found on PATH nor in {PG_BIN_GLOB}; install the PostgreSQL client or set [postgres] {name}")
    if server_major is None:
        return candidates[0]
    found = []
    for path in candidates:
        major = tool_major(path)
        if major >= server_major:
            return path
        found.append(f"{path} is {major}")
    raise ConfigError(
        f"{name}: server is PostgreSQL {server_major} but {', '.join(found)}: "
        f"install PostgreSQL {server_major}+ client tools or set [postgres] {name}"
    )


def _bin_dir_version(path: str) -> float:
    try:
        return float(Path(path).parent.parent.name)
    except ValueError:
        return 0.0


# ---------------------------------------------------------------------------------------
# Child processes
# ---------------------------------------------------------------------------------------


class _StderrTail:
    """Reads a child's stderr in a thread (so it can never block the child) and keeps the tail."""

    def __init__(self, stream) -> None:
        self._buf: deque[bytes] = deque()
        self._size = 0
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream) -> None:
        for line in iter(stream.readline, b""):
            self._buf.append(line)
            self._size += len(line)
            while self._size > STDERR_TAIL and len(self._buf) > 1:
                self._size -= len(self._buf.popleft())
        stream.close()

    def text(self) -> str:
        self._thread.join(timeout=10)
        return redact(b"".join(self._buf).decode("utf-8", "replace").strip())


def _exit_reason(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


def _widen_pipe(fd: int) -> None:
    """A 1 MiB pipe instead of 64 KiB: pg_dump/pg_restore and drtool wake each other 16x less
    often for the same bytes. Best effort (Linux; /proc/sys/fs/pipe-max-size may forbid it)."""
    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------------------
# Backup
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class BestBlock:
    height: int
    hash: str  # display form: byte-reversed hex, as block explorers and Teranode's logs show it
    id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"height": self.height, "hash": self.hash}


@dataclasses.dataclass
class DumpMetadata:
    """What a backup records about the database; `dump_size`/`dump_sha256` once the stream ended."""

    database: str
    server_version: str
    server_version_num: int
    row_counts: dict[str, int]
    best_block: BestBlock | None
    state_keys: list[str]
    dump_format: str = "pg_dump -Fc -Z0"
    dump_size: int | None = None
    dump_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["best_block"] = self.best_block.to_dict() if self.best_block else None
        return d


class DumpStream:
    """An iterator of pg_dump's output chunks, plus `.metadata`.

    Size and SHA-256 are computed while the chunks pass; a failed or killed pg_dump raises
    SourceError from the iteration itself, so a consumer never sees a normal end of a
    broken dump.
    """

    def __init__(self, proc: subprocess.Popen, stderr: _StderrTail, metadata: DumpMetadata, chunk_size: int,
                 hash_dump: bool = True) -> None:
        self._proc = proc
        self._stderr = stderr
        self.metadata = metadata
        self._chunk_size = chunk_size
        # A consumer that hashes the stream itself (the repository) says so: one pass, not two.
        self._sha = hashlib.sha256() if hash_dump else None
        self._size = 0
        self.finished = False
        self._failed: SourceError | None = None
        self._pending = b""  # read() leftovers

    @property
    def pid(self) -> int:
        return self._proc.pid

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self.finished:
            raise StopIteration
        if self._failed:
            raise self._failed
        chunk = self._proc.stdout.read(self._chunk_size)
        if not chunk:
            self._end()
            raise StopIteration
        self._took(chunk)
        return chunk

    def readinto(self, buf) -> int:
        """Fill `buf` (a writable buffer) as far as pg_dump's output goes; 0 at the checked end.
        The repository reads this way, into one buffer it reuses: no allocation per chunk."""
        if self.finished:
            return 0
        if self._failed:
            raise self._failed
        if self._pending:  # read() leftovers come first
            n = min(len(buf), len(self._pending))
            buf[:n] = self._pending[:n]
            self._pending = self._pending[n:]
            return n
        n = self._proc.stdout.readinto(buf)
        if not n:
            self._end()
            return 0
        self._took(memoryview(buf)[:n])
        return n

    def _took(self, chunk) -> None:
        if self._size == 0 and bytes(chunk[:5]) != b"PGDMP":
            self._fail("did not write a custom-format archive")
        if self._sha is not None:
            self._sha.update(chunk)
        self._size += len(chunk)

    def _end(self) -> None:
        """pg_dump closed its output: a normal end only if it exited 0 having written something."""
        returncode = self._proc.wait()
        if returncode != 0:
            self._fail(_exit_reason(returncode))
        if self._size == 0:
            self._fail("wrote nothing")
        self.metadata.dump_size = self._size
        self.metadata.dump_sha256 = self._sha.hexdigest() if self._sha is not None else None
        self.finished = True
        warnings = self._stderr.text()
        if warnings:
            log.warning("pg_dump of %s: %s", self.metadata.database, warnings)
        log.info("pg_dump of %s finished: %d bytes", self.metadata.database, self._size)

    def read(self, size: int = -1) -> bytes:
        """File-like access for consumers that read(); b"" at the (checked) end."""
        out = bytearray(self._pending)
        self._pending = b""
        while size < 0 or len(out) < size:
            try:
                out += next(self)
            except StopIteration:
                break
        if 0 <= size < len(out):
            self._pending = bytes(out[size:])
            del out[size:]
        return bytes(out)

    def _fail(self, reason: str) -> None:
        _stop(self._proc)
        tail = self._stderr.text()
        detail = f": {tail.splitlines()[-1]}" if tail else ""
        if tail:
            log.error("pg_dump stderr:\n%s", tail)
        self._failed = SourceError(f"pg_dump of database {self.metadata.database!r} {reason}{detail}")
        raise self._failed

    def close(self) -> None:
        """Stop pg_dump if still running (the consumer gave up)."""
        _stop(self._proc)
        self._proc.stdout.close()


def read_metadata(conn: psycopg.Connection, database: str) -> DumpMetadata:
    """Server version, row counts, best block and state keys, read on `conn` (its snapshot)."""
    server_version = conn.execute("SHOW server_version").fetchone()[0]
    tables = _user_tables(conn)
    counts = {}
    for schema, table in tables:
        q = sql.SQL("SELECT count(*) FROM {}.{}").format(sql.Identifier(schema), sql.Identifier(table))
        counts[_qualified(schema, table)] = conn.execute(q).fetchone()[0]
    names = {t for s, t in tables if s == "public"}
    best = best_block(conn) if "blocks" in names else None
    state_keys = [r[0] for r in conn.execute("SELECT key FROM state ORDER BY key")] if "state" in names else []
    return DumpMetadata(
        database=database,
        server_version=server_version,
        server_version_num=conn.info.server_version,
        row_counts=counts,
        best_block=best,
        state_keys=state_keys,
    )


def best_block(conn: psycopg.Connection) -> BestBlock | None:
    row = conn.execute(BEST_BLOCK_SQL).fetchone()
    if row is None:
        return None
    return BestBlock(height=row[1], hash=bytes(row[2])[::-1].hex(), id=row[0])


def current_best_block(dsn: str) -> dict[str, Any] | None:
    """The chain tip now (height, hash), or None for an empty chain."""
    with contextlib.closing(connect(dsn, autocommit=True, what="read the best block")) as conn:
        if "blocks" not in {t for s, t in _user_tables(conn) if s == "public"}:
            raise SourceError(f"database {database_name(dsn)!r} on {display_dsn(dsn)}: no Teranode `blocks` table "
                              "(is [postgres] dsn Teranode's blockchain database?)")
        found = best_block(conn)
    return found.to_dict() if found else None


def _user_tables(conn: psycopg.Connection) -> list[tuple[str, str]]:
    rows = conn.execute(
        "SELECT schemaname, tablename FROM pg_catalog.pg_tables"
        " WHERE schemaname <> ALL(%s) AND schemaname NOT LIKE 'pg_temp%%' ORDER BY 1, 2",
        (list(SYSTEM_SCHEMAS),),
    ).fetchall()
    return [(r[0], r[1]) for r in rows]


def _qualified(schema: str, table: str) -> str:
    return table if schema == "public" else f"{schema}.{table}"


@contextlib.contextmanager
def dump_stream(dsn: str, *, pg_dump: str | None = None, chunk_size: int = CHUNK_SIZE,
                extra_args: Iterable[str] = (), hash_dump: bool = True) -> Iterator[DumpStream]:
    """Stream a consistent `pg_dump -Fc -Z0` of the DSN's database.

    Opens a REPEATABLE READ transaction, reads the metadata in it, exports its snapshot and
    runs pg_dump on that snapshot, keeping the exporting transaction open until pg_dump is
    done. Yields a DumpStream; on exit pg_dump's exit status and stderr are checked.
    """
    database = database_name(dsn)
    conn = connect(dsn, autocommit=True, what=f"open database {database!r}")
    proc = None
    try:
        try:
            # The exporting transaction sits idle while pg_dump runs: no server timeout may end it.
            conn.execute("SET idle_in_transaction_session_timeout = 0")
            conn.execute("SET statement_timeout = 0")
            conn.autocommit = False
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            conn.read_only = True
            snapshot_id = conn.execute("SELECT pg_export_snapshot()").fetchone()[0]
            metadata = read_metadata(conn, database)
        except psycopg.Error as exc:
            raise SourceError(f"postgres {display_dsn(dsn)}: reading database {database!r}: {_one_line(exc)}") from None
        tool = find_pg_tool("pg_dump", pg_dump, server_major=conn.info.server_version // 10000)
        conninfo, env = child_conninfo(dsn)
        argv = [tool, "--format=custom", "--compress=0", f"--snapshot={snapshot_id}", *extra_args, f"--dbname={conninfo}"]
        log.info("dumping %s (PostgreSQL %s, best block %s) with %s",
                 display_dsn(dsn), metadata.server_version,
                 metadata.best_block.to_dict() if metadata.best_block else None, tool)
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        _widen_pipe(proc.stdout.fileno())
        stream = DumpStream(proc, _StderrTail(proc.stderr), metadata, chunk_size, hash_dump)
        try:
            yield stream
        except BaseException:
            stream.close()
            raise
        if not stream.finished:
            stream.close()
            if stream._failed:
                raise stream._failed
            raise SourceError(f"pg_dump of database {database!r}: the stream was not read to its end")
    finally:
        if proc is not None:
            _stop(proc)
        with contextlib.suppress(psycopg.Error):
            conn.rollback()
        with contextlib.suppress(psycopg.Error):
            conn.close()


# ---------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------


MAX_ROW_FINDINGS = 20  # per kind of damage: enough to act on, without flooding a report


def _expected_dict(expected: DumpMetadata | dict | None) -> dict:
    if expected is None:
        return {}
    if isinstance(expected, DumpMetadata):
        return expected.to_dict()
    return dict(expected)


def _block_name(height: int, hash_le: bytes | memoryview | None) -> str:
    h = bytes(hash_le)[::-1].hex() if hash_le is not None else "?"
    return f"blocks row height {height} hash {h}"


def check_database(dsn: str, expected: DumpMetadata | dict | None = None) -> list[Finding]:
    """Check a (restored) Teranode database as Teranode would check itself.

    Row counts equal the recorded ones; every block but genesis has its parent, with
    height - 1, a lower chain work and the hash its previous_hash names; exactly one genesis
    at height 0; the chain from the tip (max chain_work among valid blocks) back to genesis
    has exactly one block per height; the tip equals the recorded best block; `state` holds
    the keys it held at backup.
    """
    exp = _expected_dict(expected)
    findings: list[Finding] = []
    database = database_name(dsn)
    with contextlib.closing(connect(dsn, what=f"check database {database!r}")) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        try:
            tables = _user_tables(conn)
            present = {_qualified(s, t): (s, t) for s, t in tables}
            for name, count in sorted((exp.get("row_counts") or {}).items()):
                if name not in present:
                    findings.append(Finding(f"table {name}", f"missing (backup had {count} rows)"))
                    continue
                s, t = present[name]
                q = sql.SQL("SELECT count(*) FROM {}.{}").format(sql.Identifier(s), sql.Identifier(t))
                actual = conn.execute(q).fetchone()[0]
                if actual != count:
                    findings.append(Finding(f"table {name}", f"{actual} rows, backup had {count}"))
            if exp.get("row_counts") is not None:
                for name in sorted(set(present) - set(exp["row_counts"])):
                    findings.append(Finding(f"table {name}", "not in the backup"))
            if "blocks" in present:
                findings += _check_chain(conn, exp.get("best_block"))
            elif exp.get("best_block"):
                findings.append(Finding("table blocks", "missing, but the backup recorded a best block"))
            if exp.get("state_keys") and "state" in present:
                have = {r[0] for r in conn.execute("SELECT key FROM state")}
                for key in exp["state_keys"]:
                    if key not in have:
                        findings.append(Finding(f"state row key {key!r}", "missing"))
        except psycopg.Error as exc:
            findings.append(Finding(f"database {database}", f"check failed: {_one_line(exc)}"))
        finally:
            with contextlib.suppress(psycopg.Error):
                conn.rollback()
    for f in findings:
        log.warning("check %s: %s", database, f)
    return findings


def _check_chain(conn: psycopg.Connection, expected_best: dict | None) -> list[Finding]:
    out: list[Finding] = []
    lim = MAX_ROW_FINDINGS
    genesis = conn.execute("SELECT id, hash FROM blocks WHERE height = 0 ORDER BY id").fetchall()
    if len(genesis) != 1:
        out.append(Finding("blocks", f"{len(genesis)} genesis blocks at height 0, expected exactly 1"))

    for height, hash_, parent_id in conn.execute(
        "SELECT b.height, b.hash, b.parent_id FROM blocks b LEFT JOIN blocks p ON p.id = b.parent_id"
        " WHERE b.height > 0 AND (p.id IS NULL OR p.id = b.id) ORDER BY b.height LIMIT %s", (lim,)
    ):
        out.append(Finding(_block_name(height, hash_), f"parent (id {parent_id}) is missing"))
    for height, hash_, p_height, p_hash, prev_hash, worse in conn.execute(
        "SELECT b.height, b.hash, p.height, p.hash, b.previous_hash, p.chain_work >= b.chain_work"
        " FROM blocks b JOIN blocks p ON p.id = b.parent_id"
        " WHERE b.height > 0 AND p.id <> b.id"
        "   AND (p.height <> b.height - 1 OR p.chain_work >= b.chain_work OR p.hash <> b.previous_hash)"
        " ORDER BY b.height LIMIT %s", (lim,)
    ):
        problems = []
        if p_height != height - 1:
            problems.append(f"parent is at height {p_height}, expected {height - 1}")
        if bytes(p_hash) != bytes(prev_hash):
            problems.append(f"parent hash {bytes(p_hash)[::-1].hex()} differs from previous_hash {bytes(prev_hash)[::-1].hex()}")
        if worse:
            problems.append("parent's chain_work is not lower")
        out.append(Finding(_block_name(height, hash_), "; ".join(problems)))

    tip = best_block(conn)
    if tip is None:
        out.append(Finding("blocks", "no valid block: no chain tip"))
        return out
    if expected_best:
        if (tip.height, tip.hash) != (expected_best.get("height"), expected_best.get("hash")):
            out.append(Finding("best block", f"height {tip.height} hash {tip.hash}, backup recorded "
                                             f"height {expected_best.get('height')} hash {expected_best.get('hash')}"))
    # Walk from the tip to genesis (depth-bounded: a re-linked parent could form a cycle).
    count, heights, low = conn.execute(
        """
        WITH RECURSIVE chain(id, parent_id, height, depth) AS (
            SELECT id, parent_id, height, 0 FROM blocks WHERE id = %(tip)s
            UNION ALL
            SELECT b.id, b.parent_id, b.height, c.depth + 1
            FROM blocks b JOIN chain c ON b.id = c.parent_id
            WHERE b.id <> c.id AND c.depth <= %(tip_height)s
        )
        SELECT count(*), count(DISTINCT height), min(height) FROM chain
        """,
        {"tip": tip.id, "tip_height": tip.height},
    ).fetchone()
    if count != tip.height + 1 or heights != count or low != 0:
        lowest = conn.execute(
            """
            WITH RECURSIVE chain(id, parent_id, height, hash, depth) AS (
                SELECT id, parent_id, height, hash, 0 FROM blocks WHERE id = %(tip)s
                UNION ALL
                SELECT b.id, b.parent_id, b.height, b.hash, c.depth + 1
                FROM blocks b JOIN chain c ON b.id = c.parent_id
                WHERE b.id <> c.id AND c.depth <= %(tip_height)s
            )
            SELECT height, hash, parent_id FROM chain ORDER BY depth DESC LIMIT 1
            """,
            {"tip": tip.id, "tip_height": tip.height},
        ).fetchone()
        out.append(Finding(
            "main chain",
            f"from the tip at height {tip.height} back to genesis: {count} blocks at {heights} heights "
            f"(expected {tip.height + 1}); the walk ends at {_block_name(lowest[0], lowest[1])} (parent id {lowest[2]})",
        ))
    return out


# ---------------------------------------------------------------------------------------
# Restore
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class RestoreResult:
    database: str
    bytes_restored: int
    findings: list[Finding]
    previous_database: str | None  # where a forced restore moved the old database
    seconds: float


def _user_table_count(dsn: str) -> int:
    with contextlib.closing(connect(dsn, autocommit=True, what="inspect the target")) as conn:
        return len(_user_tables(conn))


def _db_exists(admin: psycopg.Connection, name: str) -> bool:
    return admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None


def _scratch_name(target: str, kind: str) -> str:
    suffix = f"__drtool_{kind}_{time.strftime('%Y%m%d%H%M%S')}_{pysecrets.token_hex(2)}"
    return target.encode()[: 63 - len(suffix)].decode("utf-8", "ignore") + suffix


def _drop_database(admin: psycopg.Connection, name: str) -> None:
    admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@dataclasses.dataclass
class StagedDatabase:
    """A restored, checked scratch database waiting to be renamed into place (or dropped)."""

    dsn: str
    target: str
    scratch: str
    exists: bool
    force: bool
    bytes_restored: int
    findings: list[Finding]
    started: float

    @property
    def scratch_dsn(self) -> str:
        return dsn_with(self.dsn, dbname=self.scratch)

    def _admin(self) -> psycopg.Connection:
        return connect(dsn_with(self.dsn, dbname=MAINTENANCE_DB), autocommit=True,
                       what="connect to the maintenance database")

    def publish(self) -> RestoreResult:
        admin = self._admin()
        try:
            previous = _swap_in(admin, self.scratch, self.target, exists=self.exists, force=self.force, dsn=self.dsn)
        except psycopg.Error as exc:
            raise SourceError(f"restore into database {self.target!r}: {_one_line(exc)}") from None
        finally:
            admin.close()
        log.info("restored database %s (%d bytes of dump)", self.target, self.bytes_restored)
        return RestoreResult(self.target, self.bytes_restored, self.findings, previous, time.monotonic() - self.started)

    def discard(self) -> None:
        with contextlib.suppress(psycopg.Error, DrtoolError):
            admin = self._admin()
            try:
                _drop_database(admin, self.scratch)
            finally:
                admin.close()


def stage_restore(chunks: Iterable[bytes], dsn: str, *, jobs: int = 1, force: bool = False,
                  spool_dir: str | os.PathLike | None = None, size_hint: int | None = None,
                  expected: DumpMetadata | dict | None = None, pg_restore: str | None = None,
                  no_owner: bool = False) -> StagedDatabase:
    """Restore a pg_dump -Fc stream into a scratch database beside the DSN's and check it.

    jobs > 1 spools the stream to a file in `spool_dir` (pg_restore -j needs a seekable
    archive), after checking there is room for `size_hint` bytes. Raises IntegrityError (with
    `.findings`) when the checks fail; the scratch database is then dropped. The target is not
    touched until `publish()`.
    """
    started = time.monotonic()
    target = database_name(dsn)
    if target in (MAINTENANCE_DB, "template0", "template1"):
        raise ConfigError(f"restore target database {target!r}: a system database; name the Teranode database")
    exp = _expected_dict(expected)
    if size_hint is None:
        size_hint = exp.get("dump_size")
    admin_dsn = dsn_with(dsn, dbname=MAINTENANCE_DB)
    admin = connect(admin_dsn, autocommit=True, what="connect to the maintenance database")
    scratch = None
    try:
        server_major = admin.info.server_version // 10000
        tool = find_pg_tool("pg_restore", pg_restore, server_major=server_major)
        exists = _db_exists(admin, target)
        if exists and not force and _user_table_count(dsn) > 0:
            raise ConfigError(f"restore target database {target!r} is not empty: use --force to replace it "
                              f"(the old one is kept under another name)")
        scratch = _scratch_name(target, "new")
        admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(scratch)))
        log.info("restoring into scratch database %s on %s", scratch, display_dsn(admin_dsn))
        restored = _run_pg_restore(tool, chunks, dsn_with(dsn, dbname=scratch), jobs=jobs,
                                   spool_dir=spool_dir, size_hint=size_hint, no_owner=no_owner, target=target)
        findings = check_database(dsn_with(dsn, dbname=scratch), expected) if expected is not None else []
        if findings:
            err = IntegrityError(f"restored database {target!r} failed {len(findings)} check(s), first: {findings[0]}")
            err.findings = findings  # type: ignore[attr-defined]
            raise err
        staged = StagedDatabase(dsn, target, scratch, exists, force, restored, findings, started)
        scratch = None
        return staged
    except psycopg.Error as exc:
        raise SourceError(f"restore into database {target!r} on {display_dsn(admin_dsn)}: {_one_line(exc)}") from None
    finally:
        if scratch is not None:
            with contextlib.suppress(psycopg.Error):
                _drop_database(admin, scratch)
        admin.close()


def restore_stream(chunks: Iterable[bytes], dsn: str, **options: Any) -> RestoreResult:
    """Restore a pg_dump -Fc stream into the DSN's database (created when missing): into a
    scratch database first, checked, then renamed into place (see stage_restore)."""
    staged = stage_restore(chunks, dsn, **options)
    try:
        return staged.publish()
    except BaseException:
        staged.discard()
        raise


def _sessions(admin: psycopg.Connection, name: str, wait: float = 5.0) -> int:
    """Sessions open on a database, given a few seconds to go: a backend lingers a moment
    after its client (e.g. our own emptiness check) disconnected."""
    deadline = time.monotonic() + wait
    while True:
        n = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                          (name,)).fetchone()[0]
        if n == 0 or time.monotonic() > deadline:
            return n
        time.sleep(0.1)


def _swap_in(admin: psycopg.Connection, scratch: str, target: str, *, exists: bool, force: bool, dsn: str) -> str | None:
    previous = None
    if exists and _db_exists(admin, target):
        # Re-checked here: the target may have been filled while we restored.
        nonempty = _user_table_count(dsn) > 0
        if nonempty and not force:
            raise ConfigError(f"restore target database {target!r} is not empty: use --force to replace it")
        sessions = _sessions(admin, target)
        if sessions and not force:
            raise DrtoolError(f"restore target database {target!r} has {sessions} open session(s): stop its clients or use --force")
        if sessions:
            log.warning("terminating %d session(s) on %s", sessions, target)
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (target,))
        if nonempty:
            previous = _scratch_name(target, "old")
            admin.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(target), sql.Identifier(previous)))
            log.warning("the old database %s is kept as %s: drop it when the restore is confirmed", target, previous)
        else:
            _drop_database(admin, target)
    admin.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(scratch), sql.Identifier(target)))
    return previous


def _run_pg_restore(tool: str, chunks: Iterable[bytes], dsn: str, *, jobs: int, spool_dir, size_hint: int | None,
                    no_owner: bool, target: str) -> int:
    conninfo, env = child_conninfo(dsn)
    argv = [tool, "--exit-on-error", f"--dbname={conninfo}"]
    if no_owner:
        argv.append("--no-owner")
    if jobs <= 1:
        return _pipe_into(argv, chunks, env, target)
    spool_dir = Path(spool_dir or tempfile.gettempdir())
    free = shutil.disk_usage(spool_dir).free
    if size_hint is not None and free < size_hint * 1.05 + (64 << 20):
        raise DrtoolError(f"spool directory {spool_dir}: {free >> 20} MiB free, the dump needs {size_hint >> 20} MiB "
                          f"(pg_restore -j needs a file); free space or use jobs = 1")
    with tempfile.NamedTemporaryFile(dir=spool_dir, prefix="drtool-pg-", suffix=".dump") as spool:
        written = 0
        try:
            for chunk in chunks:
                spool.write(chunk)
                written += len(chunk)
            spool.flush()
        except OSError as exc:
            raise DrtoolError(f"spool file {spool.name}: {exc.strerror}") from None
        proc = subprocess.Popen([*argv, f"--jobs={jobs}", spool.name], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        tail = _StderrTail(proc.stderr)
        if proc.wait() != 0:
            raise SourceError(_restore_error(target, proc.returncode, tail.text()))
        return written


def _pipe_into(argv: list[str], chunks: Iterable[bytes], env: dict[str, str], target: str) -> int:
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _widen_pipe(proc.stdin.fileno())
    tail = _StderrTail(proc.stderr)
    written = 0
    try:
        for chunk in chunks:
            try:
                proc.stdin.write(chunk)
            except BrokenPipeError:
                break  # pg_restore stopped reading: its exit status says why
            written += len(chunk)
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
    except BaseException:
        _stop(proc)
        raise
    if proc.wait() != 0:
        raise SourceError(_restore_error(target, proc.returncode, tail.text()))
    return written


def _restore_error(target: str, returncode: int, stderr: str) -> str:
    if stderr:
        log.error("pg_restore stderr:\n%s", stderr)
    last = [line for line in stderr.splitlines() if line.strip()]
    detail = f": {last[-1]}" if last else ""
    return f"pg_restore into database {target!r} {_exit_reason(returncode)}{detail}"


# ---------------------------------------------------------------------------------------
# Sample data: Teranode's schema with a chain of blocks
# ---------------------------------------------------------------------------------------

REGTEST_BITS = 0x207FFFFF
BLOCK_COLUMNS = (
    "id", "parent_id", "version", "hash", "previous_hash", "merkle_root", "block_time", "n_bits", "nonce",
    "height", "chain_work", "tx_count", "size_in_bytes", "subtree_count", "subtrees", "coinbase_tx",
    "invalid", "mined_set", "subtrees_set", "peer_id", "median_time_past", "on_main_chain",
)
BLOCK_TYPES = (
    "int8", "int8", "int4", "bytea", "bytea", "bytea", "int8", "bytea", "int8",
    "int8", "bytea", "int8", "int8", "int8", "bytea", "bytea",
    "bool", "bool", "bool", "text", "int8", "bool",
)


def schema_sql() -> str:
    """Teranode's PostgreSQL blockchain schema (teranode_schema.sql)."""
    return resources.files("drtool.sources").joinpath("teranode_schema.sql").read_text()


def create_schema(dsn: str) -> None:
    with contextlib.closing(connect(dsn, autocommit=True, what="create the Teranode schema")) as conn:
        conn.execute(schema_sql())


def sha256d(data: bytes) -> bytes:
    return hashlib.sha256(hashlib.sha256(data).digest()).digest()


def block_work(bits: int) -> int:
    """Work of one block: 2**256 // (target + 1), target decoded from compact nBits."""
    exponent, mantissa = bits >> 24, bits & 0x007FFFFF
    target = mantissa >> (8 * (3 - exponent)) if exponent <= 3 else mantissa << (8 * (exponent - 3))
    return (1 << 256) // (target + 1) if target > 0 else 0


def synthetic_chain(n: int, seed: int = 0, *, bits: int = REGTEST_BITS,
                    start_time: int = 1_700_000_000) -> list[tuple[int, str, str, bytes]]:
    """A linked chain of n block headers (regtest difficulty, not mined):
    [(height, hash_hex, prev_hash_hex, header80)], hashes in display form."""
    rnd = random.Random(seed)
    out = []
    prev = bytes(32)
    for height in range(n):
        merkle = rnd.randbytes(32)
        header = struct.pack("<i32s32sIII", 1, prev, merkle, start_time + 600 * height, bits, rnd.getrandbits(32))
        h = sha256d(header)
        out.append((height, h[::-1].hex(), prev[::-1].hex(), header))
        prev = h
    return out


def _block_rows(chain: Iterable[tuple[int, str, str, bytes]], payload=None) -> Iterator[tuple]:
    """Rows for `blocks` in BLOCK_COLUMNS order; ids in chain order, genesis id 0 parent 0."""
    ids: dict[bytes, tuple[int, int, int]] = {}  # hash -> (id, height, chain work)
    for next_id, (height, hash_hex, prev_hex, header) in enumerate(chain):
        if len(header) != 80:
            raise DrtoolError(f"block {hash_hex}: header is {len(header)} bytes, expected 80")
        h = sha256d(header)
        if h[::-1].hex() != hash_hex:
            raise DrtoolError(f"block {hash_hex}: header hashes to {h[::-1].hex()}")
        version, prev, merkle, ts, bits, nonce = struct.unpack("<i32s32sIII", header)
        if prev[::-1].hex() != prev_hex:
            raise DrtoolError(f"block {hash_hex}: header's previous hash is not {prev_hex}")
        if height == 0:
            parent_id, work = next_id, 0
        elif prev in ids:
            parent_id, p_height, work = ids[prev]
            if p_height != height - 1:
                raise DrtoolError(f"block {hash_hex} at height {height}: parent is at height {p_height}")
        else:
            raise DrtoolError(f"block {hash_hex} at height {height}: parent {prev_hex} not in the chain")
        work += block_work(bits)
        ids[h] = (next_id, height, work)
        subtrees = payload(height) if payload else b""
        coinbase = b"\x01\x00\x00\x00" + struct.pack("<I", height)
        yield (next_id, parent_id, version, h, prev, merkle, ts, header[72:76], nonce, height,
               work.to_bytes(32, "big"), 1, 80 + len(coinbase), len(subtrees) // 32, subtrees, coinbase,
               False, True, True, "", 0, False)


def _mark_main_chain(conn: psycopg.Connection) -> None:
    conn.execute(
        """
        WITH RECURSIVE tip AS (""" + BEST_BLOCK_SQL + """),
        chain(id, parent_id) AS (
            SELECT id, parent_id FROM blocks WHERE id = (SELECT id FROM tip)
            UNION ALL
            SELECT b.id, b.parent_id FROM blocks b JOIN chain c ON b.id = c.parent_id WHERE b.id <> c.id
        )
        UPDATE blocks SET on_main_chain = true WHERE id IN (SELECT id FROM chain)
        """
    )


def _state_rows(tip_height: int, tip_header: bytes) -> list[tuple[str, bytes]]:
    # Encodings as Teranode writes them: BlockPersisterHeight = uint32 LE;
    # BlockAssembler = uint32 LE height + the 80-byte header; fsm_state = the state's name.
    return [
        ("fsm_state", b"IDLE"),
        ("BlockAssembler", struct.pack("<I", tip_height) + tip_header),
        ("BlockPersisterHeight", struct.pack("<I", tip_height)),
    ]


def _copy_blocks(conn: psycopg.Connection, rows: Iterable[tuple]) -> tuple[int, bytes] | None:
    tip = None
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in BLOCK_COLUMNS)
    with conn.cursor() as cur, cur.copy(sql.SQL("COPY blocks ({}) FROM STDIN (FORMAT BINARY)").format(cols)) as copy:
        copy.set_types(list(BLOCK_TYPES))
        for row in rows:
            copy.write_row(row)
            tip = row
    return tip


def load_sample_chain(dsn: str, chain: Iterable[tuple[int, str, str, bytes]], *, with_state: bool = True,
                      subtrees: dict[str, list[str]] | None = None, persisted: Iterable[str] = ()) -> None:
    """Create Teranode's schema in the DSN's database and load a chain of block headers
    [(height, hash_hex, prev_hash_hex, header80)] (e.g. `synthetic_chain`) plus `state` rows.
    `subtrees` (block hash -> subtree roots, display hex) fills the `subtrees` column; blocks
    in `persisted` (display hex) get a `persisted_at`, as the block persister sets it."""
    chain = list(chain)
    by_height = {}
    for height, hash_hex, _prev, _header in chain:
        roots = (subtrees or {}).get(hash_hex, [])
        by_height[height] = b"".join(bytes.fromhex(r)[::-1] for r in roots)
    create_schema(dsn)
    with contextlib.closing(connect(dsn, what="load the sample chain")) as conn:
        _copy_blocks(conn, _block_rows(chain, payload=by_height.get if subtrees else None))
        _finish_load(conn, chain, with_state)
        marked = [bytes.fromhex(h)[::-1] for h in persisted]
        if marked:
            conn.execute("UPDATE blocks SET persisted_at = now() WHERE hash = ANY(%s)", (marked,))
        conn.commit()


def _finish_load(conn: psycopg.Connection, chain: list, with_state: bool) -> None:
    _mark_main_chain(conn)
    conn.execute("SELECT setval(pg_get_serial_sequence('blocks', 'id'), (SELECT max(id) FROM blocks))")
    if with_state and chain:
        tip = best_block(conn)
        header = next(c[3] for c in chain if c[1] == tip.hash)
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO state (key, data) VALUES (%s, %s) ON CONFLICT (key) DO UPDATE SET data = EXCLUDED.data",
                            _state_rows(tip.height, header))


def fill_bulk(dsn: str, n_blocks: int, extra_bytes_per_row: int = 0, *, seed: int = 1) -> None:
    """A big Teranode database, fast (COPY): n_blocks linked blocks, each carrying
    `extra_bytes_per_row` random (incompressible) bytes of subtree hashes, one
    scheduled_blob_deletions row per block, a few bans and the state rows."""
    chain = synthetic_chain(n_blocks, seed)
    rnd = random.Random(seed)
    size = (extra_bytes_per_row // 32) * 32
    create_schema(dsn)
    with contextlib.closing(connect(dsn, what="fill the database")) as conn:
        _copy_blocks(conn, _block_rows(chain, payload=lambda _h: rnd.randbytes(size)))
        with conn.cursor() as cur, cur.copy(
            "COPY scheduled_blob_deletions (blob_key, file_type, store_type, delete_at_height) FROM STDIN (FORMAT BINARY)"
        ) as copy:
            copy.set_types(["bytea", "varchar", "int2", "int8"])
            for height, hash_hex, _prev, _hdr in chain:
                copy.write_row((bytes.fromhex(hash_hex)[::-1], "subtree", 1, height + 288))
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO bans (key, expiration_time, subnet) VALUES (%s, now() + interval '1 day', %s)",
                            [(f"10.0.{i}.1", f"10.0.{i}.1/32") for i in range(10)])
        _finish_load(conn, chain, True)
        conn.commit()


# ---------------------------------------------------------------------------------------
# The snapshot's side: a dump streamed into the repository, a stored dump restored
# ---------------------------------------------------------------------------------------


def backup(session, dsn: str, *, pg_dump: str | None = None, level: int | None = None) -> dict[str, Any]:
    """Stream `pg_dump -Fc` into the repository; returns the manifest's `postgres` source."""
    from drtool.progress import Progress

    with dump_stream(dsn, pg_dump=pg_dump, hash_dump=False) as dump:  # the repository hashes it
        with Progress("backup postgres") as progress:
            ref = session.store_stream("postgres.dump", dump, progress, level)
    if ref["size"] != dump.metadata.dump_size:
        raise IntegrityError(f"postgres dump of {dump.metadata.database!r}: the repository stored "
                             f"{ref['size']} bytes, pg_dump wrote {dump.metadata.dump_size}")
    dump.metadata.dump_sha256 = ref["sha256"]
    return {**ref, **dump.metadata.to_dict(), "dsn": display_dsn(dsn)}
