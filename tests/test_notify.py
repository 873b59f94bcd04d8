"""Webhooks against a real local HTTP server: payloads, retries, healthchecks.io-style URLs."""

from __future__ import annotations

import http.server
import json
import threading
import time
from dataclasses import dataclass

import pytest

from drtool.notify import Notifier


@dataclass
class Hooks:
    start: tuple = ()
    success: tuple = ()
    failure: tuple = ()


class Receiver:
    """A local HTTP server recording every request; `plan` says which status to answer."""

    def __init__(self, statuses=(), delay: float = 0.0):
        self.requests: list[tuple[str, dict]] = []
        self.statuses = list(statuses)
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                time.sleep(delay)
                receiver.requests.append((self.path, json.loads(body)))
                code = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(code)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"OK")

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def receiver():
    made = []

    def make(*args, **kw):
        made.append(Receiver(*args, **kw))
        return made[-1]

    yield make
    for r in made:
        r.close()


def test_posts_a_json_summary_and_retries_on_500(receiver):
    r = receiver(statuses=[500, 503])
    n = Notifier(Hooks(failure=(r.url + "/hook",)), node="node-1", backoff=0.05)
    n.notify("failure", "backup", {"error": "disk full", "dsn": "postgresql://teranode:s3cretpw@db/teranode"})
    assert n.flush(10)
    assert len(r.requests) == 3 and n.sent == 1 and n.failed == 0
    path, doc = r.requests[-1]
    assert path == "/hook"
    assert doc["event"] == "failure" and doc["job"] == "backup" and doc["node"] == "node-1"
    assert doc["summary"]["error"] == "disk full"
    assert "s3cretpw" not in json.dumps(doc)


def test_a_4xx_is_not_retried_and_only_listed_events_are_sent(receiver):
    r = receiver(statuses=[404])
    n = Notifier(Hooks(success=(r.url + "/ok",)), backoff=0.05)
    n.notify("start", "prune")  # no start URL: nothing
    n.notify("success", "prune", {"forgotten": 2})
    assert n.flush(10)
    assert [p for p, _ in r.requests] == ["/ok"] and n.failed == 1


def test_gives_up_after_the_retries(receiver):
    r = receiver(statuses=[500] * 10)
    n = Notifier(Hooks(failure=(r.url,)), retries=2, backoff=0.02)
    n.notify("failure", "verify")
    assert n.flush(10)
    assert len(r.requests) == 3 and n.failed == 1


def test_never_blocks_the_caller(receiver):
    r = receiver(delay=1.5)
    n = Notifier(Hooks(start=(r.url,)))
    t0 = time.monotonic()
    n.notify("start", "backup")
    assert time.monotonic() - t0 < 0.5
    assert n.flush(10) and len(r.requests) == 1


def test_healthchecks_style_start_success_fail_with_one_run_id(receiver):
    r = receiver()
    base = r.url + "/ping/0a1b2c3d"
    n = Notifier(Hooks(success=(base,), failure=(base + "/fail",)), style="healthchecks", backoff=0.05)
    run = n.new_run_id()
    n.notify("start", "backup", run_id=run)
    n.notify("failure", "backup", {"error": "x"}, run_id=run)
    n.notify("success", "backup", run_id="other")
    assert n.flush(10)
    paths = sorted(p for p, _ in r.requests)
    assert paths == sorted([f"/ping/0a1b2c3d/start?rid={run}", f"/ping/0a1b2c3d/fail?rid={run}",
                            "/ping/0a1b2c3d?rid=other"])


def test_job_placeholder_in_slug_urls(receiver):
    r = receiver()
    n = Notifier(Hooks(start=(r.url + "/key/drtool-{job}?create=1",)), style="healthchecks")
    n.notify("start", "verify", run_id="r1")
    assert n.flush(10)
    assert r.requests[0][0] == "/key/drtool-verify/start?create=1&rid=r1"
