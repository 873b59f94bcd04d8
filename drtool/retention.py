"""Retention: which snapshots to keep and which to forget, and why.

`decide(snapshots, policy, now)` is a pure function. It reads nothing, writes nothing and
deletes nothing; `drtool prune` acts on what it returns.

The count and time rules follow restic's `forget --keep-*` (internal/restic/snapshot_policy.go,
restic 0.17 and later):

- Snapshots are walked newest to oldest (ties broken by id, so the answer never depends on the
  order the caller listed them in).
- `keep_last`, `keep_hourly`, `keep_daily`, `keep_weekly` (ISO week), `keep_monthly` and
  `keep_yearly` each own a bucket function (the snapshot's own position for `last`; its hour, day,
  ISO week, month or year in UTC for the others) and a count. A snapshot whose bucket value differs
  from the previous one seen by that rule is the newest of a new bucket: the rule keeps it and
  counts down. A rule whose count has run out keeps nothing more.
- `-1` means unlimited: the newest snapshot of every bucket is kept.
- When a rule still has counts left on reaching the oldest snapshot, the oldest snapshot is kept
  too (reason prefixed "oldest"), as restic does since 0.17: a young repository keeps its full
  history until the counts are used up.
- `keep_within` keeps every snapshot strictly newer than (newest snapshot time - duration).
  Like restic, the reference is the NEWEST SNAPSHOT, not `now`: if backups stop for longer than
  the window, nothing ages out of it while no new snapshot exists, so a broken backup job cannot
  let the retention policy eat the history an operator needs to recover. `now` is used as restic
  uses its clock: snapshots dated at or after `now` (clock skew) are not taken as the reference. Using
  the newest snapshot also makes the result idempotent (pruning twice forgets nothing more).
- A snapshot is kept if any rule keeps it; its reasons list every rule that did.
- An empty policy (no count, no window, no tag rule) keeps everything, with the reason
  "policy is empty (keep all)". restic refuses an empty policy; we prefer keeping to refusing,
  because the daemon runs prune unattended and "keep all" is the safe reading.

Per-tag rules (`tags = {"pre-update": 3}`) are drtool's own: among snapshots carrying the tag,
the newest N are kept (N below 1 counts as 1, so the latest tagged snapshot is never forgotten by
its own rule; -1 keeps all of them). They ADD to the general rules rather than splitting the list
into groups the way restic's `--group-by tags` would: every snapshot, tagged or not, is also
walked by the general rules. A pre-update snapshot is a full restore point of the node, so it may
well be the day's or month's representative; grouping would instead forget an old tagged snapshot
even when it is the only one left for its month. Union only ever keeps more, and stays idempotent.

Invariants applied after the rules, whatever the policy says:
- the newest snapshot with status "complete" is kept ("newest complete"); when there is no
  complete snapshot at all (a node that only takes hot, "fuzzy" backups), the newest "fuzzy" one
  is kept instead ("newest fuzzy (no complete snapshot)"), so a restorable snapshot always remains;
- a snapshot listed in `running_parents` (the parent of a backup still running, which references
  its objects) is kept ("parent of running backup").

Snapshot times must be timezone-aware; buckets are computed in UTC.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, NamedTuple, Sequence

log = logging.getLogger(__name__)

UNLIMITED = -1

# Order matters only for the order reasons are listed in (restic's order).
COUNT_RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")


@dataclass(frozen=True)
class RetentionPolicy:
    """How many snapshots of each kind to keep. 0 = rule off, -1 = unlimited."""

    keep_last: int = 0
    keep_hourly: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0
    keep_yearly: int = 0
    keep_within: dt.timedelta | None = None
    tags: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for rule in COUNT_RULES:
            count = getattr(self, f"keep_{rule}")
            if isinstance(count, bool) or not isinstance(count, int) or count < UNLIMITED:
                raise ValueError(f"keep_{rule} must be an integer >= -1, got {count!r}")
        if self.keep_within is not None and self.keep_within < dt.timedelta(0):
            raise ValueError(f"keep_within must not be negative, got {self.keep_within}")
        for tag, count in self.tags.items():
            if isinstance(count, bool) or not isinstance(count, int) or count < UNLIMITED:
                raise ValueError(f"tag rule {tag!r} must be an integer >= -1, got {count!r}")

    def count(self, rule: str) -> int:
        return getattr(self, f"keep_{rule}")

    def is_empty(self) -> bool:
        return (
            all(self.count(rule) == 0 for rule in COUNT_RULES)
            and not self.keep_within
            and not self.tags
        )

    def describe(self) -> str:
        """One line for logs and `prune` output, e.g. 'keep last 3, daily 7, within 2d'."""
        if self.is_empty():
            return "empty policy: keep all"
        parts = []
        for rule in COUNT_RULES:
            count = self.count(rule)
            if count:
                parts.append(f"{rule} {'all' if count == UNLIMITED else count}")
        if self.keep_within:
            parts.append(f"within {format_timedelta(self.keep_within)}")
        for tag, count in sorted(self.tags.items()):
            parts.append(f"tag {tag} {_tag_count_text(count)}")
        return "keep " + ", ".join(parts)


class Decision(NamedTuple):
    """The verdict on one snapshot: keep or forget, and every reason it was kept."""

    snapshot: Any
    keep: bool
    reasons: list[str]


def format_timedelta(delta: dt.timedelta) -> str:
    """Compact form of a duration: 7d, 1d12h, 30m, 45s (the form parse_duration reads)."""
    total = int(delta.total_seconds())
    if total == 0:
        return "0s"
    parts = []
    for unit, seconds in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        amount, total = divmod(total, seconds)
        if amount:
            parts.append(f"{amount}{unit}")
    return "".join(parts)


def _tag_count_text(count: int) -> str:
    return "all" if count == UNLIMITED else f"last {max(1, count)}"


# Bucket functions: two snapshots fall into the same bucket iff these return the same label.
# Labels are also what the reason shows ("daily 2026-11-20"). Each label sorts like its time
# does, which the idempotence argument relies on.
def _hour(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H")


def _day(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%d")


def _iso_week(t: dt.datetime) -> str:
    year, week, _ = t.isocalendar()
    return f"{year}-W{week:02d}"


def _month(t: dt.datetime) -> str:
    return t.strftime("%Y-%m")


def _year(t: dt.datetime) -> str:
    return t.strftime("%Y")


_BUCKETS: dict[str, Callable[[dt.datetime], str]] = {
    "hourly": _hour,
    "daily": _day,
    "weekly": _iso_week,
    "monthly": _month,
    "yearly": _year,
}


def _utc_time(snapshot: Any) -> dt.datetime:
    t = snapshot.time
    if t.tzinfo is None or t.utcoffset() is None:
        raise ValueError(f"snapshot {snapshot.id}: time {t.isoformat()} has no timezone")
    return t.astimezone(dt.timezone.utc)


def decide(
    snapshots: Iterable[Any],
    policy: RetentionPolicy,
    now: dt.datetime,
    running_parents: Iterable[str] = (),
) -> list[Decision]:
    """Decide keep/forget for every snapshot, newest first.

    A snapshot is any object with `.id`, `.time` (aware datetime), `.tags`, `.status` and
    `.parent`. `running_parents` holds the ids of snapshots that a backup in progress uses as its
    parent. `now` must be aware; it only screens out future-dated snapshots (see module doc).
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    now = now.astimezone(dt.timezone.utc)
    # Newest first; ties by id, descending, so equal times still give one fixed order.
    ordered: Sequence[Any] = sorted(snapshots, key=lambda s: (_utc_time(s), str(s.id)), reverse=True)
    reasons: dict[int, list[str]] = {i: [] for i in range(len(ordered))}

    if policy.is_empty():
        for i in reasons:
            reasons[i].append("policy is empty (keep all)")
    elif ordered:
        _apply_count_rules(ordered, policy, reasons)
        _apply_within(ordered, policy, now, reasons)
        _apply_tag_rules(ordered, policy, reasons)

    _apply_invariants(ordered, set(running_parents), reasons)

    decisions = [Decision(snap, bool(reasons[i]), reasons[i]) for i, snap in enumerate(ordered)]
    log.debug(
        "retention %s: keep %d of %d",
        policy.describe(),
        sum(d.keep for d in decisions),
        len(decisions),
    )
    return decisions


