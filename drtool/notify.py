"""Webhooks on job start, success and failure ([notify] of a policy).

Each event POSTs a JSON summary (`{"event", "job", "node", "time", "summary"}`) to every URL
listed for it. Sending happens on one background thread with retries and exponential backoff,
so a slow or dead endpoint never blocks or fails a job.

Two URL styles:
- "plain": each URL is called as written, for the events it is listed under.
- "healthchecks" (healthchecks.io and compatible dead-man's switches): each URL is a check's
  ping URL; start pings `<url>/start`, failure `<url>/fail`, success `<url>` itself, all with
  the same `?rid=<run id>` so the service pairs start and end and measures the run. List the
  ping URL once (under any event); a trailing /start or /fail is ignored. "auto" (default) uses
  the healthchecks style for hc-ping.com URLs and plain for the rest.
In both styles `{job}` in a URL is replaced by the job name, which suits healthchecks.io's slug
URLs: `https://hc-ping.com/<ping-key>/drtool-{job}?create=1` gives each job its own check.

Webhook URLs often carry a token: they are registered as secrets, never logged (a URL is
named by its event and position), and bodies pass through secrets.redact.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Any

from drtool import __version__, secrets

log = logging.getLogger(__name__)

EVENTS = ("start", "success", "failure")
STYLES = ("auto", "plain", "healthchecks")
_HC_SUFFIX = {"start": "/start", "failure": "/fail", "success": ""}


@dataclass
class Delivery:
    url: str
    label: str  # how logs name it: "failure webhook 2"
    body: bytes
    attempt: int = 0


def _is_healthchecks(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    return host == "hc-ping.com" or host.startswith("hc-ping.") or host.endswith(".hc-ping.com")


def _ping_url(base: str, event: str, run_id: str) -> str:
    parts = urllib.parse.urlsplit(base)
    path = parts.path.rstrip("/")
    for suffix in ("/start", "/fail", "/log"):
        if path.endswith(suffix):
            path = path[: -len(suffix)]
    path += _HC_SUFFIX[event]
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    query = [(k, v) for k, v in query if k != "rid"] + [("rid", run_id)]
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, urllib.parse.urlencode(query), ""))


class Notifier:
    """Queues webhook deliveries and sends them from a background thread."""

    def __init__(self, notify_policy: Any, *, node: str = "", style: str = "auto", timeout: float = 10.0,
                 retries: int = 5, backoff: float = 2.0, max_backoff: float = 300.0):
        if style not in STYLES:
            raise ValueError(f"notify style {style!r}: one of {', '.join(STYLES)}")
        self.urls = {event: tuple(getattr(notify_policy, event, ()) or ()) for event in EVENTS}
        for urls in self.urls.values():
            for url in urls:
                secrets.register(url)
        self.node = node
        self.style = style
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._queue: queue.Queue[Delivery | None] = queue.Queue()
        self._retry_at: list[tuple[float, Delivery]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._idle = threading.Condition()
        self._pending = 0
        self.sent = 0
        self.failed = 0

    @property
    def enabled(self) -> bool:
        return any(self.urls.values())

    def _targets(self, event: str, job: str, run_id: str) -> list[tuple[str, str]]:
        """(url, label) pairs for one event."""
        out: list[tuple[str, str]] = []
        plain = [(u, f"{event} webhook {n}") for n, u in enumerate(self.urls[event], 1)
                 if not self._hc(u)]
        out.extend(plain)
        seen: set[str] = set()
        for ev in EVENTS:  # a healthchecks URL listed under any event serves every event
            for n, u in enumerate(self.urls[ev], 1):
                if self._hc(u):
                    base = _ping_url(u.replace("{job}", job), "success", "x")  # normalised, for dedup
                    if base not in seen:
                        seen.add(base)
                        out.append((_ping_url(u, event, run_id), f"{event} ping of {ev} URL {n}"))
        return [(url.replace("{job}", urllib.parse.quote(job)), label) for url, label in out]

    def _hc(self, url: str) -> bool:
        return self.style == "healthchecks" or (self.style == "auto" and _is_healthchecks(url))

    def notify(self, event: str, job: str, summary: dict[str, Any] | None = None, run_id: str | None = None) -> None:
        """Queue `event` for `job`; returns at once."""
        if event not in EVENTS:
            raise ValueError(f"unknown event {event!r}")
        targets = self._targets(event, job, run_id or uuid.uuid4().hex)
        if not targets:
            return
        doc = {"event": event, "job": job, "node": self.node, "tool": f"drtool {__version__}",
               "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "summary": summary or {}}
        body = secrets.redact(json.dumps(doc, default=str)).encode()
        self._ensure_thread()
        for url, label in targets:
            secrets.register(url)
            with self._idle:
                self._pending += 1
            self._queue.put(Delivery(url, label, body))

    def new_run_id(self) -> str:
        return str(uuid.uuid4())

    # -- the sender thread -----------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="drtool-notify", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            timeout = None
            if self._retry_at:
                timeout = max(0.0, min(t for t, _ in self._retry_at) - time.monotonic())
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = None
            else:
                if item is None:
                    if not self._retry_at:
                        return
                    continue
                self._send(item)
            now = time.monotonic()
            due = [d for t, d in self._retry_at if t <= now]
            self._retry_at = [(t, d) for t, d in self._retry_at if t > now]
            for d in due:
                self._send(d)

    def _send(self, d: Delivery) -> None:
        d.attempt += 1
        req = urllib.request.Request(d.url, data=d.body, method="POST",
                                     headers={"Content-Type": "application/json",
                                              "User-Agent": f"drtool/{__version__}"})
        problem = None
        retry = True
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                resp.read()
        except urllib.error.HTTPError as exc:
            problem = f"HTTP {exc.code}"
            retry = exc.code >= 500 or exc.code == 429  # a 4xx is our mistake: retrying won't help
        except (urllib.error.URLError, OSError) as exc:
            problem = type(getattr(exc, "reason", exc)).__name__
        if problem is None:
            self.sent += 1
            log.debug("%s delivered (attempt %d)", d.label, d.attempt)
            self._done()
            return
        if retry and d.attempt <= self.retries and not self._stop.is_set():
            delay = min(self.max_backoff, self.backoff * 2 ** (d.attempt - 1))
            log.warning("%s failed (%s); retry %d of %d in %.0fs", d.label, problem, d.attempt,
                        self.retries, delay)
            self._retry_at.append((time.monotonic() + delay, d))
            return
        self.failed += 1
        log.error("%s failed (%s) after %d attempts; given up", d.label, problem, d.attempt)
        self._done()

    def _done(self) -> None:
        with self._idle:
            self._pending -= 1
            self._idle.notify_all()

    def flush(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for queued deliveries (retries included). True if none is left."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._pending > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Give pending deliveries `timeout` seconds, then stop retrying."""
        if self._thread is None:
            return
        if not self.flush(timeout):
            log.warning("%d webhook deliveries still pending at shutdown: dropped", self._pending)
        self._stop.set()
        self._queue.put(None)
