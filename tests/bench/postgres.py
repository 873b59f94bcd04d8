"""Benchmark: drtool's PostgreSQL dump/restore streams against the bare pg_dump/pg_restore floor.

    cd /work/main && PYTHONPATH=. .venv/bin/python -m tests.bench.postgres
    DRTOOL_BENCH_PG_MB=200 ...   # smaller database (default 1024 MB of block data)

Starts a throwaway cluster, fills it with fill_bulk, then times in one run:
  dump floor     pg_dump -Fc -Z0 > /dev/null
  dump drtool    dump_stream drained (the source's own SHA-256 only), then consumed into
                 SHA-256 + zstd level 3 and level 1 (output discarded): what a repository adds.
                 pg_dump writes bytea as hex text, so the archive is ~2x the data; zstd-1
                 gets the same ratio on it as zstd-3 at several times the speed.
  restore floor  pg_restore -d DB FILE (from a local file)
  restore drtool restore_stream from the same bytes as an iterator (jobs=1, scratch DB,
                 checks, rename)
  backup drtool  `drtool backup --only postgres` (a child process) to a local repository and to
                 S3 on moto_server: dump, chunk, hash, compress (zstd level DRTOOL_BENCH_PG_LEVEL,
                 default 1: [postgres] compression_level's default), upload while pg_dump runs
  restore drtool `drtool restore latest --only postgres --pg-dsn NEW` from the local repository
                 (read once first: in the page cache, as the floor's dump file is)
and prints seconds, MB/s, ratios and peak RSS (of the drtool process alone, from wait4).
"""

from __future__ import annotations

import hashlib
import os
import resource
import subprocess
import sys
import tempfile
import time

import zstandard

from drtool.sources import postgres as P
from tests.support.pg import pg_available, start_cluster

SIZE_MB = int(os.environ.get("DRTOOL_BENCH_PG_MB", "1024"))
ROW_BYTES = 100_000


