"""The repository interface driven through the `restic` command line (0.14 or newer).

    [repository] url = "restic:<restic repository string>"   e.g. restic:/srv/restic,
                                                              restic:s3:http://host:9000/bucket/prefix
    password: RESTIC_PASSWORD, RESTIC_PASSWORD_FILE (or RESTIC_PASSWORD_COMMAND); S3 keys: AWS_* env

How drtool's objects map onto restic snapshots, all tagged `drtool:<session>` (one session per
`drtool backup`):
    a folder (blob store)  one `restic backup .` run inside it, so stored paths are relative,
                           tagged `drtool-store:<name>`; its parent is the previous snapshot's
    a stream (file, dump)  one `restic backup --stdin`, tagged `drtool-stream`
    the manifest           one `restic backup --stdin` of drtool-manifest.json, tagged
                           `drtool-manifest` and `drtool-id:<sha256 of the manifest>`, written last:
                           a drtool snapshot exists only once this restic snapshot does.
restic takes its own lock for every command (backups share, check/forget/prune are exclusive),
so drtool's own lock calls only wait for, or report, the locks restic holds.
"""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from drtool import secrets
from drtool.config import RepositoryConfig
from drtool.errors import ConfigError, IntegrityError, LockError, RepositoryError, SourceError
from drtool.progress import Progress
from drtool.repo.base import BackupSession, BackupStats, Finding, Manifest, Repository, RestoreStats, TreeSpec

log = logging.getLogger(__name__)

MIN_VERSION = (0, 14)
MANIFEST_TAG = "drtool-manifest"
MANIFEST_FILE = "drtool-manifest.json"
SESSION_TAG = "drtool:"        # + session id: every restic snapshot of one drtool backup
ID_TAG = "drtool-id:"          # + drtool snapshot id, on the manifest's restic snapshot
STORE_TAG = "drtool-store:"    # + blob store name
STREAM_TAG = "drtool-stream"
STALE_LOCK_AGE = 30 * 60       # restic's own rule: a lock not refreshed for 30 minutes is stale
ORPHAN_GRACE = 3600.0          # an aborted backup's restic snapshots are forgotten after this
MANIFEST_READERS = 4           # parallel `restic dump`s of manifests
PIECE = 1 << 20
STDERR_LINES = 40

_versions: dict[str, tuple[int, int, int]] = {}


def compression_mode(level: int) -> str:
    """restic 0.14 knows off/auto/max, not levels: drtool's zstd levels above 9 ask for max,
    the rest (fast levels too) for auto, restic's fastest that compresses."""
    return "max" if level >= 10 else "auto"


def find_restic(configured: str) -> str:
    """The restic binary ([repository] restic_path, a path or a name on PATH), checked >= 0.14."""
    path = shutil.which(configured or "restic")
    if not path:
        raise ConfigError(f"[repository] restic_path: restic not found ({configured!r} is not an executable "
                          "on PATH); install restic 0.14 or newer, or set restic_path")
    if path not in _versions:
        try:
            out = subprocess.run([path, "version"], capture_output=True, text=True, timeout=30,
                                 stdin=subprocess.DEVNULL).stdout
        except OSError as exc:
            raise ConfigError(f"[repository] restic_path: {path}: cannot run it ({exc})") from None
        m = re.search(r"restic (\d+)\.(\d+)\.(\d+)", out)
        if not m:
            raise ConfigError(f"[repository] restic_path: {path}: not restic (`restic version` printed "
                              f"{out.strip()[:80]!r})")
        _versions[path] = tuple(int(x) for x in m.groups())  # type: ignore[assignment]
    if _versions[path][:2] < MIN_VERSION:
        have = ".".join(map(str, _versions[path]))
        raise ConfigError(f"[repository] restic_path: {path} is restic {have}; drtool needs 0.14 or newer "
                          "(repository format 2, compression)")
    return path


