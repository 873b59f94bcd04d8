"""The Aerospike (UTXO store) source: Aerospike's own backup tools, or the Python client.

Two engines with the same job -- a namespace as a stream of `.asb` text and back:
- ToolEngine drives `absctl backup|restore` (Aerospike 8's Backup Control) or the legacy
  `asbackup`/`asrestore`, streaming through `--output-file -` / `--input-file -`.
- NativeEngine scans with the `aerospike` client partition by partition and writes `.asb`
  itself (drtool.sources.asb), in digest order so unchanged data gives unchanged bytes.

Incrementals (records modified at or after a time) cannot see deletions, and Teranode
deletes UTXO records all the time. So each incremental also records the digest set live
at that moment (write_digest_set) and a restore of a chain ends with reconcile(), which
deletes what was not live then. Digest sets are ordered by (partition, digest): partitions
are disjoint digest ranges, so a set is built, stored and compared one partition at a time.
"""

from __future__ import annotations

import collections
import io
import logging
import os
import selectors
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any, BinaryIO, Callable, Iterable, Iterator

import zstandard

from drtool import handoff
from drtool.errors import ConfigError, SourceError
from drtool.secrets import redact, register
from drtool.sources.asb import (
    CITRUSLEAF_EPOCH, AsbDecoder, AsbHeader, AsbIndex, AsbReader, AsbRecord, AsbUDF, AsbWriter,
    from_python, partition_id, to_python,
)

log = logging.getLogger(__name__)

N_PARTITIONS = 4096
PASSWORD_ENV = "DRTOOL_AEROSPIKE_PASSWORD"  # handed to the tool as `--password env:...`
READ_SIZE = 1 << 20
STDERR_LINES = 20


def parse_hosts(hosts: Iterable[str] | str) -> list[tuple[str, int]]:
    """["h1:3000", "h2"] or "h1:3000,h2" -> [("h1", 3000), ("h2", 3000)]."""
    if isinstance(hosts, str):
        hosts = hosts.split(",")
    out = []
    for h in hosts:
        h = h.strip()
        if not h:
            continue
        host, _, port = h.rpartition(":") if ":" in h else (h, "", "3000")
        try:
            out.append((host or h, int(port)))
        except ValueError:
            raise ConfigError(f"aerospike.hosts: bad host:port {h!r}") from None
    if not out:
        raise ConfigError("aerospike.hosts: no host given")
    return out


# =============================================================================================
# the tool engine


def detect_tool(command: list[str] | None = None) -> list[str]:
    """The configured command, or absctl / asbackup found on PATH."""
    if command:
        return list(command)
    for name in ("absctl", "asbackup"):
        if shutil.which(name):
            return [name]
    raise ConfigError("aerospike.command: neither absctl nor asbackup is on PATH; "
                      "install one or set the command")


def tool_kind(command: list[str]) -> str:
    """'absctl' or 'asbackup', from the last element of the command that names one."""
    for part in reversed(command):
        base = os.path.basename(part)
        if base.startswith("absctl"):
            return "absctl"
        if base.startswith(("asbackup", "asrestore")):
            return "asbackup"
    return "asbackup"