def _apply_count_rules(ordered: Sequence[Any], policy: RetentionPolicy, reasons: dict[int, list[str]]) -> None:
    oldest = len(ordered) - 1
    for rule in COUNT_RULES:
        remaining = policy.count(rule)
        if remaining == 0:
            continue
        label_of = _BUCKETS.get(rule)
        previous: str | None = None
        for i, snap in enumerate(ordered):
            if remaining == 0:
                break
            if label_of is None:  # keep_last: every snapshot is a bucket of its own
                label, same_bucket = "", False
                text = f"last {'(all)' if policy.keep_last == UNLIMITED else policy.keep_last}"
            else:
                label = label_of(_utc_time(snap))
                same_bucket = label == previous
                text = f"{rule} {label}"
            if same_bucket and i != oldest:
                continue
            # restic 0.17+: the oldest snapshot is kept while the rule has counts left, even when
            # it shares a bucket with a newer kept one; the reason then says "oldest".
            reasons[i].append(f"oldest {text}" if same_bucket else text)
            previous = label
            if remaining > 0:
                remaining -= 1


def _apply_within(
    ordered: Sequence[Any], policy: RetentionPolicy, now: dt.datetime, reasons: dict[int, list[str]]
) -> None:
    if not policy.keep_within:
        return
    # The newest snapshot dated before `now` (restic: Before(now)); with none, `now`, which then
    # keeps them all (they are all in the future), as restic does.
    reference = next((t for t in map(_utc_time, ordered) if t < now), now)
    cutoff = reference - policy.keep_within
    text = f"within {format_timedelta(policy.keep_within)}"
    for i, snap in enumerate(ordered):
        if _utc_time(snap) > cutoff:
            reasons[i].append(text)


def _apply_tag_rules(ordered: Sequence[Any], policy: RetentionPolicy, reasons: dict[int, list[str]]) -> None:
    for tag, count in policy.tags.items():
        remaining = UNLIMITED if count == UNLIMITED else max(1, count)
        text = f"tag {tag} ({_tag_count_text(count)})"
        for i, snap in enumerate(ordered):
            if remaining == 0:
                break
            if tag in (snap.tags or ()):
                reasons[i].append(text)
                if remaining > 0:
                    remaining -= 1


def _apply_invariants(ordered: Sequence[Any], running_parents: set[str], reasons: dict[int, list[str]]) -> None:
    newest_complete = next((i for i, s in enumerate(ordered) if s.status == "complete"), None)
    if newest_complete is not None:
        reasons[newest_complete].append("newest complete")
    else:
        newest_fuzzy = next((i for i, s in enumerate(ordered) if s.status == "fuzzy"), None)
        if newest_fuzzy is not None:
            reasons[newest_fuzzy].append("newest fuzzy (no complete snapshot)")
    for i, snap in enumerate(ordered):
        if snap.id in running_parents:
            reasons[i].append("parent of running backup")