def _restic_env(url: str) -> dict[str, str]:
    """The child environment: ours (AWS_*, RESTIC_*), with the password checked and registered."""
    env = dict(os.environ)
    if env.get("RESTIC_PASSWORD"):
        secrets.register(env["RESTIC_PASSWORD"])
    elif env.get("RESTIC_PASSWORD_FILE"):
        pw_file = env["RESTIC_PASSWORD_FILE"]
        try:
            secrets.register(Path(pw_file).read_text().strip())
        except OSError as exc:
            raise ConfigError(f"RESTIC_PASSWORD_FILE {pw_file}: cannot read it ({exc.strerror})") from None
    elif not env.get("RESTIC_PASSWORD_COMMAND"):
        raise ConfigError(f"{url}: no password for the restic repository: set RESTIC_PASSWORD or "
                          "RESTIC_PASSWORD_FILE")
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "B2_ACCOUNT_KEY", "AZURE_ACCOUNT_KEY"):
        secrets.register(env.get(var))
    env.setdefault("RESTIC_PROGRESS_FPS", "2")  # status lines twice a second, not 60
    return env


def _tail(stderr: str, lines: int = 3) -> str:
    """The last informative lines of restic's stderr, one line, redacted."""
    kept = [ln.strip() for ln in stderr.splitlines()
            if ln.strip() and not ln.startswith("[") and "returned error, retrying" not in ln]
    text = " | ".join(kept[-lines:]).replace("Fatal: ", "")
    return secrets.redact(text) or "no message"


def _ids_of(value: Any) -> Iterator[tuple[str, str]]:
    """(item name, restic snapshot id) of every stored item in a manifest source."""
    if isinstance(value, dict):
        if "restic_snapshot" in value:
            yield value.get("name", ""), value["restic_snapshot"]
        for key, sub in value.items():
            if isinstance(sub, dict):
                for name, rid in _ids_of(sub):
                    yield name or key, rid