class ChildStream:
    """A running tool whose stdout is read as chunks of bytes.

    Iterating yields stdout chunks; when stdout ends, the exit status is checked and a
    failure raises SourceError carrying the (redacted) tail of stderr. No output for
    `idle_timeout` seconds kills the tool. close() (or leaving the `with`) kills a tool
    still running.
    """

    def __init__(self, args: list[str], env: dict[str, str] | None, idle_timeout: float,
                 label: str, stdin=subprocess.DEVNULL):
        self.args = args
        self.label = label
        self.idle_timeout = idle_timeout
        self.returncode: int | None = None
        self.bytes = 0
        self._stderr: collections.deque[str] = collections.deque(maxlen=STDERR_LINES)
        self.last_activity = time.monotonic()
        log.info("running %s", redact(" ".join(args)))
        try:
            self.proc = subprocess.Popen(args, stdin=stdin, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, env=env, start_new_session=True)
        except OSError as exc:
            raise SourceError(f"{label}: cannot run {args[0]!r}: {exc.strerror}") from None
        self._stderr_thread = threading.Thread(target=self._drain, args=(self.proc.stderr, True),
                                               daemon=True)
        self._stderr_thread.start()

    def _drain(self, pipe, keep: bool) -> None:
        for raw in iter(pipe.readline, b""):
            self.last_activity = time.monotonic()
            line = redact(raw.decode("utf-8", "replace").rstrip())
            if line:
                if keep:
                    self._stderr.append(line)
                log.debug("%s: %s", self.label, line)
        pipe.close()

    def stderr_tail(self) -> str:
        return " | ".join(self._stderr)

    def __iter__(self) -> Iterator[bytes]:
        fd = self.proc.stdout.fileno()
        sel = selectors.DefaultSelector()
        sel.register(fd, selectors.EVENT_READ)
        try:
            while True:
                if not sel.select(self.idle_timeout):
                    if time.monotonic() - self.last_activity < self.idle_timeout:
                        continue  # quiet stdout, but the tool is still talking on stderr
                    self.kill()
                    raise SourceError(f"{self.label}: no output for {self.idle_timeout:g} s, "
                                      f"stopped; stderr: {self.stderr_tail() or '(none)'}")
                chunk = os.read(fd, READ_SIZE)
                if not chunk:
                    break
                self.last_activity = time.monotonic()
                self.bytes += len(chunk)
                yield chunk
        finally:
            sel.close()
        self._finish()

    def _finish(self) -> None:
        deadline = time.monotonic() + self.idle_timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                raise SourceError(f"{self.label}: did not exit {self.idle_timeout:g} s after "
                                  f"closing its output; stopped")
            time.sleep(0.05)
        self._stderr_thread.join(5)
        self.returncode = self.proc.returncode
        if self.returncode != 0:
            raise SourceError(f"{self.label} failed (exit status {self.returncode}): "
                              f"{self.stderr_tail() or 'no message on stderr'}")

    def kill(self) -> None:
        """Stop the tool (its whole process group: we started it in its own session)."""
        if self.proc.poll() is not None:
            return
        for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(grace)
                return
            except subprocess.TimeoutExpired:
                continue

    def close(self) -> None:
        self.kill()
        for pipe in (self.proc.stdout, self.proc.stdin):
            if pipe:
                try:
                    pipe.close()
                except OSError:
                    pass

    def __enter__(self) -> "ChildStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ToolEngine:
    """absctl or asbackup/asrestore, streamed through stdout/stdin.

    Secrets never go on the command line: the password reaches the tool as
    `--password env:DRTOOL_AEROSPIKE_PASSWORD` (or `file:PATH` with password_file). With a
    `docker ... exec` command prefix, the environment does not cross into the container: use
    password_file with a path inside the container there.
    """

    def __init__(self, command: list[str] | None, hosts: Iterable[str] | str, namespace: str,
                 set: str | None = None, *, user: str | None = None, password: str | None = None,
                 password_file: str | None = None, tls: dict[str, Any] | None = None,
                 parallel: int | None = None, partition_list: str | None = None,
                 node_list: str | None = None, bin_list: list[str] | None = None,
                 records_per_second: int | None = None, idle_timeout: float = 600.0,
                 extra_backup_args: Iterable[str] = (), extra_restore_args: Iterable[str] = (),
                 env: dict[str, str] | None = None):
        self.command = detect_tool(command)
        self.kind = tool_kind(self.command)
        self.hosts = parse_hosts(hosts)
        self.namespace = namespace
        self.set = set
        self.user = user
        self.password = password
        register(password)
        self.password_file = password_file
        self.tls = dict(tls or {})
        self.parallel = parallel
        self.partition_list = partition_list
        self.node_list = node_list
        if partition_list and node_list:
            raise ConfigError("aerospike: partition_list and node_list exclude each other")
        self.bin_list = list(bin_list or [])
        self.records_per_second = records_per_second
        self.idle_timeout = idle_timeout
        self.extra_backup_args = list(extra_backup_args)
        self.extra_restore_args = list(extra_restore_args)
        self.base_env = dict(os.environ if env is None else env)

    # -- argument lists ------------------------------------------------------------------------
    def backup_command(self) -> list[str]:
        return self.command + ["backup"] if self.kind == "absctl" else list(self.command)

    def restore_command(self) -> list[str]:
        if self.kind == "absctl":
            return self.command + ["restore"]
        cmd = list(self.command)
        for i in range(len(cmd) - 1, -1, -1):
            base = os.path.basename(cmd[i])
            if base.startswith("asbackup"):
                cmd[i] = cmd[i][: len(cmd[i]) - len(base)] + base.replace("asbackup", "asrestore", 1)
                break
        return cmd

    def _connection_args(self) -> list[str]:
        args = ["--host", ",".join(f"{h}:{p}" for h, p in self.hosts)]
        if self.user:
            args += ["--user", self.user]
            if self.password_file:
                args += ["--password", f"file:{self.password_file}"]
            elif self.password:
                args += ["--password", f"env:{PASSWORD_ENV}"]
        tls = self.tls
        if tls.get("enable") or any(tls.get(k) for k in ("cafile", "capath", "certfile", "keyfile")):
            args.append("--tls-enable")
            for key, flag in (("name", "--tls-name"), ("cafile", "--tls-cafile"),
                              ("capath", "--tls-capath"), ("certfile", "--tls-certfile"),
                              ("keyfile", "--tls-keyfile"), ("protocols", "--tls-protocols")):
                if tls.get(key):
                    args += [flag, str(tls[key])]
            if tls.get("keyfile_password_file"):
                args += ["--tls-keyfile-password", f"file:{tls['keyfile_password_file']}"]
        return args

    def backup_args(self, modified_after: datetime | None = None) -> list[str]:
        args = self.backup_command() + self._connection_args()
        args += ["--namespace", self.namespace]
        if self.set:
            args += ["--set", self.set]
        args += ["--output-file", "-"]
        if self.parallel:
            args += ["--parallel", str(self.parallel)]
        if self.partition_list:
            args += ["--partition-list", self.partition_list]
        if self.node_list:
            args += ["--node-list", self.node_list]
        if modified_after is not None:
            args += ["--modified-after", format_modified_after(modified_after)]
        if self.bin_list:
            args += ["--bin-list", ",".join(self.bin_list)]
        if self.records_per_second:
            args += ["--records-per-second", str(self.records_per_second)]
        return args + self.extra_backup_args

    def restore_args(self, *, replace: bool = False, unique: bool = False,
                     no_generation: bool = True) -> list[str]:
        if replace and unique:
            raise ConfigError("aerospike restore: replace and unique exclude each other")
        args = self.restore_command() + self._connection_args()
        args += ["--namespace", self.namespace, "--input-file", "-"]
        if self.parallel:
            args += ["--parallel", str(self.parallel)]
        if replace:
            args.append("--replace")
        if unique:
            args.append("--unique")
        if no_generation:
            args.append("--no-generation")
        if self.bin_list:
            args += ["--bin-list", ",".join(self.bin_list)]
        if self.records_per_second:
            args += ["--records-per-second", str(self.records_per_second)]
        return args + self.extra_restore_args

    def _env(self) -> dict[str, str]:
        env = dict(self.base_env)
        env["TZ"] = "UTC"  # --modified-after is read in local time: make local time UTC
        if self.password and not self.password_file:
            env[PASSWORD_ENV] = self.password
        return env

    # -- running -------------------------------------------------------------------------------
    @contextmanager
    def backup_stream(self, modified_after: datetime | None = None) -> Iterator[ChildStream]:
        """`with engine.backup_stream() as s: for chunk in s: ...` -- .asb text chunks."""
        stream = ChildStream(self.backup_args(modified_after), self._env(), self.idle_timeout,
                             f"{self.kind} backup")
        try:
            yield stream
        finally:
            stream.close()

    def restore_from_stream(self, chunks: Iterable[bytes], **flags) -> int:
        """Feed .asb chunks to the restore tool's stdin; returns the bytes fed."""
        stream = ChildStream(self.restore_args(**flags), self._env(), self.idle_timeout,
                             f"{self.kind} restore", stdin=subprocess.PIPE)
        fed = 0
        drain_out = threading.Thread(target=stream._drain, args=(stream.proc.stdout, True),
                                     daemon=True)
        drain_out.start()
        fd = stream.proc.stdin.fileno()
        os.set_blocking(fd, False)
        sel = selectors.DefaultSelector()
        sel.register(fd, selectors.EVENT_WRITE)
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    if not sel.select(self.idle_timeout):
                        if time.monotonic() - stream.last_activity < self.idle_timeout:
                            continue
                        stream.kill()
                        raise SourceError(f"{stream.label}: not reading its input for "
                                          f"{self.idle_timeout:g} s, stopped; stderr: "
                                          f"{stream.stderr_tail() or '(none)'}")
                    try:
                        n = os.write(fd, view)
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:
                        stream.proc.wait(self.idle_timeout)
                        stream._stderr_thread.join(5)
                        raise SourceError(f"{stream.label} stopped reading its input (exit status "
                                          f"{stream.proc.returncode}): "
                                          f"{stream.stderr_tail() or 'no message on stderr'}") from None
                    view = view[n:]
                    fed += n
                    stream.last_activity = time.monotonic()
            sel.close()
            stream.proc.stdin.close()
            stream.proc.stdin = None
            deadline_idle = self.idle_timeout
            while stream.proc.poll() is None:
                if time.monotonic() - stream.last_activity > deadline_idle:
                    stream.kill()
                    raise SourceError(f"{stream.label}: no progress for {deadline_idle:g} s after "
                                      f"the end of input, stopped")
                time.sleep(0.05)
            drain_out.join(5)
            stream._finish()
            return fed
        finally:
            stream.close()

    def versions(self) -> dict[str, str]:
        """The tool and its version (`<tool> --version`, first line)."""
        args = (self.command + ["--version"])
        try:
            out = subprocess.run(args, capture_output=True, timeout=60, env=self._env())
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SourceError(f"{self.kind} --version failed: {exc}") from None
        text = (out.stdout or out.stderr).decode("utf-8", "replace").strip().splitlines()
        return {"engine": "tool", "tool": self.kind, "tool_version": text[0] if text else "unknown"}


