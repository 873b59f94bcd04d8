"""`drtool daemon`: the policy's jobs on their schedules, /metrics and /healthz, webhooks.

Jobs (each on its [schedule] cron expression or interval; a job without one does not run):
    backup   a snapshot of the node (tag "scheduled")
    verify   layer 1 on every snapshot, plus a ROTATING read of the data: read_data_fraction
             f gives t = round(1/f) subsets; run k reads subset n = k mod t (restic's
             --read-data-subset n/t), a pack belonging to subset int(sha[:8], 16) mod t. Every
             pack is read once per t runs instead of a random sample that may miss one forever.
             The cursor persists in <state_dir>/verify-rotation.json.
    prune    the retention policy, then garbage collection
    drill    `verify --drill` on the newest snapshot (a restore into scratch space)
    disk     usage against [disk] thresholds; enforcement when a filesystem is critical

Rules: one instance of each job at a time (an overrunning job's missed runs are skipped and
counted as result="skipped"), misfires coalesced, and the repository jobs (backup, verify,
prune, drill) run one after another, never together: prune deleting packs under a running
verify would report false damage. A job that raises is logged and counted; the daemon goes on.

Shutdown (SIGTERM, SIGINT): no new job starts; a running job gets `grace` seconds to finish;
then JobCancelled is raised inside it, which unwinds it the way Ctrl-C unwinds `drtool backup`
(the manifest is not written, the lock is released, a quiesced node resumed). Exit code 0.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import json
import logging
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from drtool import secrets
from drtool.config import Config
from drtool.errors import DrtoolError, ObjectNotFound
from drtool.metrics import HealthState, Metrics, MetricsServer
from drtool.notify import Notifier
from drtool.policy import Policy
from drtool.progress import Progress
from drtool.repo.base import Finding, Manifest, Repository
from drtool.throttle import throttle_store

log = logging.getLogger(__name__)

JOBS = ("backup", "verify", "prune", "drill", "disk")
REPOSITORY_JOBS = {"backup", "verify", "prune", "drill"}
GRACE_SECONDS = 300.0
HEALTH_INTERVAL = 30.0
CANCEL_WAIT = 60.0        # after cancelling: how long a job may take to unwind (release locks, resume)
MISFIRE_GRACE = 300       # seconds a run may start late (the scheduler busy) and still run
ROTATION_FILE = "verify-rotation.json"


class JobSkipped(Exception):
    """The job did not run (a feature missing, the daemon stopping): counted as skipped."""


class JobFailed(DrtoolError):
    """The job ran and found problems (verify damage, a failed drill)."""

    def __init__(self, message: str, summary: dict[str, Any]):
        super().__init__(message)
        self.summary = summary


class JobCancelled(BaseException):
    """Raised inside a running job at shutdown. BaseException: `except Exception` must not swallow it."""


# ---------------------------------------------------------------------------------------------
# Logging: the job in every line, JSON lines with --log-format json
# ---------------------------------------------------------------------------------------------

_context = threading.local()


class _JobFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.job = getattr(_context, "job", None)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, job (and exc when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {"time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
               "level": record.levelname.lower(), "logger": record.name,
               "message": secrets.redact(record.getMessage()), "job": getattr(record, "job", None)}
        if record.exc_info:
            doc["exc"] = secrets.redact(self.formatException(record.exc_info))
        return json.dumps(doc)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        job = getattr(record, "job", None)
        prefix = f"drtool[{job}]" if job else "drtool"
        text = f"{self.formatTime(record, '%Y-%m-%dT%H:%M:%S')} {prefix}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return secrets.redact(text)


def configure_logging(log_format: str) -> None:
    if log_format not in ("text", "json"):
        raise ValueError(f"log format {log_format!r}: text or json")
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler(sys.stderr))
        logging.getLogger("drtool").setLevel(logging.INFO)
    for handler in root.handlers:
        handler.addFilter(_JobFilter())
        handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    Progress.enabled = Progress.enabled and log_format == "text"


# ---------------------------------------------------------------------------------------------
# Repository access
# ---------------------------------------------------------------------------------------------


def open_repo(cfg: Config, policy: Policy, create: bool = False) -> Repository:
    """The repository, its object store throttled per [throttle] (idempotent once
    open_repository does it itself)."""
    from drtool.repo import open_repository

    repo = open_repository(cfg.repository, create=create)
    if getattr(repo, "store", None) is not None:
        repo.store = throttle_store(repo.store, policy.throttle)
    return repo


def _open_store(cfg: Config):
    """The object store alone: what the health probe reads, without loading the index."""
    from drtool.repo.objectstore import open_store

    r = cfg.repository
    options = {k: v for k, v in (("sse", r.sse), ("sse_kms_key_id", r.sse_kms_key_id)) if v}
    return open_store(r.url, endpoint_url=r.endpoint_url or None, region=r.region or None, **options)


class RepositoryProbe:
    """The cheap periodic check behind /healthz: config.json readable, snapshots listed (each
    manifest fetched once: its key is its hash, so it never changes)."""

    def __init__(self, cfg: Config, policy: Policy, health: HealthState, metrics: Metrics):
        self.cfg, self.policy, self.health, self.metrics = cfg, policy, health, metrics
        self._store = None
        self._manifests: dict[str, tuple[str, str, str]] = {}  # id -> (time, status, node)
        self._lock = threading.Lock()

    def check(self, measure_size: bool = False) -> bool:
        with self._lock:
            try:
                snaps = self._snapshots()
                if measure_size and self._store is not None:
                    self.metrics.repository_size.set(sum(i.size for i in self._store.list("")))
            except Exception as exc:
                self.health.update(False, error=str(exc) or type(exc).__name__)
                self.metrics.repository_up.set(0)
                log.debug("repository check failed: %s", exc)
                return False
        mine = [s for s in snaps if s[2] == self.cfg.node.name]
        counts: dict[str, int] = {}
        for _t, status, _n in mine:
            counts[status] = counts.get(status, 0) + 1
        self.metrics.snapshot_counts(counts)
        usable = sorted((t, sid) for sid, (t, status, node) in self._manifests.items()
                        if node == self.cfg.node.name and status in ("complete", "fuzzy"))
        newest = None
        if usable:
            newest = (dt.datetime.fromisoformat(usable[-1][0]), usable[-1][1])
            self.metrics.last_snapshot.set(newest[0].timestamp())
        self.health.update(True, newest)
        self.metrics.repository_up.set(1)
        return True

    def _snapshots(self) -> list[tuple[str, str, str]]:
        if self.cfg.repository.url.startswith("restic:"):
            repo = open_repo(self.cfg, self.policy)
            self._manifests = {m.id: (m.doc["time"], m.status, m.node) for m in repo.snapshots()}
            return list(self._manifests.values())
        if self._store is None:
            self._store = _open_store(self.cfg)
        store = self._store
        try:
            store.get("config.json")
        except ObjectNotFound:
            raise DrtoolError(f"{store.url}: no drtool repository there (config.json missing)") from None
        listed = {info.key.rsplit("/", 1)[1]: info.key for info in store.list("snapshots/")}
        for sid in set(self._manifests) - set(listed):
            del self._manifests[sid]
        for sid, key in listed.items():
            if sid not in self._manifests:
                try:
                    doc = json.loads(store.get(key))
                except ObjectNotFound:
                    continue
                self._manifests[sid] = (doc["time"], doc.get("status", "complete"), doc.get("node", ""))
        return list(self._manifests.values())


# ---------------------------------------------------------------------------------------------
# Backup bytes per source
# ---------------------------------------------------------------------------------------------


class _MeteredRepo:
    """Delegates to a repository; its backup session notes the bytes each stored item (tree or
    stream) read, which the manifest then attributes to a source. Packs mix sources and are
    uploaded after the reads, so uploaded bytes are shared out in proportion to bytes read."""

    def __init__(self, repo: Repository):
        self._repo = repo
        self.items: list[tuple[str, int]] = []  # (tree or stream id, bytes read)
        self.session = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._repo, name)

    def begin_backup(self, *args: Any, **kwargs: Any):
        self.session = _MeteredSession(self._repo.begin_backup(*args, **kwargs), self.items)
        return self.session

    def per_source(self, manifest: Manifest, bytes_uploaded: int) -> dict[str, tuple[int, int]]:
        """source -> (bytes read, bytes uploaded)."""
        owner: dict[str, str] = {}
        for source, value in manifest.sources.items():
            refs = [value] + [v for v in value.get("items", {}).values() if isinstance(v, dict)]
            for ref in refs:
                for key in ("tree", "stream"):
                    if key in ref:
                        owner[ref[key]] = source
        read: dict[str, int] = {source: 0 for source in manifest.sources}
        for ref_id, nread in self.items:
            source = owner.get(ref_id, "other")
            read[source] = read.get(source, 0) + nread
        total = sum(read.values())
        return {source: (n, round(bytes_uploaded * n / total) if total else 0) for source, n in read.items()}


class _MeteredSession:
    def __init__(self, session: Any, items: list):
        self._s = session
        self._items = items

    def __getattr__(self, name: str) -> Any:
        return getattr(self._s, name)

    def _measure(self, key: str, call: Callable[[], dict]) -> dict:
        before = self._s.stats.bytes_read
        ref = call()
        self._items.append((ref.get(key, ""), self._s.stats.bytes_read - before))
        return ref

    def store_tree(self, spec, parent_ref, progress):
        return self._measure("tree", lambda: self._s.store_tree(spec, parent_ref, progress))

    def store_stream(self, name, pieces, progress, level=None):
        return self._measure("stream", lambda: self._s.store_stream(name, pieces, progress, level))


# ---------------------------------------------------------------------------------------------
# Rotating read-data verification
# ---------------------------------------------------------------------------------------------


def rotation_size(fraction: float) -> int:
    """t of n/t: how many scheduled verifies read every pack once."""
    if fraction <= 0:
        return 0
    return max(1, min(1 << 16, round(1 / fraction)))


def pack_subset(pack_key: str, t: int) -> int:
    """The subset (1..t) a pack belongs to, fixed by its name: it never moves between runs."""
    return int(pack_key.rsplit("/", 1)[-1][:8], 16) % t + 1


def next_subset(state_path: Path, t: int) -> int:
    try:
        doc = json.loads(state_path.read_text())
        if doc.get("t") == t and 1 <= int(doc.get("next", 1)) <= t:
            return int(doc["next"])
    except (OSError, ValueError, TypeError):
        pass
    return 1


def save_next_subset(state_path: Path, t: int, done: int) -> None:
    state_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = state_path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"t": t, "next": done % t + 1, "done": done,
                               "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}))
    os.replace(tmp, state_path)


def verify_subset(repo: Repository, snapshots: list[Manifest], n: int, t: int) -> tuple[list[Finding], dict]:
    """Layer 1 on `snapshots`, then read and hash every pack of subset n/t."""
    from drtool.repo.native import NativeRepository

    with Progress(f"verify subset {n}/{t}") as progress:
        findings = repo.check(snapshots, 0.0, progress)
        if not isinstance(repo, NativeRepository):  # another engine: its own sampling
            findings = repo.check(snapshots, 1 / t, progress)
            return findings, {"subset": f"{n}/{t}", "packs_read": None, "bytes_read": None}
        reported = {f.subject for f in findings}
        blobs_of = repo.index.blobs_of()
        to_read = sorted(k for k in blobs_of if pack_subset(k, t) == n and k not in reported)
        nbytes = 0
        bad_blobs: dict[str, str] = {}
        with ThreadPoolExecutor(3, thread_name_prefix="drtool-verify") as pool:
            checks = pool.map(lambda k: repo.check_pack(k, [b[0] for b in blobs_of[k]]), to_read)
            for key, problem, bad in checks:
                size = repo.index.pack_sizes.get(key, 0)
                nbytes += size
                progress.advance(files=1, nbytes=size)
                if problem:
                    findings.append(Finding(key, f"{problem} (read-data subset {n}/{t})"))
                    bad_blobs.update(dict.fromkeys(bad, key))
    if bad_blobs:  # name the snapshots and files the damage reaches
        seen: set[str] = set()
        for snap in snapshots:
            for blob_id, where in repo._walk_blobs(snap, []):
                if blob_id in bad_blobs and where not in seen:
                    seen.add(where)
                    findings.append(Finding(where, f"affected: pack {bad_blobs[blob_id]} is damaged"))
    return findings, {"subset": f"{n}/{t}", "packs_read": len(to_read), "bytes_read": nbytes}


# ---------------------------------------------------------------------------------------------
# Features written elsewhere, reached through small adapters
# ---------------------------------------------------------------------------------------------


def run_disk(cfg: Config, policy: Policy, repo_factory: Callable[[], Repository], metrics: Metrics) -> dict:
    from drtool.disk import enforce, report

    rep = report(cfg, policy)
    doc = rep.as_dict()
    if not doc.get("ok", True):
        log.warning("disk: a filesystem is critical: enforcing [disk] (%s)",
                    "; ".join(str(f.get("problem", f)) for f in doc.get("findings", [])))
        try:
            rep = enforce(cfg, policy, repo_factory)
        except DrtoolError as exc:  # still critical: the metrics must show the latest usage all the same
            rep = getattr(exc, "report", None) or report(cfg, policy)
            _disk_gauges(metrics, rep.as_dict())
            raise
        doc = rep.as_dict()
    _disk_gauges(metrics, doc)
    return {"ok": doc.get("ok", True), "findings": doc.get("findings", []), "actions": doc.get("actions", [])}


def _disk_gauges(metrics: Metrics, doc: dict) -> None:
    for p in doc.get("paths", []):
        if not isinstance(p, dict) or not p.get("path") or p.get("exists") is False:
            continue
        ratio = p.get("usage_ratio")
        if ratio is None and p.get("used_percent") is not None:
            ratio = float(p["used_percent"]) / 100
        if ratio is not None:
            metrics.disk_usage.labels(path=str(p["path"])).set(ratio)


def run_drill(cfg: Config, repo: Repository, snapshot: Manifest) -> dict:
    """The restore drill on `snapshot` (drtool.verify.drill): a dict with "ok", "findings" and
    "time_to_restore_seconds"."""
    from drtool.verify import drill

    started = time.monotonic()
    result = drill(cfg, repo, snapshot)
    seconds = time.monotonic() - started
    doc = result.as_dict() if hasattr(result, "as_dict") else dict(result or {})
    doc.setdefault("time_to_restore_seconds", doc.get("seconds", seconds))
    ok = getattr(result, "ok", doc.get("ok", True))
    if not ok:
        raise JobFailed(f"drill of snapshot {snapshot.id[:8]} failed: "
                        + "; ".join(str(f.get("problem", f) if isinstance(f, dict) else f)
                                    for f in doc.get("findings", [])[:3]), doc)
    return doc


# ---------------------------------------------------------------------------------------------
# The daemon
# ---------------------------------------------------------------------------------------------


class Daemon:
    def __init__(self, cfg: Config, policy: Policy, *, grace: float = GRACE_SECONDS,
                 health_interval: float = HEALTH_INTERVAL, notify_style: str = "auto", listen: str = "0.0.0.0"):
        self.cfg, self.policy = cfg, policy
        self.grace = grace
        self.health_interval = health_interval
        self.listen = listen
        self.metrics = Metrics()
        self.health = HealthState(policy.daemon.rpo)
        self.probe = RepositoryProbe(cfg, policy, self.health, self.metrics)
        self.notifier = Notifier(policy.notify, node=cfg.node.name, style=notify_style)
        self.stopping = threading.Event()
        self._repo_mutex = threading.Lock()
        self._running: dict[str, int] = {}  # job -> thread ident
        self._cancelled: set[str] = set()
        self._cond = threading.Condition()
        self.server: MetricsServer | None = None
        self.scheduler = None

    # -- the jobs -----------------------------------------------------------------------------
    def scheduled_jobs(self) -> dict[str, Any]:
        return {name: getattr(self.policy.schedule, name) for name in JOBS
                if getattr(self.policy.schedule, name) is not None}

    def _job_backup(self) -> dict:
        from drtool import snapshot

        repo = _MeteredRepo(open_repo(self.cfg, self.policy))
        result = snapshot.take(self.cfg, repo, tags=["scheduled"])
        for source, (nread, nup) in repo.per_source(result.manifest, result.stats.bytes_stored).items():
            self.metrics.backup_bytes(source, nread, nup)
        self.probe.check(measure_size=True)
        doc = result.as_dict()
        return {"snapshot": doc["snapshot"]["id"], "status": doc["snapshot"]["status"], "stats": doc["stats"]}

    def _job_verify(self) -> dict:
        repo = open_repo(self.cfg, self.policy)
        snaps = repo.snapshots()
        t = rotation_size(self.policy.verify.read_data_fraction)
        if t == 0:
            with Progress("verify") as progress:
                findings = repo.check(snaps, 0.0, progress)
            extra: dict[str, Any] = {"read_data": None}
        else:
            state = Path(self.cfg.node.state_dir) / ROTATION_FILE
            n = next_subset(state, t)
            findings, extra = verify_subset(repo, snaps, n, t)
            save_next_subset(state, t, n)
            log.info("read-data subset %d/%d: %s packs, %s bytes", n, t, extra["packs_read"], extra["bytes_read"])
        errors = [f for f in findings if f.severity == "error"]
        summary = {"snapshots": len(snaps), **extra, "findings": [f.as_dict() for f in findings[:50]],
                   "problems": len(errors)}
        if errors:
            raise JobFailed(f"{len(errors)} problems, first: {errors[0]}", summary)
        return summary

    def _job_prune(self) -> dict:
        from drtool import prune as prune_mod

        repo = open_repo(self.cfg, self.policy)
        result = prune_mod.prune(repo, self.policy.retention, lock_wait=self.cfg.repository.lock_wait_seconds)
        self.probe.check(measure_size=True)
        return {"forgotten": len(result.forgotten), "kept": len(result.decisions) - len(result.forgotten),
                "garbage": result.garbage}

    def _job_drill(self) -> dict:
        repo = open_repo(self.cfg, self.policy)
        mine = [s for s in repo.snapshots() if s.node == self.cfg.node.name]
        if not mine:
            raise JobSkipped("no snapshot of this node to drill")
        doc = run_drill(self.cfg, repo, mine[-1])
        self.metrics.drill_time.set(float(doc["time_to_restore_seconds"]))
        return doc

    def _job_disk(self) -> dict:
        return run_disk(self.cfg, self.policy, lambda: open_repo(self.cfg, self.policy), self.metrics)

    # -- running one job ------------------------------------------------------------------------
    def run_job(self, name: str) -> str:
        """Run job `name` once, whatever happens inside: returns success, failure or skipped."""
        _context.job = name
        with self._cond:
            self._running[name] = threading.get_ident()
        started = time.monotonic()
        run_id = self.notifier.new_run_id()
        result, summary = "failure", {}
        holds_mutex = False
        try:
            if self.stopping.is_set():
                raise JobSkipped("the daemon is stopping")
            if name in REPOSITORY_JOBS:
                while not self._repo_mutex.acquire(timeout=0.5):  # one repository job at a time
                    if self.stopping.is_set():
                        raise JobSkipped("the daemon is stopping")
                holds_mutex = True
            log.info("%s started", name)
            self.notifier.notify("start", name, {}, run_id)
            summary = getattr(self, f"_job_{name}")() or {}
            result = "success"
            log.info("%s succeeded in %.1fs", name, time.monotonic() - started)
        except JobSkipped as exc:
            result, summary = "skipped", {"reason": str(exc)}
            log.info("%s skipped: %s", name, exc)
        except JobCancelled:
            summary = {"error": "cancelled at shutdown"}
            log.warning("%s cancelled at shutdown after %.1fs; it left no snapshot or lock behind",
                        name, time.monotonic() - started)
        except JobFailed as exc:
            summary = {"error": str(exc), **exc.summary}
            log.error("%s failed: %s", name, exc)
        except DrtoolError as exc:
            summary = {"error": str(exc)}
            log.error("%s failed: %s", name, exc)
        except Exception as exc:  # a bug in a job: logged with its trace, the daemon goes on
            summary = {"error": f"{type(exc).__name__}: {exc}"}
            log.error("%s failed: unexpected %s: %s", name, type(exc).__name__, exc, exc_info=True)
        finally:
            if holds_mutex:
                self._repo_mutex.release()
            seconds = time.monotonic() - started
            try:
                self.metrics.job_finished(name, result, seconds)
                if result != "skipped":
                    self.notifier.notify("success" if result == "success" else "failure", name,
                                         {"result": result, "seconds": round(seconds, 3), **summary}, run_id)
                if result == "failure" and name in REPOSITORY_JOBS:
                    self.probe.check()
            except BaseException:  # a cancel arriving this late changes nothing
                log.debug("bookkeeping after %s interrupted", name, exc_info=True)
            with self._cond:
                self._running.pop(name, None)
                self._cond.notify_all()
            _context.job = None
        return result

    # -- scheduler events: a run that could not start is counted as skipped ----------------------
    def _on_event(self, event: Any) -> None:
        from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED

        if event.job_id.startswith("_"):
            return
        self.metrics.job_finished(event.job_id, "skipped", 0.0)
        why = "its previous run is still going" if event.code == EVENT_JOB_MAX_INSTANCES else "the run was missed"
        if event.code in (EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED):
            _context.job = event.job_id
            log.warning("%s: a scheduled run was skipped: %s", event.job_id, why)
            _context.job = None

    # -- start, run, stop ----------------------------------------------------------------------
    def start(self) -> None:
        from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED
        from apscheduler.executors.pool import ThreadPoolExecutor as APThreadPool
        from apscheduler.schedulers.background import BackgroundScheduler
        from apscheduler.triggers.interval import IntervalTrigger

        self._recover_quiesce()
        self._create_repository()
        self.probe.check(measure_size=True)
        if self.policy.daemon.metrics_port:
            self.server = MetricsServer(self.metrics, self.health, self.policy.daemon.metrics_port, self.listen).start()
        jobs = self.scheduled_jobs()
        self.scheduler = BackgroundScheduler(
            executors={"default": APThreadPool(len(jobs) + 2)}, timezone=dt.timezone.utc,
            job_defaults={"max_instances": 1, "coalesce": True, "misfire_grace_time": MISFIRE_GRACE})
        self.scheduler.add_listener(self._on_event, EVENT_JOB_MAX_INSTANCES | EVENT_JOB_MISSED)
        for name, schedule in jobs.items():
            self.metrics.declare_job(name)
            self.scheduler.add_job(self.run_job, schedule.trigger(), args=[name], id=name, name=name)
            log.info("%s scheduled: %s", name, schedule.text)
        self.scheduler.add_job(self.probe.check, IntervalTrigger(seconds=self.health_interval), id="_health",
                               name="_health")
        self.scheduler.start()
        if not jobs:
            log.warning("the policy %s schedules no job: only /metrics and /healthz are served", self.policy.source)

    def _create_repository(self) -> None:
        """Like `drtool backup`, the daemon's start creates the repository where none is. Jobs
        never do: a repository that vanishes later (an unmounted disk, a wrong bucket) must be
        reported, not silently replaced by an empty one."""
        try:
            open_repo(self.cfg, self.policy, create=True).close()
        except Exception as exc:
            log.error("repository %s is not usable yet: %s", secrets.redact(self.cfg.repository.url), exc)

    def _recover_quiesce(self) -> None:
        if self.cfg.node.quiesce != "stop":
            return
        from drtool.node import make_node_control

        try:
            message = make_node_control(self.cfg.node).recover_leftover_quiesce()
        except Exception as exc:
            log.error("could not check for a quiesce left by a previous run: %s", exc)
            return
        if message:
            log.warning("%s", message)

    def stop(self) -> None:
        """Stop taking jobs, give the running ones `grace` seconds, then cancel them."""
        self.stopping.set()
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
        deadline = time.monotonic() + self.grace
        with self._cond:
            if self._running:
                log.info("waiting up to %.0fs for %s to finish", self.grace, ", ".join(self._running))
            while self._running and time.monotonic() < deadline:
                self._cond.wait(min(1.0, max(0.0, deadline - time.monotonic())))
            late = dict(self._running)
        for name, ident in late.items():
            log.warning("%s still running after the %.0fs grace period: cancelling it", name, self.grace)
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(JobCancelled))
        deadline = time.monotonic() + CANCEL_WAIT
        with self._cond:
            while self._running and time.monotonic() < deadline:
                self._cond.wait(0.5)
            stuck = list(self._running)
        self.notifier.close(timeout=5.0)
        if self.server is not None:
            self.server.stop()
        if stuck:
            log.error("%s did not unwind within %.0fs; exiting anyway", ", ".join(stuck), CANCEL_WAIT)
            logging.shutdown()
            os._exit(0)  # a thread stuck in C cannot be joined; the lock expires by itself
        log.info("daemon stopped")

    def run_once(self) -> int:
        """Each scheduled job once, in order (for tests and cron-driven setups): 0 if none failed."""
        self._recover_quiesce()
        self._create_repository()
        results = {name: self.run_job(name) for name in self.scheduled_jobs()}
        self.probe.check()
        self.notifier.close(timeout=10.0)
        log.info("once: %s", ", ".join(f"{k} {v}" for k, v in results.items()) or "no job scheduled")
        return 1 if "failure" in results.values() else 0


def run_daemon(cfg: Config, policy: Policy, *, log_format: str = "text", once: bool = False,
               grace: float = GRACE_SECONDS, health_interval: float = HEALTH_INTERVAL,
               notify_style: str = "auto", listen: str = "0.0.0.0") -> int:
    """Run until SIGTERM/SIGINT (or, with once, run each scheduled job once). The exit code."""
    configure_logging(log_format)
    daemon = Daemon(cfg, policy, grace=grace, health_interval=health_interval, notify_style=notify_style,
                    listen=listen)
    if once:
        return daemon.run_once()
    stop = threading.Event()
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, lambda signum, frame: stop.set())
    try:
        daemon.start()
        log.info("daemon started (node %s, policy %s)", cfg.node.name, policy.source)
        while not stop.wait(1.0):
            pass
        log.info("signal received: stopping")
        daemon.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