def rss_mib(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024


def timed(fn):
    t = time.monotonic()
    out = fn()
    return time.monotonic() - t, out


def main() -> int:
    reason = pg_available()
    if reason:
        print(f"skipped: {reason}")
        return 0
    n_blocks = max(10, SIZE_MB * (1 << 20) // ROW_BYTES)
    with start_cluster() as server, tempfile.TemporaryDirectory(prefix="drtool-bench-") as tmp:
        dsn = server.create_database("teranode")
        # Filled in a child process so this process's peak RSS measures the streams only.
        fill_s, _ = timed(lambda: subprocess.run(
            [sys.executable, "-c", f"from drtool.sources.postgres import fill_bulk; fill_bulk({dsn!r}, {n_blocks}, {ROW_BYTES})"],
            check=True))
        db_size = server.execute("SELECT pg_database_size('teranode')")[0][0]
        print(f"database: {n_blocks} blocks, {db_size / 2**20:.0f} MiB on disk, filled in {fill_s:.1f} s")
        conninfo, env = P.child_conninfo(dsn)
        pg_dump = P.find_pg_tool("pg_dump", server_major=15)
        pg_restore = P.find_pg_tool("pg_restore", server_major=15)
        rss_start = rss_mib()

        with open(os.devnull, "wb") as devnull:
            floor_s, _ = timed(lambda: subprocess.run([pg_dump, "-Fc", "-Z0", f"--dbname={conninfo}"], stdout=devnull, env=env, check=True))

        def drtool_dump(level):
            sha = hashlib.sha256()
            comp = zstandard.ZstdCompressor(level=level).compressobj()
            stored = 0
            with P.dump_stream(dsn) as stream:
                for chunk in stream:
                    sha.update(chunk)
                    stored += len(comp.compress(chunk))
            stored += len(comp.flush())
            return stream.metadata, stored

        def drain_only():
            with P.dump_stream(dsn) as stream:
                for _chunk in stream:
                    pass
            return stream.metadata

        drain_s, _ = timed(drain_only)
        dump_s, (meta, stored) = timed(lambda: drtool_dump(3))
        dump1_s, (_meta, stored1) = timed(lambda: drtool_dump(1))
        rss_dump = rss_mib()
        size = meta.dump_size
        print(f"dump: {size / 2**20:.0f} MiB archive, zstd-3 -> {stored / 2**20:.0f} MiB")
        print(f"  floor  pg_dump -Fc -Z0 > /dev/null      {floor_s:7.2f} s  {size / 2**20 / floor_s:7.1f} MiB/s")
        print(f"  drtool dump_stream (its sha256 only)    {drain_s:7.2f} s  {size / 2**20 / drain_s:7.1f} MiB/s"
              f"  ratio {drain_s / floor_s:.2f}x")
        print(f"  drtool dump_stream + sha256 + zstd-3    {dump_s:7.2f} s  {size / 2**20 / dump_s:7.1f} MiB/s"
              f"  ratio {dump_s / floor_s:.2f}x")
        print(f"  drtool dump_stream + sha256 + zstd-1    {dump1_s:7.2f} s  {size / 2**20 / dump1_s:7.1f} MiB/s"
              f"  ratio {dump1_s / floor_s:.2f}x  (zstd-1 -> {stored1 / 2**20:.0f} MiB)")

        # Restore: the floor reads a local file; drtool reads the same bytes as a stream.
        dump_file = os.path.join(tmp, "teranode.dump")
        subprocess.run([pg_dump, "-Fc", "-Z0", f"--file={dump_file}", f"--dbname={conninfo}"], env=env, check=True)
        server.execute("CREATE DATABASE floor_restore")
        r_conninfo, r_env = P.child_conninfo(P.dsn_with(dsn, dbname="floor_restore"))
        rfloor_s, _ = timed(lambda: subprocess.run([pg_restore, "--exit-on-error", f"--dbname={r_conninfo}", dump_file],
                                                   env=r_env, check=True))

        def file_chunks():
            with open(dump_file, "rb") as f:
                while chunk := f.read(P.CHUNK_SIZE):
                    yield chunk

        def checked_restore():
            return P.restore_stream(file_chunks(), P.dsn_with(dsn, dbname="drtool_restore"), expected=meta)

        restore_s, result = timed(checked_restore)
        check_s, findings = timed(lambda: P.check_database(P.dsn_with(dsn, dbname="drtool_restore"), meta))
        assert result.findings == [] and findings == [], findings
        rss_end = rss_mib()
        print("restore:")
        print(f"  floor  pg_restore -d DB FILE            {rfloor_s:7.2f} s  {size / 2**20 / rfloor_s:7.1f} MiB/s")
        print(f"  drtool restore_stream (+checks, swap)   {restore_s:7.2f} s  {size / 2**20 / restore_s:7.1f} MiB/s"
              f"  ratio {restore_s / rfloor_s:.2f}x   (checks alone {check_s:.2f} s)")
        print(f"peak RSS drtool process: {rss_start:.0f} MiB before, {rss_dump:.0f} after dump, {rss_end:.0f} after restore; "
              f"largest child (pg_dump/pg_restore): {rss_mib(resource.RUSAGE_CHILDREN):.0f} MiB")
        print("bytes staged on local disk by dump_stream: 0 (the pipe is read in 1 MiB chunks)")
        repository_rows(server, dsn, tmp, floor_s, rfloor_s, size)
    return 0


def run_child(argv: list[str], env: dict) -> tuple[float, int]:
    """(seconds, peak RSS in MiB) of one child process."""
    started = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _pid, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{argv[3:]} failed: {proc.stderr.read().decode()[-2000:]}")
    return time.monotonic() - started, usage.ru_maxrss // 1024


def repository_rows(server, dsn: str, tmp: str, floor_s: float, rfloor_s: float, size: int) -> None:
    from drtool import config as config_mod
    from tests.support.s3 import run_moto_server

    level = int(os.environ.get("DRTOOL_BENCH_PG_LEVEL", "1"))
    env = dict(os.environ, PGPASSWORD=server.password, PYTHONPATH=os.getcwd(),
               AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret", AWS_DEFAULT_REGION="us-east-1")
    state = os.path.join(tmp, "state")

    def config(name: str, url: str, endpoint: str = "") -> str:
        path = os.path.join(tmp, f"{name}.toml")
        with open(path, "w") as f:
            f.write(config_mod.render_toml({
                "node": {"name": "bench", "data_dir": tmp, "quiesce": "offline", "state_dir": state},
                "repository": {"url": url, **({"endpoint_url": endpoint} if endpoint else {})},
                "postgres": {"dsn": server.dsn_kv("teranode"), "compression_level": level}}))
        return path

    drtool = [sys.executable, "-m", "drtool.cli", "-q", "--config"]
    local = config("local", f"file://{tmp}/repo")
    local_s, local_rss = run_child(drtool + [local, "backup", "--only", "postgres"], env)
    with run_moto_server() as endpoint:
        import boto3

        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="bench", aws_secret_access_key="bench-secret",
                     region_name="us-east-1").create_bucket(Bucket="bench")
        s3 = config("s3", "s3://bench/pg", endpoint)
        s3_s, s3_rss = run_child(drtool + [s3, "backup", "--only", "postgres"], env)
    staged = sum(len(files) for _root, _dirs, files in os.walk(state)) if os.path.isdir(state) else 0
    print(f"backup (zstd level {level}):")
    print(f"  drtool backup -> local repository       {local_s:7.2f} s  {size / 2**20 / local_s:7.1f} MiB/s"
          f"  ratio {local_s / floor_s:.2f}x  peak RSS {local_rss} MiB")
    print(f"  drtool backup -> S3 (moto_server)       {s3_s:7.2f} s  {size / 2**20 / s3_s:7.1f} MiB/s"
          f"  ratio {s3_s / floor_s:.2f}x  peak RSS {s3_rss} MiB")
    print(f"  files left in drtool's state dir (spool): {staged}")
    # From the page cache, as the floor reads its dump file: drtool writes its packs past it.
    subprocess.run(f"tar -cf - -C {tmp} repo > /dev/null", shell=True, check=True)
    restore_s, restore_rss = run_child(drtool + [local, "restore", "latest", "--only", "postgres", "--pg-dsn",
                                                 server.dsn_kv("drtool_repo_restore")], env)
    print(f"  drtool restore <- local repository      {restore_s:7.2f} s  ratio {restore_s / rfloor_s:.2f}x vs pg_restore "
          f"from a file  peak RSS {restore_rss} MiB")


if __name__ == "__main__":
    sys.exit(main())