def format_modified_after(when: datetime) -> str:
    """The tools' YYYY-MM-DD_HH:MM:SS, in UTC (the child runs with TZ=UTC)."""
    if when.tzinfo is None:
        raise ValueError("modified_after must be timezone-aware")
    return when.astimezone(timezone.utc).strftime("%Y-%m-%d_%H:%M:%S")


class SetCounter:
    """Counts records per set of a .asb stream passing by: `for c in counter.wrap(chunks)`."""

    def __init__(self, name: str = "aerospike backup"):
        self.decoder = AsbDecoder(name, decode_bins=False)
        self.counts: dict[str, int] = {}

    def feed(self, chunk: bytes) -> None:
        counts = self.counts
        for obj in self.decoder.feed(chunk):
            if type(obj) is AsbRecord:
                key = obj.set or ""
                counts[key] = counts.get(key, 0) + 1

    def wrap(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            self.feed(chunk)
            yield chunk
        self.decoder.close()


# =============================================================================================
# the native engine


def _client_version() -> str:
    try:
        from importlib.metadata import version
        return version("aerospike")
    except Exception:  # noqa: BLE001 - metadata missing is not an error here
        return "unknown"


def expiry_from_ttl(ttl: int | None, now: float | None = None) -> int:
    """The .asb expiry (seconds since 2010-01-01, 0 = never) from a record's remaining TTL."""
    if ttl is None or ttl in (-1, 0, 0xFFFFFFFF) or ttl < 0:
        return 0
    now = time.time() if now is None else now
    return int(now) - CITRUSLEAF_EPOCH + int(ttl)


def ttl_from_expiry(expiry: int, now: float | None = None) -> int | None:
    """Remaining TTL for a put; None when the record has already expired."""
    if expiry == 0:
        return -1
    now = time.time() if now is None else now
    left = expiry - (int(now) - CITRUSLEAF_EPOCH)
    return left if left > 0 else None


def record_from_client(key: tuple, meta: dict, bins: dict | None, now: float) -> AsbRecord:
    """An AsbRecord (bins sorted by name) from a client (key, meta, bins) tuple."""
    ns, set_name, user_key, digest = key
    key_type = None
    if user_key is not None:
        if isinstance(user_key, bool):
            raise SourceError(f"record {bytes(digest).hex()}: boolean user key")
        if isinstance(user_key, int):
            key_type = "I"
        elif isinstance(user_key, float):
            key_type = "D"
        elif isinstance(user_key, str):
            key_type = "S"
        else:
            key_type, user_key = "B", bytes(user_key)
    out_bins = []
    for name in sorted(bins or ()):
        t, v = from_python(bins[name])
        out_bins.append((name, t, v))
    return AsbRecord(ns, bytes(digest), set_name or None, key_type, user_key,
                     int(meta.get("gen", 1)), expiry_from_ttl(meta.get("ttl"), now), out_bins)


class NativeEngine:
    """Backup and restore with the `aerospike` Python client."""

    def __init__(self, hosts: Iterable[str] | str, namespace: str, set: str | None = None, *,
                 user: str | None = None, password: str | None = None,
                 tls: dict[str, Any] | None = None, parallel: int = 4,
                 connect_timeout: float = 5.0, timeout: float = 30.0):
        self.hosts = parse_hosts(hosts)
        self.namespace = namespace
        self.set = set
        self.user = user
        self.password = password
        register(password)
        self.tls = dict(tls or {})
        self.parallel = max(1, parallel)
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self._client = None

    @property
    def where(self) -> str:
        return ",".join(f"{h}:{p}" for h, p in self.hosts)

    # -- connection --------------------------------------------------------------------------
    def client(self):
        if self._client is not None:
            return self._client
        import aerospike
        ms = int(self.timeout * 1000)
        config: dict[str, Any] = {
            "hosts": self.hosts,
            "connect_timeout": int(self.connect_timeout * 1000),
            "policies": {"read": {"total_timeout": ms}, "write": {"total_timeout": ms},
                         "query": {"total_timeout": 0, "socket_timeout": ms},
                         "info": {"timeout": ms}},
        }
        if self.tls:
            config["tls"] = {"enable": True, **{k: v for k, v in self.tls.items() if k != "enable"}}
        if self.user:
            config["user"], config["password"] = self.user, self.password or ""
        try:
            self._client = aerospike.client(config).connect()
        except Exception as exc:  # the client raises its own exception tree
            raise SourceError(f"aerospike: cannot connect to {self.where}: "
                              f"{redact(_client_error(exc))}") from None
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def check_namespace(self) -> None:
        reply = self._info("namespaces")
        names = [n for n in reply.strip().split(";") if n]
        if self.namespace not in names:
            raise SourceError(f"aerospike at {self.where}: unknown namespace {self.namespace!r} "
                              f"(namespaces: {', '.join(names) or 'none'})")

    def _info(self, command: str) -> str:
        client = self.client()
        try:
            reply = client.info_random_node(command)
        except Exception as exc:
            raise SourceError(f"aerospike at {self.where}: info {command!r} failed: "
                              f"{_client_error(exc)}") from None
        _, _, value = reply.partition("\t")
        return value.strip() if "\t" in reply else reply.strip()

    def versions(self) -> dict[str, str]:
        return {"engine": "native", "client": _client_version(), "server": self._info("build")}

    def record_counts(self) -> dict[str, int]:
        """Objects per set as the server reports them (summed over nodes, divided by replication)."""
        client = self.client()
        replies = client.info_all(f"sets/{self.namespace}")
        totals: dict[str, int] = {}
        for _node, (err, reply) in replies.items():
            if err:
                continue
            for entry in (reply or "").split("\t", 1)[-1].strip().split(";"):
                fields = dict(kv.split("=", 1) for kv in entry.split(":") if "=" in kv)
                name = fields.get("set") or fields.get("set_name")
                if name:
                    totals[name] = totals.get(name, 0) + int(fields.get("objects", 0))
        rf = self._replication_factor(client)
        return {k: v // rf for k, v in totals.items()}

    def _replication_factor(self, client) -> int:
        try:
            reply = self._info(f"namespace/{self.namespace}")
        except SourceError:
            return 1
        fields = dict(kv.split("=", 1) for kv in reply.split(";") if "=" in kv)
        nodes = max(1, len(client.get_nodes()))
        rf = int(fields.get("effective_replication_factor", fields.get("replication-factor", 1)))
        return max(1, min(rf, nodes))

    # -- scanning -------------------------------------------------------------------------------
    def _scan_partition(self, pid: int, modified_after: datetime | None, nobins: bool) -> list:
        client = self.client()
        query = client.query(self.namespace, self.set)
        policy: dict[str, Any] = {"partition_filter": {"begin": pid, "count": 1},
                                  "total_timeout": 0}
        if modified_after is not None:
            from aerospike_helpers.expressions import base as exp
            nanos = int(modified_after.timestamp() * 1_000_000_000)
            policy["expressions"] = exp.GE(exp.LastUpdateTime(), nanos).compile()
        try:
            return query.results(policy, {"nobins": nobins}) if nobins else query.results(policy)
        except Exception as exc:
            raise SourceError(f"aerospike at {self.where}: scan of partition {pid} of "
                              f"{self.namespace} failed: {_client_error(exc)}") from None

    def _partitions_in_order(self, partitions: Iterable[int], fn: Callable[[int], Any]) -> Iterator:
        """fn(p) for each partition, run `parallel` at a time, results in partition order."""
        partitions = list(partitions)
        with ThreadPoolExecutor(self.parallel) as pool:
            pending: collections.deque = collections.deque()
            it = iter(partitions)
            for p in it:
                pending.append(pool.submit(fn, p))
                if len(pending) >= self.parallel * 2:
                    break
            while pending:
                result = pending.popleft().result()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append(pool.submit(fn, nxt))
                yield result

    def backup(self, fileobj: BinaryIO, modified_after: datetime | None = None,
               partitions: Iterable[int] = range(N_PARTITIONS),
               digests_out: BinaryIO | None = None) -> dict[str, Any]:
        """Write the namespace (or set) as .asb: UDFs, indexes, then records in digest order.

        With digests_out, the digest set of the records written is stored there as well.
        Returns {"records": n, "sets": {set: n}, "bytes": n}.
        """
        self.check_namespace()
        now = time.time()
        writer = AsbWriter(_CountingWriter(fileobj))
        writer.write(AsbHeader(namespace=self.namespace, first_file=True))
        for udf in self.udfs():
            writer.write(udf)
        for index in self.indexes():
            writer.write(index)
        sets: dict[str, int] = {}
        digest_writer = DigestSetWriter(digests_out) if digests_out is not None else None

        def scan(pid):
            recs = [record_from_client(k, m, b, now) for k, m, b in
                    self._scan_partition(pid, modified_after, nobins=False)]
            recs.sort(key=lambda r: r.digest)
            return recs

        for recs in self._partitions_in_order(partitions, scan):
            for rec in recs:
                writer.write_record(rec)
                name = rec.set or ""
                sets[name] = sets.get(name, 0) + 1
                if digest_writer:
                    digest_writer.add(rec.digest)
        if digest_writer:
            digest_writer.close()
        return {"records": writer.records, "sets": sets, "bytes": writer.fileobj.count}

    def live_digests(self, partitions: Iterable[int] = range(N_PARTITIONS)) -> Iterator[bytes]:
        """Digests of all records now live, in (partition, digest) order (a no-bin scan)."""
        def scan(pid):
            return sorted(bytes(k[3]) for k, _m, _b in self._scan_partition(pid, None, nobins=True))
        for digests in self._partitions_in_order(partitions, scan):
            yield from digests

    def udfs(self) -> list[AsbUDF]:
        client = self.client()
        out = []
        try:
            modules = client.udf_list()
            for m in sorted(modules, key=lambda m: m["name"]):
                content = client.udf_get(m["name"])
                out.append(AsbUDF(name=m["name"], content=content.encode() if isinstance(content, str) else content))
        except Exception as exc:
            raise SourceError(f"aerospike at {self.where}: reading UDFs failed: "
                              f"{_client_error(exc)}") from None
        return out

    def indexes(self) -> list[AsbIndex]:
        """Secondary indexes of the namespace (simple bin indexes; others are logged)."""
        reply = self._info(f"sindex-list:ns={self.namespace}")
        out = []
        for entry in reply.split(";"):
            f = dict(kv.split("=", 1) for kv in entry.split(":") if "=" in kv)
            if not f.get("indexname"):
                continue
            itype = {"default": "N", "none": "N", "list": "L", "mapkeys": "K",
                     "mapvalues": "V"}.get(f.get("indextype", "default").lower(), "N")
            btype = {"string": "S", "numeric": "N", "geo2dsphere": "G", "geojson": "G",
                     "blob": "B"}.get(f.get("type", "").lower())
            if btype is None or f.get("context") not in (None, "NULL", "null") or f.get("exp") not in (None, "NULL", "null"):
                log.warning("aerospike: index %s not backed up by the native engine "
                            "(context/expression/unknown type)", f.get("indexname"))
                continue
            out.append(AsbIndex(f.get("ns", self.namespace), f.get("set", "NULL").replace("NULL", ""),
                                f["indexname"], itype, [(f.get("bin", ""), btype)]))
        return sorted(out, key=lambda i: i.name)

    # -- restoring ------------------------------------------------------------------------------
    def restore(self, fileobj: BinaryIO | Iterable[bytes], existing: str = "replace",
                concurrency: int = 8, name: str | None = None) -> dict[str, int]:
        """Write the records of a .asb stream (UDFs and indexes too) with the client.

        existing: "replace" (create or replace: the record becomes what the backup holds),
        "update" (create or merge bins), "create" (leave existing records alone).
        Returns {"records", "skipped_existing", "expired", "udfs", "indexes"}.
        """
        import aerospike
        policies = {"replace": aerospike.POLICY_EXISTS_CREATE_OR_REPLACE,
                    "update": aerospike.POLICY_EXISTS_IGNORE,
                    "create": aerospike.POLICY_EXISTS_CREATE}
        if existing not in policies:
            raise ConfigError(f"aerospike restore: existing must be one of {', '.join(policies)}")
        client = self.client()
        self.check_namespace()
        policy = {"exists": policies[existing], "key": aerospike.POLICY_KEY_SEND,
                  "total_timeout": int(self.timeout * 1000)}
        stats = {"records": 0, "skipped_existing": 0, "expired": 0, "udfs": 0, "indexes": 0}
        lock = threading.Lock()
        now = time.time()

        def put(rec: AsbRecord) -> None:
            ttl = ttl_from_expiry(rec.expiry, now)
            if ttl is None:
                with lock:
                    stats["expired"] += 1
                return
            set_name = rec.set or None
            if rec.key_type is None or rec.key_type == "X":
                key = (self.namespace, set_name, None, bytearray(rec.digest))
            else:
                key = (self.namespace, set_name, rec.key)
            bins = {n: _client_value(t, v) for n, t, v in rec.bins if t != "N"}
            meta = {"ttl": aerospike.TTL_NEVER_EXPIRE if ttl == -1 else ttl}
            try:
                client.put(key, bins, meta, policy)
            except aerospike.exception.RecordExistsError:
                with lock:
                    stats["skipped_existing"] += 1
                return
            except Exception as exc:
                raise SourceError(f"aerospike at {self.where}: writing record "
                                  f"{rec.digest.hex()} failed: {_client_error(exc)}") from None
            with lock:
                stats["records"] += 1

        with ThreadPoolExecutor(max(1, concurrency)) as pool:
            inflight: set = set()
            for obj in AsbReader(fileobj, name=name):
                if isinstance(obj, AsbRecord):
                    if obj.namespace != self.namespace:
                        raise SourceError(f"{name or 'backup'}: record of namespace "
                                          f"{obj.namespace!r}, restoring {self.namespace!r}")
                    inflight.add(pool.submit(put, obj))
                    if len(inflight) >= concurrency * 4:
                        done, inflight = wait(inflight, return_when=FIRST_EXCEPTION)
                        for f in done:
                            f.result()
                elif isinstance(obj, AsbUDF):
                    self._put_udf(obj)
                    stats["udfs"] += 1
                elif isinstance(obj, AsbIndex):
                    if self._create_index(obj):
                        stats["indexes"] += 1
            for f in inflight:
                f.result()
        return stats

    def _put_udf(self, udf: AsbUDF) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, os.path.basename(udf.name))
            with open(path, "wb") as f:
                f.write(udf.content)
            try:
                self.client().udf_put(path)
            except Exception as exc:
                raise SourceError(f"aerospike: registering UDF {udf.name!r} failed: "
                                  f"{_client_error(exc)}") from None

    def _create_index(self, index: AsbIndex) -> bool:
        import aerospike
        if index.context or index.expression or len(index.paths) != 1 or index.index_type != "N":
            log.warning("aerospike: index %s not restored by the native engine (only simple bin "
                        "indexes are); restore it with the tool engine", index.name)
            return False
        bin_name, btype = index.paths[0]
        create = {"S": "index_string_create", "N": "index_integer_create",
                  "G": "index_geo2dsphere_create", "B": "index_blob_create"}[btype]
        try:
            getattr(self.client(), create)(self.namespace, index.set or None, bin_name, index.name)
        except aerospike.exception.IndexFoundError:
            pass
        except Exception as exc:
            raise SourceError(f"aerospike: creating index {index.name!r} failed: "
                              f"{_client_error(exc)}") from None
        return True

    def delete_digests(self, digests: Iterable[bytes], concurrency: int = 8) -> int:
        """Remove records by digest (missing ones are fine); returns how many were removed."""
        import aerospike
        client = self.client()
        removed = 0
        lock = threading.Lock()

        def remove(d: bytes) -> None:
            nonlocal removed
            try:
                client.remove((self.namespace, self.set, None, bytearray(d)))
            except aerospike.exception.RecordNotFound:
                return
            except Exception as exc:
                raise SourceError(f"aerospike: deleting record {d.hex()} failed: "
                                  f"{_client_error(exc)}") from None
            with lock:
                removed += 1

        with ThreadPoolExecutor(max(1, concurrency)) as pool:
            inflight: set = set()
            for d in digests:
                inflight.add(pool.submit(remove, d))
                if len(inflight) >= concurrency * 4:
                    done, inflight = wait(inflight, return_when=FIRST_EXCEPTION)
                    for f in done:
                        f.result()
            for f in inflight:
                f.result()
        return removed

    def reconcile(self, recorded: BinaryIO) -> dict[str, int]:
        """Delete live records absent from a recorded digest set (see reconcile_digests)."""
        stats: dict[str, int] = {}
        to_delete = reconcile_digests(self.live_digests(), read_digest_set(recorded), stats)
        stats["deleted"] = self.delete_digests(to_delete)
        return stats


def _client_value(bin_type: str, value: Any) -> Any:
    import aerospike
    v = to_python(bin_type, value)
    t = bin_type.rstrip("!")
    if t == "G":
        return aerospike.GeoJSON(str(v))
    if t == "Y":
        return aerospike.HyperLogLog(bytes(v))
    if t in "JCPRHE":
        log.warning("aerospike: %s-typed bytes restored as plain bytes", t)
    return v


def _client_error(exc: Exception) -> str:
    """The client's exceptions carry (code, msg, file, line, in_doubt)."""
    msg = getattr(exc, "msg", None)
    code = getattr(exc, "code", None)
    if msg:
        return f"{msg} (code {code})" if code is not None else str(msg)
    return str(exc) or type(exc).__name__


class _CountingWriter:
    def __init__(self, f: BinaryIO):
        self.f = f
        self.count = 0

    def write(self, data: bytes) -> int:
        self.count += len(data)
        return self.f.write(data)


# =============================================================================================
# digest sets: what was live at an incremental


DIGEST_SET_MAGIC = b"DRTOOL-DIGESTS\x01"
DEFAULT_PREFIX = 12  # bytes of each digest kept: 96 bits, collisions negligible at 10^9 records


def digest_order(d: bytes) -> tuple[int, bytes]:
    """The order digest sets and live scans share: partition, then digest."""
    return (partition_id(d), d)


class DigestSetWriter:
    """Write a digest set, fed in (partition, digest) order: magic, prefix length, then
    the prefixes back to back, all zstd-compressed."""

    def __init__(self, fileobj: BinaryIO, prefix: int = DEFAULT_PREFIX, level: int = 3):
        if not 2 <= prefix <= 20:
            raise ValueError("digest prefix must be 2..20 bytes")
        self.prefix = prefix
        self._z = zstandard.ZstdCompressor(level=level).stream_writer(fileobj, closefd=False)
        self._z.write(DIGEST_SET_MAGIC + bytes([prefix]))
        self._last: tuple[int, bytes] | None = None
        self._buf = bytearray()
        self.count = 0

    def add(self, digest: bytes) -> None:
        key = (partition_id(digest), digest)
        if self._last is not None and key <= self._last:
            if key == self._last:
                return
            raise ValueError("digests must be added in (partition, digest) order")
        self._last = key
        self._buf += digest[: self.prefix]
        self.count += 1
        if len(self._buf) >= 1 << 20:
            self._z.write(bytes(self._buf))
            self._buf.clear()

    def close(self) -> None:
        if self._buf:
            self._z.write(bytes(self._buf))
            self._buf.clear()
        self._z.flush(zstandard.FLUSH_FRAME)
        self._z.close()


def write_digest_set(digests: Iterable[bytes], fileobj: BinaryIO, prefix: int = DEFAULT_PREFIX,
                     presorted: bool = True) -> int:
    """Store a digest set; with presorted=False the digests are sorted in memory first."""
    if not presorted:
        digests = sorted(set(digests), key=digest_order)
    w = DigestSetWriter(fileobj, prefix)
    for d in digests:
        w.add(bytes(d))
    w.close()
    return w.count


def read_digest_set(fileobj: BinaryIO) -> Iterator[bytes]:
    """The digest prefixes of a stored set, in (partition, digest) order."""
    reader = zstandard.ZstdDecompressor().stream_reader(fileobj, closefd=False)
    head = reader.read(len(DIGEST_SET_MAGIC) + 1)
    if head[: len(DIGEST_SET_MAGIC)] != DIGEST_SET_MAGIC or len(head) != len(DIGEST_SET_MAGIC) + 1:
        raise SourceError("digest set: bad header (not a drtool digest set)")
    prefix = head[-1]
    step = prefix * 65536
    rest = b""
    while True:
        chunk = reader.read(step)
        if not chunk:
            break
        data = rest + chunk
        usable = len(data) - len(data) % prefix
        for i in range(0, usable, prefix):
            yield data[i:i + prefix]
        rest = data[usable:]
    if rest:
        raise SourceError("digest set: truncated")


def reconcile_digests(live: Iterable[bytes], recorded: Iterable[bytes],
                      stats: dict[str, int] | None = None) -> Iterator[bytes]:
    """Live digests absent from the recorded set: the records to delete.

    Both inputs in (partition, digest) order; `recorded` may hold prefixes. A merge join,
    constant memory. stats gets "live", "recorded", "missing" (recorded, not live: records
    that expired or were lost) and "extra" (the digests yielded).
    """
    stats = {} if stats is None else stats
    for k in ("live", "recorded", "missing", "extra"):
        stats.setdefault(k, 0)
    rec_it = iter(recorded)

    def advance():
        cur = next(rec_it, None)
        if cur is None:
            return None, None
        stats["recorded"] += 1
        return cur, (partition_id(cur), cur)

    cur, cur_key = advance()
    plen = len(cur) if cur is not None else 20
    for d in live:
        stats["live"] += 1
        key = (partition_id(d), d[:plen])
        while cur_key is not None and cur_key < key:
            stats["missing"] += 1
            cur, cur_key = advance()
        if cur_key is not None and cur_key == key:
            cur, cur_key = advance()
            continue
        stats["extra"] += 1
        yield d
    while cur_key is not None:
        stats["missing"] += 1
        cur, cur_key = advance()


# =============================================================================================
# the snapshot's side: the UTXO store streamed into the repository, and back


def make_engine(aero_cfg, hosts: list[str] | None = None):
    """The engine [aerospike] asks for; `hosts` overrides the configured cluster (restore)."""
    password = os.environ.get(PASSWORD_ENV)
    if aero_cfg.engine == "native":
        return NativeEngine(hosts or aero_cfg.hosts, aero_cfg.namespace, aero_cfg.set or None,
                            user=aero_cfg.user or None, password=password, parallel=aero_cfg.parallel or 4)
    return ToolEngine(aero_cfg.command or None, hosts or aero_cfg.hosts, aero_cfg.namespace, aero_cfg.set or None,
                      user=aero_cfg.user or None, password=password, parallel=aero_cfg.parallel or None,
                      idle_timeout=float(aero_cfg.timeout), extra_backup_args=aero_cfg.extra_args)


def _pump_writes(produce: Callable[[BinaryIO], Any], max_chunks: int = 8) -> tuple[Iterator[bytes], dict]:
    """Run `produce(fileobj)` in a thread; its writes come out as an iterator of 1 MiB chunks
    (drtool.handoff: a bounded queue keeps memory flat, and a consumer that stops early stops
    the writer at its next chunk). The result dict gets produce's return value as "value"."""
    result: dict[str, Any] = {}

    class _ChunkingFile:
        def __init__(self, put: Callable[[bytes], None]) -> None:
            self.put = put
            self.buf = bytearray()

        def write(self, data: bytes) -> int:
            self.buf += data
            if len(self.buf) >= 1 << 20:
                self.put(bytes(self.buf))
                self.buf.clear()
            return len(data)

        def flush(self) -> None:
            pass

    def run(put: Callable[[bytes], None]) -> None:
        f = _ChunkingFile(put)
        result["value"] = produce(f)
        if f.buf:
            put(bytes(f.buf))

    return handoff.produced(run, max_chunks, "drtool-aerospike-scan"), result


INCREMENTAL_MARGIN = 300  # seconds before the parent's start: clocks differ, records may be re-sent


def _native_for(engine, aero_cfg, hosts: list[str] | None) -> "NativeEngine":
    """The client that reads the live digest set: the engine itself, or one beside the tool."""
    if isinstance(engine, NativeEngine):
        return engine
    return NativeEngine(hosts or aero_cfg.hosts, aero_cfg.namespace, aero_cfg.set or None,
                        user=aero_cfg.user or None, password=os.environ.get(PASSWORD_ENV))


def _chain_of(parent_src: dict | None) -> list[tuple[str, dict]]:
    """The full + incremental streams a parent snapshot's UTXO store is made of, in order."""
    items = (parent_src or {}).get("items", {})
    return sorted((k, v) for k, v in items.items() if k != "live-digests")


def _store_asb(session, engine, name: str, progress, modified_after: datetime | None, level: int) -> dict[str, Any]:
    if isinstance(engine, ToolEngine):
        counter = SetCounter()
        with engine.backup_stream(modified_after) as stream:
            ref = session.store_stream(name, counter.wrap(stream), progress, level)
        counts = counter.counts
    else:
        pieces, result = _pump_writes(lambda f: engine.backup(f, modified_after=modified_after))
        ref = session.store_stream(name, pieces, progress, level)
        counts = result["value"]["sets"]
    return {**ref, "record_counts": counts, "records": sum(counts.values())}


def backup(session, aero_cfg, parent_src: dict | None = None, parent_time: datetime | None = None) -> dict[str, Any]:
    """Back up the UTXO store as .asb; returns the manifest's `aerospike` source.

    With `[aerospike] incremental`, a snapshot whose parent holds a chain shorter than
    `full_every` stores only records modified since the parent started, plus the digest set of
    every live record, so a restore of the chain deletes what was deleted in between."""
    from drtool.progress import Progress

    engine = make_engine(aero_cfg)
    source: dict[str, Any] = {"engine": aero_cfg.engine, "namespace": aero_cfg.namespace,
                              "set": aero_cfg.set or None, "hosts": list(aero_cfg.hosts), **engine.versions()}
    chain = _chain_of(parent_src) if aero_cfg.incremental else []
    incremental = bool(chain) and parent_time is not None and len(chain) <= aero_cfg.full_every \
        and (parent_src or {}).get("engine") == aero_cfg.engine
    since = parent_time - timedelta(seconds=INCREMENTAL_MARGIN) if incremental else None
    try:
        with Progress("backup aerospike" + (" (incremental)" if incremental else "")) as progress:
            ref = _store_asb(session, engine, "aerospike.asb", progress, since, aero_cfg.compression_level)
            if not aero_cfg.incremental:
                return {**ref, **source}
            native = _native_for(engine, aero_cfg, None)
            try:
                pieces, _ = _pump_writes(lambda f: write_digest_set(native.live_digests(), f))
                digests = session.store_stream("aerospike.digests", pieces, progress)
            finally:
                if native is not engine:
                    native.close()
    finally:
        if isinstance(engine, NativeEngine):
            engine.close()
    items = dict(chain if incremental else [])
    kind = "incremental" if incremental else "full"
    items[f"{len(items):03d}-{kind}"] = {**ref, "modified_after": since.isoformat() if since else None}
    items["live-digests"] = digests
    return {"items": items, **source, "mode": kind, "record_counts": ref["record_counts"],
            "records": ref["records"]}


class _IterReader(io.RawIOBase):
    """A readable file over an iterator of byte chunks (for readers that want a file)."""

    def __init__(self, chunks: Iterable[bytes]):
        self._chunks = iter(chunks)
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._buf:
            self._buf = next(self._chunks, b"")
            if not self._buf:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def _restore_one(repo, ref: dict, engine, replace: bool) -> int:
    counter = SetCounter("aerospike restore")
    chunks = counter.wrap(repo.read_stream(ref))
    if isinstance(engine, ToolEngine):
        engine.restore_from_stream(chunks, replace=replace)
    else:
        engine.restore(chunks, existing="replace" if replace else "create")
    expected = ref.get("record_counts", {})
    if counter.counts != expected:
        raise SourceError(f"aerospike restore: the stream held {counter.counts} records per set, "
                          f"the backup recorded {expected}")
    return sum(counter.counts.values())


def restore(repo, src: dict, aero_cfg, hosts: list[str] | None, *, replace: bool = True) -> dict[str, Any]:
    """Write the stored UTXO store into a cluster: one stream, or a chain applied in order and
    reconciled with the live digest set recorded at the last link (no resurrected records)."""
    engine = make_engine(aero_cfg, hosts)
    try:
        if "items" not in src:
            return {"records": _restore_one(repo, src, engine, replace)}
        records = 0
        for _key, ref in _chain_of(src):
            records += _restore_one(repo, ref, engine, replace)
        native = _native_for(engine, aero_cfg, hosts)
        try:
            stats = native.reconcile(io.BufferedReader(_IterReader(repo.read_stream(src["items"]["live-digests"]))))
        finally:
            if native is not engine:
                native.close()
        return {"records": records, "reconcile": stats}
    finally:
        if isinstance(engine, NativeEngine):
            engine.close()
