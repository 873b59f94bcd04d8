"""A throwaway PostgreSQL cluster (Debian's binaries, initdb in a temp dir, a free port):
the database of `drtool demo`'s sample node, and the server the tests run against.
As root, initdb/postgres run as the unprivileged `postgres` user (PostgreSQL refuses root).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import quote


def _newest_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: float(p.split("/")[-2]))
    return Path(found[-1]) if found else Path("/usr/lib/postgresql/15/bin")


PG_BIN = Path(os.environ.get("DRTOOL_TEST_PG_BIN") or _newest_bin())
RUN_AS = "postgres"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_user() -> dict:
    """subprocess kwargs to drop root privileges (PostgreSQL will not run as root)."""
    if os.geteuid() != 0:
        return {}
    pw = pwd.getpwnam(RUN_AS)
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": [], "env": {**os.environ, "HOME": pw.pw_dir}}


@dataclasses.dataclass
class PgServer:
    host: str
    port: int
    user: str
    password: str
    base: Path

    @property
    def data_dir(self) -> Path:
        return self.base / "data"

    def dsn(self, dbname: str = "postgres") -> str:
        """URL form, password included (what an operator might write)."""
        return f"postgresql://{quote(self.user)}:{quote(self.password, safe='')}@{self.host}:{self.port}/{quote(dbname)}"

    def dsn_kv(self, dbname: str = "postgres", **extra: str) -> str:
        """key=value form without the password (it then comes from PGPASSWORD)."""
        parts = [f"host={self.host}", f"port={self.port}", f"user={self.user}", f"dbname={dbname}"]
        parts += [f"{k}={v}" for k, v in extra.items()]
        return " ".join(parts)

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([str(PG_BIN / "pg_ctl"), "-D", str(self.data_dir), *args],
                              capture_output=True, text=True, check=check, **_as_user())

    def start(self) -> None:
        opts = (f"-p {self.port} -k {self.base} -c listen_addresses={self.host} -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=40 -c shared_buffers=64MB")
        res = self._pg_ctl("-l", str(self.base / "log"), "-o", opts, "-w", "-t", "60", "start", check=False)
        if res.returncode != 0:
            log = (self.base / "log").read_text() if (self.base / "log").exists() else ""
            raise RuntimeError(f"postgres did not start: {res.stderr}\n{log[-2000:]}")

    def stop(self, mode: str = "fast") -> None:
        self._pg_ctl("-m", mode, "-w", "stop", check=False)

    def running(self) -> bool:
        return self._pg_ctl("status", check=False).returncode == 0

    def execute(self, query: str, dbname: str = "postgres", params=None) -> list[tuple]:
        import psycopg

        with psycopg.connect(self.dsn(dbname), autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def create_database(self, name: str) -> str:
        self.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)


def pg_available() -> str | None:
    """None when the binaries are there, else why not."""
    missing = [b for b in ("initdb", "pg_ctl", "postgres") if not (PG_BIN / b).exists()]
    if missing:
        return f"PostgreSQL binaries missing in {PG_BIN}: {', '.join(missing)} (apt-get install postgresql-15)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(RUN_AS)
        except KeyError:
            return f"running as root and there is no {RUN_AS!r} user to run PostgreSQL as"
    return None


@contextlib.contextmanager
def start_cluster(user: str = "drtool_admin"):
    """initdb + start a cluster in a temp dir; stopped and removed on exit (also on failure)."""
    base = Path(tempfile.mkdtemp(prefix="drtool-pg-"))
    server = PgServer("127.0.0.1", _free_port(), user, "pw-" + secrets.token_urlsafe(12), base)
    try:
        pwfile = base / "pwfile"
        pwfile.write_text(server.password + "\n")
        if os.geteuid() == 0:
            pw = pwd.getpwnam(RUN_AS)
            os.chmod(base, 0o700)
            for p in (base, pwfile):
                os.chown(p, pw.pw_uid, pw.pw_gid)
        subprocess.run(
            [str(PG_BIN / "initdb"), "-D", str(server.data_dir), "-U", user, f"--pwfile={pwfile}", "-E", "UTF8",
             "--locale=C", "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync", "--no-instructions"],
            capture_output=True, text=True, check=True, **_as_user(),
        )
        pwfile.unlink()
        server.start()
        yield server
    finally:
        with contextlib.suppress(Exception):
            if (server.data_dir / "postmaster.pid").exists():
                server.stop("immediate")
        shutil.rmtree(base, ignore_errors=True)
