"""`drtool prune`: apply the retention policy, forget snapshots, collect garbage.

Each node's snapshots are judged on their own (a repository may hold several nodes). The
exclusive repository lock keeps backups out while objects are deleted; a stale lock is
reported with its owner and age and broken only with --break-lock.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
from dataclasses import dataclass, field
from typing import Any

from drtool import retention
from drtool.progress import Progress
from drtool.repo.base import Manifest, Repository

log = logging.getLogger(__name__)


@dataclass
class PruneResult:
    decisions: list[retention.Decision]
    dry_run: bool
    policy: str
    garbage: dict[str, int] = field(default_factory=dict)

    @property
    def forgotten(self) -> list[Manifest]:
        return [d.snapshot for d in self.decisions if not d.keep]

    def as_dict(self) -> dict[str, Any]:
        return {"ok": True, "dry_run": self.dry_run, "policy": self.policy,
                "snapshots": [{"id": d.snapshot.id, "time": d.snapshot.doc["time"], "node": d.snapshot.node,
                               "tags": d.snapshot.tags, "status": d.snapshot.status,
                               "keep": d.keep, "reasons": list(d.reasons)} for d in self.decisions],
                "forgotten": len(self.forgotten), "garbage": self.garbage, "findings": []}


def decide(snapshots: list[Manifest], policy: retention.RetentionPolicy, now: dt.datetime) -> list[retention.Decision]:
    """Retention per node, newest first within each node."""
    out = []
    by_node = lambda m: m.node  # noqa: E731
    for _node, snaps in itertools.groupby(sorted(snapshots, key=by_node), key=by_node):
        out.extend(retention.decide(list(snaps), policy, now))
    return out


def prune(repo: Repository, policy: retention.RetentionPolicy, *, dry_run: bool = False,
          break_lock: bool = False, lock_wait: float = 0.0, now: dt.datetime | None = None) -> PruneResult:
    now = now or dt.datetime.now(dt.timezone.utc)
    if dry_run:
        return PruneResult(decide(repo.snapshots(), policy, now), True, policy.describe())
    lock = repo.lock("prune", exclusive=True, break_stale=break_lock, wait=lock_wait)
    try:
        decisions = decide(repo.snapshots(), policy, now)
        result = PruneResult(decisions, False, policy.describe())
        if result.forgotten:
            log.info("forgetting %d snapshots", len(result.forgotten))
            repo.forget(result.forgotten)
        with Progress("prune: collect garbage") as progress:
            result.garbage = repo.collect_garbage(progress)
        return result
    finally:
        lock.release()
