"""Repository locks: put-if-absent objects `locks/<id>` with an owner and an expiry.

Backups share, prune is exclusive. A lock is refreshed while its holder runs; one whose
expiry passed, or whose process is gone from this host, is stale: reported with its owner
and age, and removed only on request (--break-lock).
"""

from __future__ import annotations

import json
import os
import random
import secrets as pysecrets
import socket
import threading
import time
from dataclasses import dataclass

from drtool.errors import LockError
from drtool.repo.objectstore import ObjectStore

LOCK_TTL = 30 * 60  # seconds a lock stays valid without a refresh
REFRESH_EVERY = 5 * 60


@dataclass
class LockInfo:
    key: str
    host: str
    pid: int
    command: str
    exclusive: bool
    time: float
    expires: float

    @property
    def owner(self) -> str:
        return f"{self.command} pid {self.pid} on {self.host}"

    def stale(self, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        if self.expires < now:
            return True
        if self.host == socket.gethostname():
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                pass
        return False

    def describe(self, now: float | None = None) -> str:
        age = int((time.time() if now is None else now) - self.time)
        kind = "exclusive" if self.exclusive else "shared"
        return f"{self.key} ({kind}, {self.owner}, {age}s old{', stale' if self.stale(now) else ''})"


def list_locks(store: ObjectStore) -> list[LockInfo]:
    out = []
    for info in store.list("locks/"):
        try:
            doc = json.loads(store.get(info.key))
            out.append(LockInfo(key=info.key, host=doc["host"], pid=doc["pid"], command=doc["command"],
                                exclusive=doc["exclusive"], time=doc["time"], expires=doc["expires"]))
        except Exception:  # vanished or unreadable: a lock we cannot read is treated as stale
            out.append(LockInfo(info.key, "?", 0, "?", False, info.mtime, 0))
    return out


class RepositoryLock:
    def __init__(self, store: ObjectStore, command: str, exclusive: bool):
        self.store = store
        self.command = command
        self.exclusive = exclusive
        self.key = f"locks/{pysecrets.token_hex(16)}"
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _doc(self) -> bytes:
        now = time.time()
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "command": self.command,
                           "exclusive": self.exclusive, "time": self.started,
                           "expires": now + LOCK_TTL}).encode()

    def acquire(self, break_stale: bool = False, wait: float = 0.0) -> "RepositoryLock":
        """Take the lock, waiting up to `wait` seconds for conflicting holders to finish."""
        deadline = time.monotonic() + wait
        while True:
            try:
                self._check_others(break_stale)
                self.store.put_if_absent(self.key, self._doc())
                try:
                    # Two runs may have checked at the same moment: look again now ours is visible.
                    self._check_others(break_stale)
                except LockError:
                    self.store.delete(self.key)
                    raise
                break
            except LockError as exc:
                if time.monotonic() >= deadline or "stale" in str(exc):
                    raise
                time.sleep(random.uniform(0.2, 2.0))  # jitter: two waiters do not collide forever
        self._thread = threading.Thread(target=self._refresh, name="drtool-lock", daemon=True)
        self._thread.start()
        return self

    def _check_others(self, break_stale: bool) -> None:
        for other in list_locks(self.store):
            if other.key == self.key:
                continue
            if not (self.exclusive or other.exclusive):
                continue
            if other.stale():
                if break_stale:
                    self.store.delete(other.key)
                    continue
                raise LockError(f"repository is locked by a stale lock {other.describe()}; "
                                "remove it with --break-lock")
            raise LockError(f"repository is locked: {other.describe()}")

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH_EVERY):
            try:
                self.store.put(self.key, self._doc())
            except Exception:  # the next refresh tries again; expiry covers a long outage
                pass

    def release(self) -> None:
        self._stop.set()
        try:
            self.store.delete(self.key)
        except Exception:
            pass
