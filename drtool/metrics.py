"""Prometheus metrics and the health endpoint of `drtool daemon`.

Metrics live in their own CollectorRegistry (not prometheus_client's global one), so tests and
several daemons in one process never collide. `MetricsServer` serves, on one port:
    /metrics   the Prometheus text format
    /healthz   200 {"healthy": true, ...} when the newest complete-or-fuzzy snapshot of this node
               is within the policy's RPO and the repository answered at the last check;
               503 {"healthy": false, "reason": ...} otherwise.
/healthz only reads `HealthState`, which a periodic job refreshes: a probe (Kubernetes, Docker,
a load balancer) can call it every second without touching the repository.
"""

from __future__ import annotations

import datetime as dt
import http.server
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from drtool import secrets

log = logging.getLogger(__name__)

RESULTS = ("success", "failure", "skipped")


class Metrics:
    """Every drtool metric, in a private registry."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.job_last_success = Gauge("drtool_job_last_success_timestamp_seconds",
                                      "Unix time of the job's last successful run.", ["job"], registry=r)
        self.job_last_duration = Gauge("drtool_job_last_duration_seconds",
                                       "Duration of the job's last run, successful or not.", ["job"], registry=r)
        self.job_runs = Counter("drtool_job_runs", "Job runs by result (success, failure, skipped).",
                                ["job", "result"], registry=r)
        self.source_bytes_read = Counter("drtool_source_bytes_read", "Bytes read from a source by backups.",
                                         ["source"], registry=r)
        self.source_bytes_uploaded = Counter("drtool_source_bytes_uploaded",
                                             "Bytes uploaded to the repository for a source (after "
                                             "deduplication and compression).", ["source"], registry=r)
        self.snapshots = Gauge("drtool_snapshots", "Snapshots of this node in the repository, by status.",
                               ["status"], registry=r)
        self.repository_size = Gauge("drtool_repository_size_bytes", "Bytes stored in the repository.",
                                     registry=r)
        self.disk_usage = Gauge("drtool_disk_usage_ratio", "Used share (0..1) of the filesystem of a watched path.",
                                ["path"], registry=r)
        self.drill_time = Gauge("drtool_drill_time_to_restore_seconds",
                                "Time the last restore drill took to rebuild the node in scratch space.", registry=r)
        self.last_snapshot = Gauge("drtool_last_snapshot_timestamp_seconds",
                                   "Unix time of this node's newest complete or fuzzy snapshot.", registry=r)
        self.repository_up = Gauge("drtool_repository_up", "1 when the repository answered at the last check.",
                                   registry=r)

    def declare_job(self, job: str) -> None:
        """Export a job's counters at 0 from the start, so rate() and alerts see the series."""
        for result in RESULTS:
            self.job_runs.labels(job=job, result=result)

    def job_finished(self, job: str, result: str, seconds: float, finished_at: float | None = None) -> None:
        if result not in RESULTS:
            raise ValueError(f"unknown result {result!r}")
        self.job_runs.labels(job=job, result=result).inc()
        if result == "skipped":
            return
        self.job_last_duration.labels(job=job).set(seconds)
        if result == "success":
            self.job_last_success.labels(job=job).set(finished_at or time.time())

    def backup_bytes(self, source: str, read: int, uploaded: int) -> None:
        self.source_bytes_read.labels(source=source).inc(max(0, read))
        self.source_bytes_uploaded.labels(source=source).inc(max(0, uploaded))

    def snapshot_counts(self, counts: dict[str, int]) -> None:
        for status in set(counts) | {"complete", "fuzzy"}:
            self.snapshots.labels(status=status).set(counts.get(status, 0))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


@dataclass
class HealthState:
    """The last repository check, as /healthz reports it."""

    rpo: dt.timedelta
    reachable: bool | None = None  # None: not checked yet
    error: str = ""
    newest: dt.datetime | None = None
    newest_id: str = ""
    checked_at: dt.datetime | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def update(self, reachable: bool, newest: tuple[dt.datetime, str] | None = None, error: str = "") -> None:
        with self.lock:
            self.reachable = reachable
            self.error = secrets.redact(error)
            if reachable:
                self.newest, self.newest_id = newest if newest else (None, "")
            self.checked_at = dt.datetime.now(dt.timezone.utc)

    def status(self, now: dt.datetime | None = None) -> tuple[bool, dict[str, Any]]:
        now = now or dt.datetime.now(dt.timezone.utc)
        with self.lock:
            doc: dict[str, Any] = {
                "repository_reachable": self.reachable,
                "checked_at": self.checked_at.isoformat(timespec="seconds") if self.checked_at else None,
                "rpo_seconds": int(self.rpo.total_seconds()),
                "newest_snapshot": self.newest_id[:8] or None,
                "newest_snapshot_time": self.newest.isoformat(timespec="seconds") if self.newest else None,
            }
            if self.newest:
                doc["newest_snapshot_age_seconds"] = int((now - self.newest).total_seconds())
            if self.reachable is None:
                reason = "repository not checked yet"
            elif not self.reachable:
                reason = f"repository unreachable at the last check: {self.error}"
            elif self.newest is None:
                reason = "no complete or fuzzy snapshot of this node"
            elif now - self.newest > self.rpo:
                reason = (f"newest snapshot {self.newest_id[:8]} is {_age(now - self.newest)} old, "
                          f"beyond the RPO of {_age(self.rpo)}")
            else:
                reason = ""
        healthy = not reason
        doc = {"healthy": healthy, **({"reason": reason} if reason else {}), **doc}
        return healthy, doc


def _age(delta: dt.timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}" if seconds % size == 0 else f"{seconds / size:.1f}{unit}"
    return f"{seconds}s"


class MetricsServer:
    """/metrics and /healthz on a port, served from a background thread."""

    def __init__(self, metrics: Metrics, health: HealthState, port: int, host: str = "0.0.0.0"):
        self.metrics = metrics
        self.health = health
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._reply(200, server.metrics.exposition(), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    healthy, doc = server.health.status()
                    self._reply(200 if healthy else 503, json.dumps(doc).encode(), "application/json")
                else:
                    self._reply(404, b"not found: try /metrics or /healthz\n", "text/plain")

            def _reply(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args: Any) -> None:  # scrapes are not news
                log.debug("http: " + fmt, *args)

        try:
            self.httpd = http.server.ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            from drtool.errors import ConfigError

            raise ConfigError(f"[daemon] metrics_port: cannot listen on {host}:{port}: {exc.strerror}") from None
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="drtool-metrics", daemon=True)

    def start(self) -> "MetricsServer":
        self._thread.start()
        log.info("metrics on :%d/metrics, health on :%d/healthz", self.port, self.port)
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