def _safe_filename(name: str) -> str:
    """A --stdin-filename: one path component (restic 0.14 does not make directories)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name.strip("/")) or "stream"


def _tag_value(text: str) -> str:
    return text.replace(",", "_")  # restic splits --tag values at commas


class _Held:
    """What `lock()` returns: restic holds its own locks per command, so nothing to release."""

    def release(self) -> None:
        pass


class ResticRepository(Repository):
    def __init__(self, cfg: RepositoryConfig, create: bool = False):
        self.repo = cfg.url[len("restic:"):]
        self.url = secrets.redact(cfg.url)
        if not self.repo:
            raise ConfigError("[repository] url: `restic:` needs a restic repository after it "
                              "(restic:/srv/restic, restic:s3:https://host/bucket/prefix)")
        self.binary = find_restic(cfg.restic_path)
        self.env = _restic_env(self.url)
        self.compression = compression_mode(cfg.compression_level)
        self._manifests: dict[str, tuple[Manifest, str]] = {}  # restic id -> (manifest, session)
        self.listing: list[dict] | None = None  # restic's snapshot list as last read
        self._cache_lock = threading.Lock()
        self.config = self._open(create)
        if self.config.get("version", 1) < 2:
            log.warning("%s: restic repository format %s has no compression ([repository] compression_level "
                        "is ignored; `restic migrate upgrade_repo_v2` upgrades it)", self.url, self.config.get("version"))

    # ---- running restic -----------------------------------------------------------------
    def _argv(self, *args: str) -> list[str]:
        return [self.binary, "--repo", self.repo, *args]

    def _fail(self, what: str, returncode: int, stderr: str) -> None:
        """Raise the error a failed restic command means: each cause its own message."""
        if "wrong password or no key found" in stderr:
            raise ConfigError(f"{self.url}: wrong password: RESTIC_PASSWORD / RESTIC_PASSWORD_FILE does not "
                              "open any key of this restic repository")
        m = re.search(r"repository is already locked (exclusively )?by (.+)", stderr)
        if m:
            since = re.search(r"lock was created at (.+)", stderr)
            raise LockError(f"{self.url}: locked by another restic process ({'exclusive lock, ' if m.group(1) else ''}"
                            f"{secrets.redact(m.group(2).strip())}"
                            + (f", since {since.group(1).strip()}" if since else "")
                            + "); wait for it, or if it is stale: `restic unlock` / drtool prune --break-lock")
        if "unable to open config file" in stderr or "Is there a repository at the following location" in stderr:
            raise RepositoryError(f"{self.url}: no restic repository there ({_tail(stderr, 1)}); "
                                  "`drtool backup` creates one, or check [repository] url")
        raise RepositoryError(f"{self.url}: restic {what} failed (exit {returncode}): {_tail(stderr)}")

    def _run(self, *args: str, what: str | None = None, text: bool = True,
             ok_codes: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
        proc = subprocess.run(self._argv(*args), capture_output=True, text=text, env=self.env,
                              stdin=subprocess.DEVNULL)
        if proc.returncode not in ok_codes:
            stderr = proc.stderr if text else proc.stderr.decode(errors="replace")
            self._fail(what or args[0], proc.returncode, stderr)
        return proc

    def _json(self, *args: str, what: str | None = None) -> Any:
        out = self._run(*args, "--json", what=what).stdout
        try:
            return json.loads(out) if out.strip() else None
        except ValueError:
            raise RepositoryError(f"{self.url}: restic {what or args[0]} printed no valid JSON "
                                  f"({secrets.redact(out.strip()[:120])!r})") from None

    def _open(self, create: bool) -> dict:
        try:
            return self._json("cat", "config", "--no-lock", what="cat config")
        except RepositoryError as exc:
            if not create or "no restic repository there" not in str(exc):
                raise
        log.info("%s: creating a restic repository (format 2)", self.url)
        self._run("init", "--repository-version", "2", what="init")
        return self._json("cat", "config", "--no-lock", what="cat config")

    def _stream_backup(self, args: list[str], *, what: str, cwd: Path | None = None,
                       progress: Progress | None = None,
                       feed: Callable[[Any], None] | None = None) -> tuple[dict, dict[str, int]]:
        """Run `restic backup --json`, following its status lines; `feed(stdin)` writes the
        --stdin data from a thread (the pipe bounds what is in flight). Returns (summary,
        counts of what restic said it read: bytes_read, errors, vanished)."""
        proc = subprocess.Popen(self._argv("backup", "--json", *args), cwd=cwd, env=self.env,
                                stdin=subprocess.PIPE if feed else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_LINES)
        drain = threading.Thread(target=lambda: stderr_tail.extend(
            ln.decode(errors="replace") for ln in proc.stderr), daemon=True)  # type: ignore[union-attr]
        drain.start()
        feed_error: list[BaseException] = []
        writer = None
        if feed:
            def write() -> None:
                try:
                    feed(proc.stdin)
                    proc.stdin.close()  # type: ignore[union-attr]
                except (BrokenPipeError, ValueError):
                    pass  # restic stopped reading: its own error says why
                except BaseException as exc:  # the source failed: restic must not save a cut stream
                    feed_error.append(exc)
                    _interrupt(proc)
            writer = threading.Thread(target=write, name="drtool-restic-stdin", daemon=True)
            writer.start()
        summary: dict | None = None
        counts = {"bytes_read": 0, "errors": 0}
        last = {"files": 0, "bytes": 0}
        try:
            for raw in proc.stdout:  # type: ignore[union-attr]
                try:
                    msg = json.loads(raw)
                except ValueError:
                    continue
                kind = msg.get("message_type")
                if kind == "status" and progress is not None and "action" not in msg:
                    files, nbytes = msg.get("files_done", 0), msg.get("bytes_done", 0)
                    if files > last["files"] or nbytes > last["bytes"]:
                        progress.advance(files=max(0, files - last["files"]), nbytes=max(0, nbytes - last["bytes"]))
                        last.update(files=max(files, last["files"]), bytes=max(nbytes, last["bytes"]))
                elif kind == "verbose_status" and msg.get("action") in ("new", "modified") \
                        and not msg.get("item", "").endswith("/"):
                    counts["bytes_read"] += msg.get("data_size", 0)
                elif kind == "error":
                    counts["errors"] += 1
                elif kind == "summary":
                    summary = msg
            proc.wait()
        except BaseException:
            _interrupt(proc)
            raise
        finally:
            if writer:
                writer.join()
            drain.join(timeout=10)
        if feed_error:
            raise feed_error[0]
        stderr = "".join(stderr_tail)
        if proc.returncode == 3 and summary:
            # restic saved the snapshot but could not read some files: vanished ones are normal
            # on a running node (the pruner deletes); anything else is not.
            problems = [ln for ln in stderr.splitlines() if ln.strip() and "no such file or directory" not in ln]
            if problems:
                raise SourceError(f"{what}: restic could not read {counts['errors']} files: {_tail(stderr)}")
            log.warning("%s: %d files vanished while restic read them", what, counts["errors"])
            counts["vanished"] = counts["errors"]
        elif proc.returncode != 0 or summary is None:
            self._fail(what, proc.returncode, stderr)
        if progress is not None:
            files, nbytes = summary.get("total_files_processed", 0), summary.get("total_bytes_processed", 0)
            progress.advance(files=max(0, files - last["files"]), nbytes=max(0, nbytes - last["bytes"]))
        return summary, counts

    # ---- restic snapshots ---------------------------------------------------------------
    def restic_snapshots(self, *tags: str) -> list[dict]:
        """restic's own snapshot list (all, or those with every one of `tags`)."""
        args = ["snapshots", "--no-lock"]
        if tags:
            args += ["--tag", ",".join(tags)]
        return self._json(*args, what="snapshots") or []

    def snapshots(self) -> list[Manifest]:
        self.listing = self.restic_snapshots()  # kept: a backup's parent check reuses it
        listed = [s for s in self.listing if MANIFEST_TAG in (s.get("tags") or [])]
        todo = [s for s in listed if s["id"] not in self._manifests]
        if todo:
            with ThreadPoolExecutor(MANIFEST_READERS) as pool:
                for snap, loaded in zip(todo, pool.map(self._load_manifest, todo)):
                    if loaded is not None:
                        with self._cache_lock:
                            self._manifests[snap["id"]] = loaded
        present = {s["id"] for s in listed}
        out = [m for rid, (m, _session) in self._manifests.items() if rid in present]
        out.sort(key=lambda m: (m.doc["time"], m.id))
        return out

    def _load_manifest(self, snap: dict) -> tuple[Manifest, str] | None:
        tags = snap.get("tags") or []
        want = next((t[len(ID_TAG):] for t in tags if t.startswith(ID_TAG)), None)
        session = next((t[len(SESSION_TAG):] for t in tags if t.startswith(SESSION_TAG)), "")
        try:
            raw = self._run("dump", "--no-lock", snap["id"], "/" + MANIFEST_FILE, text=False,
                            what=f"dump {snap['short_id']}").stdout
        except RepositoryError as exc:
            log.error("restic snapshot %s: manifest unreadable (%s): ignored", snap["short_id"], exc)
            return None
        snap_id = hashlib.sha256(raw).hexdigest()
        if want is not None and snap_id != want:
            log.error("restic snapshot %s: manifest does not match its id %s (tampered or damaged): ignored",
                      snap["short_id"], want[:8])
            return None
        try:
            return Manifest(snap_id, json.loads(raw)), session
        except ValueError:
            log.error("restic snapshot %s: manifest is not JSON: ignored", snap["short_id"])
            return None

    def _session_of(self, manifest: Manifest) -> str | None:
        for m, session in self._manifests.values():
            if m.id == manifest.id:
                return session
        return None

    def orphans(self) -> list[dict]:
        """restic snapshots of drtool sessions that never wrote a manifest (aborted backups)."""
        self.snapshots()
        with_manifest = {session for _m, session in self._manifests.values()}
        out = []
        for snap in self.restic_snapshots():
            sessions = [t[len(SESSION_TAG):] for t in snap.get("tags") or [] if t.startswith(SESSION_TAG)]
            if sessions and sessions[0] not in with_manifest and MANIFEST_TAG not in (snap.get("tags") or []):
                out.append({"restic_snapshot": snap["id"], "session": sessions[0], "time": snap["time"],
                            "tags": snap.get("tags") or []})
        return out

    # ---- locks --------------------------------------------------------------------------
    def restic_locks(self) -> list[dict]:
        """The locks in the repository, as restic wrote them (owner, pid, time, exclusive)."""
        out = []
        for lock_id in self._run("list", "locks", "--no-lock", what="list locks").stdout.split():
            try:
                doc = self._json("cat", "lock", lock_id, "--no-lock", what=f"cat lock {lock_id[:8]}")
            except RepositoryError:
                continue  # released while we looked
            if doc:
                out.append({**doc, "id": lock_id})
        return out

    def _describe_lock(self, lock: dict) -> str:
        created = _parse_time(lock["time"])
        age = (dt.datetime.now(dt.timezone.utc) - created).total_seconds()
        stale = age > STALE_LOCK_AGE or (lock.get("hostname") == socket.gethostname() and not _alive(lock.get("pid", 0)))
        return (f"{'exclusive ' if lock.get('exclusive') else ''}lock {lock['id'][:8]} of PID {lock.get('pid')} on "
                f"{lock.get('hostname')} by {lock.get('username')}, {age:.0f}s old"
                + (" (stale: `restic unlock` or drtool prune --break-lock removes it)" if stale else ""))

    def _wait_for_locks(self, exclusive: bool, wait: float, command: str) -> None:
        deadline = time.monotonic() + wait
        while True:
            blocking = [lk for lk in self.restic_locks() if exclusive or lk.get("exclusive")]
            if not blocking:
                return
            if time.monotonic() >= deadline:
                raise LockError(f"{self.url}: {command}: repository locked by {self._describe_lock(blocking[0])}")
            log.info("%s: waiting for %s", self.url, self._describe_lock(blocking[0]))
            time.sleep(min(5.0, max(0.2, deadline - time.monotonic())))

    def lock(self, command: str, exclusive: bool, break_stale: bool = False, wait: float = 0.0) -> _Held:
        if break_stale:
            self._run("unlock", what="unlock")  # restic removes only stale locks
        self._wait_for_locks(exclusive, wait, command)
        return _Held()

    def begin_backup(self, command: str = "backup", wait: float = 0.0, dry_run: bool = False) -> "ResticBackup":
        if dry_run:
            raise ConfigError("--dry-run: the restic engine has no dry run (restic backup --dry-run "
                              "cannot take streams); use the native engine")
        if wait > 0:  # without a wait, restic's own lock refusal says the same
            self._wait_for_locks(False, wait, command)
        return ResticBackup(self)

    # ---- restore ------------------------------------------------------------------------
    def restore_tree(self, ref: dict, dest: Path, progress: Progress,
                     on_folder_done=None) -> RestoreStats:
        rid = ref["restic_snapshot"]
        # --verify: restic reads every restored file back and checks it against its blobs.
        self._run("restore", rid, "--target", str(dest), "--verify", what=f"restore {rid[:8]}")
        stats = RestoreStats()
        for dirpath, dirnames, filenames in os.walk(dest):
            stats.dirs += len(dirnames)
            for name in filenames:
                st = os.lstat(os.path.join(dirpath, name))
                if not os.path.islink(os.path.join(dirpath, name)):
                    stats.files += 1
                    stats.bytes_written += st.st_size
        if (stats.files, stats.bytes_written) != (ref.get("files"), ref.get("bytes")):
            raise IntegrityError(f"restic snapshot {rid[:8]}: restored {stats.files} files / {stats.bytes_written} "
                                 f"bytes, the manifest recorded {ref.get('files')} / {ref.get('bytes')}")
        progress.advance(files=stats.files, nbytes=stats.bytes_written)
        return stats

    def read_stream(self, ref: dict, views: bool = False) -> Iterator[bytes]:
        rid, name = ref["restic_snapshot"], ref.get("restic_path") or "/" + _safe_filename(ref["name"])
        where = f"stream {ref.get('name', '')} (restic snapshot {rid[:8]})"
        proc = subprocess.Popen(self._argv("dump", rid, name), env=self.env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        stderr_tail: collections.deque[bytes] = collections.deque(maxlen=STDERR_LINES)
        drain = threading.Thread(target=lambda: stderr_tail.extend(proc.stderr), daemon=True)  # type: ignore[arg-type]
        drain.start()
        whole, size = hashlib.sha256(), 0
        try:
            while True:
                piece = proc.stdout.read(PIECE)  # type: ignore[union-attr]
                if not piece:
                    break
                whole.update(piece)
                size += len(piece)
                yield piece
            proc.wait()
            drain.join(timeout=10)
            if proc.returncode != 0:
                self._fail(f"dump {rid[:8]}", proc.returncode, b"".join(stderr_tail).decode(errors="replace"))
            if size != ref["size"] or whole.hexdigest() != ref["sha256"]:
                raise IntegrityError(f"{where}: restored stream does not match the recorded size or SHA-256")
        finally:
            if proc.poll() is None:
                _interrupt(proc)
            proc.stdout.close()  # type: ignore[union-attr]

    # ---- verify -------------------------------------------------------------------------
    def check(self, snapshots: list[Manifest], read_fraction: float, progress: Progress) -> list[Finding]:
        findings: list[Finding] = []
        present = {s["id"] for s in self.restic_snapshots()}
        for snap in snapshots:
            for name, rid in _ids_of(snap.sources):
                if rid not in present:
                    findings.append(Finding(f"snapshot {snap.id[:8]} {name}", f"restic snapshot {rid[:8]} is missing"))
        structure = self._check()
        findings += structure
        if read_fraction > 0:
            if any("does not exist" in f.problem for f in structure):
                # restic would retry every missing pack for a minute each: report what is known.
                findings.append(Finding("restic check --read-data", "skipped: packs are missing (see above)", "warning"))
            else:
                arg = "--read-data" if read_fraction >= 1 else f"--read-data-subset={read_fraction * 100:.4g}%"
                seen = {str(f) for f in findings}
                findings += [f for f in self._check(arg) if str(f) not in seen]
        progress.advance(files=len(snapshots))
        return findings

    def _check(self, *args: str) -> list[Finding]:
        proc = subprocess.run(self._argv("check", *args), capture_output=True, text=True, env=self.env,
                              stdin=subprocess.DEVNULL)
        text = proc.stderr + "\n" + proc.stdout
        if proc.returncode != 0 and ("already locked" in text or "wrong password" in text
                                     or "unable to open config file" in text):
            self._fail("check", proc.returncode, proc.stderr)
        findings = parse_check_output(text, "error" if proc.returncode else "warning")
        if proc.returncode != 0 and not [f for f in findings if f.severity == "error"]:
            findings.append(Finding(f"restic check {' '.join(args)}".strip(), _tail(proc.stderr)))
        return findings

    # ---- prune --------------------------------------------------------------------------
    def forget(self, manifests: list[Manifest]) -> None:
        """Forget every restic snapshot of these drtool snapshots' sessions (stores, streams,
        manifest); their data goes with the next collect_garbage."""
        self.snapshots()
        sessions = {s for s in (self._session_of(m) for m in manifests) if s}
        ids = {rid for m in manifests for _name, rid in _ids_of(m.sources)}
        for snap in self.restic_snapshots():
            tags = snap.get("tags") or []
            if any(t[len(SESSION_TAG):] in sessions for t in tags if t.startswith(SESSION_TAG)):
                ids.add(snap["id"])
        present = {s["id"] for s in self.restic_snapshots()}
        self._forget_ids(sorted(ids & present))
        with self._cache_lock:
            for rid in [r for r, (m, _s) in self._manifests.items() if m.id in {x.id for x in manifests}]:
                del self._manifests[rid]

    def _forget_ids(self, ids: list[str]) -> None:
        for i in range(0, len(ids), 100):
            self._run("forget", *ids[i:i + 100], what="forget")

    def collect_garbage(self, progress: Progress, orphan_grace: float = ORPHAN_GRACE) -> dict[str, int]:
        """Forget the restic snapshots of backups aborted over `orphan_grace` ago, then `restic prune`."""
        now = dt.datetime.now(dt.timezone.utc)
        old = [o["restic_snapshot"] for o in self.orphans()
               if (now - _parse_time(o["time"])).total_seconds() > orphan_grace]
        if old:
            log.info("forgetting %d restic snapshots left by aborted backups", len(old))
            self._forget_ids(old)
        out = self._run("prune", what="prune").stdout
        progress.advance(files=1)
        return {**parse_prune_output(out), "orphans_forgotten": len(old)}


class ResticBackup(BackupSession):
    def __init__(self, repo: ResticRepository):
        self.repo = repo
        self.session = uuid.uuid4().hex[:16]
        self.stats = BackupStats()

    def _tags(self, *extra: str) -> list[str]:
        out = []
        for tag in (SESSION_TAG + self.session, *extra):
            out += ["--tag", _tag_value(tag)]
        return out

    def _compression(self) -> list[str]:
        return ["--compression", self.repo.compression] if self.repo.config.get("version", 1) >= 2 else []

    def store_tree(self, spec: TreeSpec, parent_ref: dict | None, progress: Progress) -> dict:
        if not spec.root.is_dir():
            raise SourceError(f"blob store {spec.name}: {spec.root}: not a directory")
        args = ["-v", *self._tags(STORE_TAG + spec.name), *self._compression()]
        for glob in spec.exclude_globs:
            args += ["--exclude", glob]
        parent = (parent_ref or {}).get("restic_snapshot")
        if parent:
            if self.repo.listing is None:
                self.repo.listing = self.repo.restic_snapshots()
            if parent in {s["id"] for s in self.repo.listing}:
                args += ["--parent", parent]  # unchanged files (path, size, mtime, inode) are not read
        args.append(".")  # run inside the store: stored paths are relative to it
        summary, counts = self.repo._stream_backup(args, what=f"blob store {spec.name}", cwd=spec.root, progress=progress)
        self.stats.files_new += summary.get("files_new", 0) + summary.get("files_changed", 0)
        self.stats.files_unchanged += summary.get("files_unmodified", 0)
        self.stats.files_vanished += counts.get("vanished", 0)
        self.stats.bytes_read += counts["bytes_read"]
        self.stats.bytes_stored += summary.get("data_added", 0)
        # restic 0.14 names the new snapshot by its short id; commit() writes the full one.
        return {"restic_snapshot": summary["snapshot_id"],
                "files": summary.get("total_files_processed", 0) - counts.get("vanished", 0),
                "bytes": summary.get("total_bytes_processed", 0)}

    def store_stream(self, name: str, pieces: Iterable[bytes], progress: Progress, level: int | None = None) -> dict:
        filename = _safe_filename(name)
        whole, size = hashlib.sha256(), [0]

        def feed(stdin) -> None:
            for piece in pieces:
                whole.update(piece)
                size[0] += len(piece)
                stdin.write(piece)
                progress.advance(nbytes=len(piece))

        args = ["--stdin", "--stdin-filename", filename, *self._tags(STREAM_TAG), *self._compression()]
        summary, _counts = self.repo._stream_backup(args, what=f"stream {name}", feed=feed)
        self.stats.bytes_read += size[0]
        self.stats.bytes_stored += summary.get("data_added", 0)
        return {"restic_snapshot": summary["snapshot_id"], "name": name,
                "restic_path": "/" + filename, "size": size[0], "sha256": whole.hexdigest()}

    def commit(self, doc: dict[str, Any]) -> Manifest:
        self._resolve_ids(doc)
        raw = json.dumps(doc, sort_keys=True, indent=1).encode()
        snap_id = hashlib.sha256(raw).hexdigest()

        def feed(stdin) -> None:
            stdin.write(raw)

        args = ["--stdin", "--stdin-filename", MANIFEST_FILE, *self._tags(MANIFEST_TAG, ID_TAG + snap_id),
                *self._compression()]
        summary, _counts = self.repo._stream_backup(args, what="manifest", feed=feed)
        self.stats.bytes_stored += summary.get("data_added", 0)
        return Manifest(snap_id, doc)

    def _resolve_ids(self, doc: dict) -> None:
        """Short restic ids (what restic 0.14's summary names) -> full ids, in one listing."""
        mine = [s["id"] for s in self.repo.restic_snapshots(SESSION_TAG + self.session)]

        def visit(value: Any) -> None:
            if isinstance(value, dict):
                short = value.get("restic_snapshot")
                if isinstance(short, str) and len(short) < 64:
                    full = [rid for rid in mine if rid.startswith(short)]
                    if len(full) != 1:
                        raise RepositoryError(f"restic snapshot {short} of this backup is "
                                              f"{'not listed' if not full else 'ambiguous'}; nothing committed")
                    value["restic_snapshot"] = full[0]
                for sub in value.values():
                    visit(sub)

        visit(doc.get("sources", {}))

    def abort(self) -> None:
        """Nothing to undo: without the manifest snapshot this session's restic snapshots are
        orphans, listed by orphans() and forgotten by a later collect_garbage."""
        log.info("backup session %s aborted: its restic snapshots stay as orphans until prune", self.session)


# ---- parsing restic's text output ------------------------------------------------------
_CHECK_INFO = re.compile(
    r"^(using temporary cache|create (exclusive )?lock|load indexes|check all packs|check snapshots|"
    r"read all data|read [\d.]+% of data packs|read .* of data packs|no errors were found|\[\d|"
    r"Fatal: repository contains errors|Load\(.*returned error, retrying|created new cache|"
    r"repository [0-9a-f]+ opened|found \d+ old cache|.*packs? (was|were) found|will remove|"
    r"signal interrupt)")
_CHECK_OBJECT = re.compile(r"^(pack|tree|blob|snapshot|index|file) ([0-9a-f]{8,64})[: ]\s*(.*)$", re.IGNORECASE)


def parse_check_output(text: str, severity: str = "error") -> list[Finding]:
    """Findings from `restic check` output, each naming the pack, tree or blob restic named."""
    findings: list[Finding] = []
    context: str | None = None
    for line in text.splitlines():
        if not line.strip() or _CHECK_INFO.match(line.strip()):
            continue
        stripped = line.strip()
        m = re.match(r"^error for tree ([0-9a-f]+):?$", stripped)
        if m:
            context = f"restic tree {m.group(1)[:16]}"
            continue
        if line[:1].isspace() and context:
            findings.append(Finding(context, secrets.redact(stripped), severity))
            continue
        context = None
        m = _CHECK_OBJECT.match(stripped)
        damaged = re.match(r"^Pack ID does not match, want ([0-9a-f]{64}), got ([0-9a-f]{64})", stripped)
        named = re.search(r"\b(pack|tree|blob|snapshot|index) ([0-9a-f]{8,64})\b", stripped, re.IGNORECASE)
        if m:
            findings.append(Finding(f"restic {m.group(1).lower()} {m.group(2)[:16]}", secrets.redact(m.group(3)), severity))
        elif damaged:
            findings.append(Finding(f"restic pack {damaged.group(1)[:16]}",
                                    f"content does not match its id (damaged; it hashes to {damaged.group(2)[:16]})",
                                    severity))
        elif named:
            findings.append(Finding(f"restic {named.group(1).lower()} {named.group(2)[:16]}",
                                    secrets.redact(stripped.replace("Fatal: ", "")), severity))
        else:
            findings.append(Finding("restic check", secrets.redact(stripped.replace("Fatal: ", "")), severity))
    return findings


_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


def parse_prune_output(text: str) -> dict[str, int]:
    """What `restic prune` removed: packs deleted, bytes freed (restic prints them rounded)."""
    out = {"objects_deleted": 0, "bytes_freed": 0, "packs_repacked": 0}
    m = re.search(r"removing (\d+) old packs", text)
    if m:
        out["objects_deleted"] = int(m.group(1))
    m = re.search(r"total prune:\s+\d+ blobs / ([\d.]+) (B|KiB|MiB|GiB|TiB)", text)
    if m:
        out["bytes_freed"] = int(float(m.group(1)) * _UNITS[m.group(2)])
    m = re.search(r"repacking (\d+) packs|(\d+) / \d+ packs repacked", text)
    if m:
        out["packs_repacked"] = int(m.group(1) or m.group(2))
    return out


def _parse_time(text: str) -> dt.datetime:
    """restic's RFC 3339 times carry nanoseconds; Python takes microseconds."""
    text = re.sub(r"(\.\d{6})\d*", r"\1", text).replace("Z", "+00:00")
    return dt.datetime.fromisoformat(text)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _interrupt(proc: subprocess.Popen) -> None:
    """Stop restic the way it cleans up after (removes its lock, saves no snapshot)."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
