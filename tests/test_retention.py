"""Retention as a pure function over snapshot lists, with fixed clocks."""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drtool.retention import Decision, RetentionPolicy, decide, format_timedelta

UTC = dt.timezone.utc
NOW = dt.datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Snap:
    id: str
    time: dt.datetime
    tags: list = field(default_factory=list)
    status: str = "complete"
    parent: str | None = None


def at(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=UTC)


def snaps(*times: str, **overrides) -> list[Snap]:
    """Snapshots named s0, s1, ... in the order given."""
    return [Snap(f"s{i}", at(t), **overrides) for i, t in enumerate(times)]


def kept(decisions: list[Decision]) -> list[str]:
    return [d.snapshot.id for d in decisions if d.keep]


def reasons_of(decisions: list[Decision]) -> dict[str, list[str]]:
    return {d.snapshot.id: d.reasons for d in decisions}


# --------------------------------------------------------------------------------------------
# Table-driven: one row per rule and combination. Snapshots are all "fuzzy" except where a
# case is about statuses, so the "newest complete" invariant does not mask what a rule does.
# --------------------------------------------------------------------------------------------

HOURS = ["2026-11-20 10:50", "2026-11-20 10:10", "2026-11-20 09:59", "2026-11-20 09:00", "2026-11-20 07:30"]
DAYS = ["2026-11-22 23:00", "2026-11-22 01:00", "2026-11-21 12:00", "2026-11-20 12:00", "2026-11-18 08:00"]
# 2026 has 53 ISO weeks: Dec 31 2026 and Jan 1 2027 both fall in 2026-W53; Nov 22 (Sun) and
# Nov 23 (Mon) fall in different weeks.
WEEKS = ["2027-01-01 10:00", "2026-12-31 10:00", "2026-11-23 10:00", "2026-11-22 10:00", "2026-11-16 10:00"]
MONTHS = ["2026-11-02 00:00", "2026-10-31 23:59", "2026-10-01 00:00", "2026-08-15 00:00", "2026-08-01 00:00"]
YEARS = ["2027-01-01 00:00", "2026-12-31 23:59", "2026-06-01 00:00", "2024-02-29 00:00", "2024-01-01 00:00"]

CASES = [
    # name, times, policy, expected kept ids, expected reasons (subset check) per id
    ("last 3", DAYS, RetentionPolicy(keep_last=3), ["s0", "s1", "s2"], {"s0": ["last 3"]}),
    ("last beyond count keeps all", DAYS[:2], RetentionPolicy(keep_last=5), ["s0", "s1"], {"s1": ["last 5"]}),
    ("last unlimited", DAYS, RetentionPolicy(keep_last=-1), ["s0", "s1", "s2", "s3", "s4"], {"s4": ["last (all)"]}),
    ("hourly keeps newest of each hour", HOURS, RetentionPolicy(keep_hourly=2), ["s0", "s2"],
     {"s0": ["hourly 2026-11-20T10"], "s2": ["hourly 2026-11-20T09"]}),
    ("daily 2", DAYS, RetentionPolicy(keep_daily=2), ["s0", "s2"],
     {"s0": ["daily 2026-11-22"], "s2": ["daily 2026-11-21"]}),
    ("daily 3 counts days with a snapshot, not calendar days", DAYS, RetentionPolicy(keep_daily=3),
     ["s0", "s2", "s3"], {"s3": ["daily 2026-11-20"]}),
    ("weekly is ISO week (year boundary, Sunday/Monday)", WEEKS, RetentionPolicy(keep_weekly=3),
     ["s0", "s2", "s3"], {"s0": ["weekly 2026-W53"], "s2": ["weekly 2026-W48"], "s3": ["weekly 2026-W47"]}),
    ("monthly 2", MONTHS, RetentionPolicy(keep_monthly=2), ["s0", "s1"],
     {"s0": ["monthly 2026-11"], "s1": ["monthly 2026-10"]}),
    ("yearly 2", YEARS, RetentionPolicy(keep_yearly=2), ["s0", "s1"],
     {"s0": ["yearly 2027"], "s1": ["yearly 2026"]}),
    ("yearly unlimited keeps newest per year and the oldest", YEARS, RetentionPolicy(keep_yearly=-1),
     ["s0", "s1", "s3", "s4"], {"s3": ["yearly 2024"], "s4": ["oldest yearly 2024"]}),
    # restic >= 0.17: counts left on reaching the oldest snapshot keep it too.
    ("oldest kept while counts remain", MONTHS, RetentionPolicy(keep_monthly=10),
     ["s0", "s1", "s3", "s4"], {"s4": ["oldest monthly 2026-08"]}),
    ("oldest in a new bucket is an ordinary keep", DAYS, RetentionPolicy(keep_daily=4),
     ["s0", "s2", "s3", "s4"], {"s4": ["daily 2026-11-18"]}),
    ("no oldest once counts are used", MONTHS, RetentionPolicy(keep_monthly=3), ["s0", "s1", "s3"], {}),
    # keep_within is relative to the newest snapshot (22nd 23:00), not to NOW (27th):
    # cutoff 2026-11-20 23:00, strictly newer kept.
    ("within 2d relative to newest snapshot", DAYS, RetentionPolicy(keep_within=dt.timedelta(days=2)),
     ["s0", "s1", "s2"], {"s0": ["within 2d"]}),
    ("within boundary is exclusive", ["2026-11-22 12:00", "2026-11-21 12:00", "2026-11-21 11:59"],
     RetentionPolicy(keep_within=dt.timedelta(hours=24)), ["s0"], {"s0": ["within 1d"]}),
    ("within with hours", HOURS, RetentionPolicy(keep_within=dt.timedelta(hours=1, minutes=30)),
     ["s0", "s1", "s2"], {"s2": ["within 1h30m"]}),
    ("daily + weekly share snapshots", DAYS + ["2026-11-09 10:00"],
     RetentionPolicy(keep_daily=2, keep_weekly=3), ["s0", "s2", "s5"],
     {"s0": ["daily 2026-11-22", "weekly 2026-W47"], "s5": ["weekly 2026-W46"]}),
    ("last + hourly + within", HOURS, RetentionPolicy(keep_last=1, keep_hourly=1,
                                                       keep_within=dt.timedelta(minutes=45)),
     ["s0", "s1"], {"s0": ["last 1", "hourly 2026-11-20T10", "within 45m"], "s1": ["within 45m"]}),
]


@pytest.mark.parametrize("times,policy,want,want_reasons", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_rules(times, policy, want, want_reasons):
    decisions = decide(snaps(*times, status="fuzzy"), policy, NOW)
    # With every snapshot fuzzy, the newest fuzzy one is also protected: that's s0 in every row.
    assert sorted(kept(decisions)) == sorted(set(want) | {"s0"})
    got = reasons_of(decisions)
    for sid, expected in want_reasons.items():
        for reason in expected:
            assert reason in got[sid], (sid, got[sid])
    for d in decisions:
        assert d.keep == bool(d.reasons)


def test_decisions_newest_first_and_independent_of_input_order():
    items = snaps(*DAYS)
    shuffled = items[:]
    random.Random(7).shuffle(shuffled)
    a = decide(items, RetentionPolicy(keep_daily=2), NOW)
    b = decide(shuffled, RetentionPolicy(keep_daily=2), NOW)
    assert [d.snapshot.id for d in a] == ["s0", "s1", "s2", "s3", "s4"]
    assert a == b


def test_equal_times_order_by_id():
    items = [Snap("a", at("2026-11-20 10:00")), Snap("b", at("2026-11-20 10:00")), Snap("c", at("2026-11-19 10:00"))]
    assert kept(decide(items, RetentionPolicy(keep_last=1), NOW)) == ["b"]
    assert kept(decide(items, RetentionPolicy(keep_daily=2), NOW)) == ["b", "c"]


def test_within_ignores_future_snapshots_as_reference():
    # A snapshot dated after `now` (clock skew) is not the reference; restic does the same.
    items = snaps("2026-12-30 00:00", "2026-11-27 10:00", "2026-11-26 12:00", "2026-11-20 00:00", status="fuzzy")
    decisions = decide(items, RetentionPolicy(keep_within=dt.timedelta(days=1)), NOW)
    # reference 2026-11-27 10:00: cutoff 11-26 10:00
    assert kept(decisions) == ["s0", "s1", "s2"]
    assert "within 1d" in reasons_of(decisions)["s0"]  # the future one is newer than the cutoff


def test_within_does_not_age_out_when_backups_stop():
    items = snaps("2026-10-01 00:00", "2026-09-30 12:00", "2026-09-20 00:00", status="fuzzy")
    late = dt.datetime(2027, 6, 1, tzinfo=UTC)
    assert kept(decide(items, RetentionPolicy(keep_within=dt.timedelta(days=2)), late)) == ["s0", "s1"]


def test_empty_policy_keeps_everything_and_says_so():
    items = snaps(*DAYS, status="fuzzy")
    decisions = decide(items, RetentionPolicy(), NOW)
    assert all(d.keep for d in decisions)
    assert all("policy is empty (keep all)" in d.reasons for d in decisions)


def test_no_snapshots():
    assert decide([], RetentionPolicy(keep_last=3), NOW) == []


# --- per-tag rules -----------------------------------------------------------------------------


def tagged_history() -> list[Snap]:
    times = [f"2026-11-{day:02d} 10:00" for day in range(20, 10, -1)]  # s0 newest .. s9 oldest
    items = snaps(*times)
    for i in (1, 3, 4, 6, 8):  # pre-update snapshots
        items[i] = replace(items[i], tags=["pre-update"])
    return items


def test_tag_rule_keeps_newest_n_tagged():
    decisions = decide(tagged_history(), RetentionPolicy(keep_last=1, tags={"pre-update": 3}), NOW)
    assert kept(decisions) == ["s0", "s1", "s3", "s4"]
    assert reasons_of(decisions)["s3"] == ["tag pre-update (last 3)"]


def test_tag_rule_adds_to_general_rules():
    # keep_daily also walks tagged snapshots: s6 (tagged, 4th pre-update) stays as a daily one.
    decisions = decide(tagged_history(), RetentionPolicy(keep_daily=7, tags={"pre-update": 2}), NOW)
    assert kept(decisions) == ["s0", "s1", "s2", "s3", "s4", "s5", "s6"]
    assert reasons_of(decisions)["s6"] == ["daily 2026-11-14"]


def test_tag_rule_never_fewer_than_one_and_unlimited():
    items = tagged_history()
    zero = RetentionPolicy(keep_last=1, tags={"pre-update": 0})
    assert kept(decide(items, zero, NOW)) == ["s0", "s1"]
    everything = RetentionPolicy(keep_last=1, tags={"pre-update": -1})
    assert kept(decide(items, everything, NOW)) == ["s0", "s1", "s3", "s4", "s6", "s8"]
    assert "tag pre-update (all)" in reasons_of(decide(items, everything, NOW))["s8"]


def test_tag_only_policy_is_not_empty():
    items = tagged_history()
    decisions = decide(items, RetentionPolicy(tags={"pre-update": 1}), NOW)
    assert kept(decisions) == ["s0", "s1"]  # s0 only as newest complete
    assert reasons_of(decisions)["s0"] == ["newest complete"]


# --- invariants --------------------------------------------------------------------------------


def test_newest_complete_is_kept_whatever_the_policy():
    items = snaps(*DAYS, status="fuzzy")
    items[3] = replace(items[3], status="complete")
    decisions = decide(items, RetentionPolicy(keep_last=1), NOW)
    assert kept(decisions) == ["s0", "s3"]
    assert reasons_of(decisions)["s3"] == ["newest complete"]


def test_newest_fuzzy_kept_when_no_complete_snapshot():
    items = snaps(*DAYS, status="fuzzy")
    items[0] = replace(items[0], status="failed", tags=["x"])
    decisions = decide(items, RetentionPolicy(tags={"x": 1}), NOW)
    assert kept(decisions) == ["s0", "s1"]
    assert reasons_of(decisions)["s1"] == ["newest fuzzy (no complete snapshot)"]


def test_parent_of_running_backup_is_kept():
    items = snaps(*DAYS)
    decisions = decide(items, RetentionPolicy(keep_last=1), NOW, running_parents={"s4", "gone"})
    assert kept(decisions) == ["s0", "s4"]
    assert reasons_of(decisions)["s4"] == ["parent of running backup"]


def test_naive_times_are_refused():
    with pytest.raises(ValueError, match="s0"):
        decide([Snap("s0", dt.datetime(2026, 1, 1))], RetentionPolicy(keep_last=1), NOW)
    with pytest.raises(ValueError):
        decide(snaps(*DAYS), RetentionPolicy(keep_last=1), dt.datetime(2026, 1, 1))


def test_policy_validation_and_description():
    with pytest.raises(ValueError):
        RetentionPolicy(keep_daily=-2)
    with pytest.raises(ValueError):
        RetentionPolicy(keep_daily=True)
    policy = RetentionPolicy(keep_last=3, keep_yearly=-1, keep_within=dt.timedelta(days=1, hours=12),
                             tags={"pre-update": 3})
    assert policy.describe() == "keep last 3, yearly all, within 1d12h, tag pre-update last 3"
    assert RetentionPolicy().describe() == "empty policy: keep all"
    assert format_timedelta(dt.timedelta(weeks=2)) == "14d"


# --------------------------------------------------------------------------------------------
# Cases transcribed from restic's own tests: internal/restic/snapshot_policy_test.go
# (TestApplyPolicy, github.com/restic/restic) and the golden files
# internal/restic/testdata/policy_keep_snapshots_<n> for the policies listed below.
# The golden files stored there predate restic 0.17's "keep the oldest snapshot while counts
# remain" (restic PR #4366); where that rule applies the expectation adds the oldest snapshot
# (2014-08-08 10:20:30), marked below.
# --------------------------------------------------------------------------------------------

RESTIC_TIMES = [
    ("2014-09-01 10:20:30", []), ("2014-09-02 10:20:30", []), ("2014-09-05 10:20:30", []),
    ("2014-09-06 10:20:30", []), ("2014-09-08 10:20:30", []), ("2014-09-09 10:20:30", []),
    ("2014-09-10 10:20:30", []), ("2014-09-11 10:20:30", []), ("2014-09-20 10:20:30", []),
    ("2014-09-22 10:20:30", []), ("2014-08-08 10:20:30", []), ("2014-08-10 10:20:30", []),
    ("2014-08-12 10:20:30", []), ("2014-08-13 10:20:30", []), ("2014-08-13 10:20:30.100000", []),
    ("2014-08-15 10:20:30", []), ("2014-08-18 10:20:30", []), ("2014-08-20 10:20:30", []),
    ("2014-08-21 10:20:30", []), ("2014-08-22 10:20:30", []),
    ("2014-10-01 10:20:30", ["foo"]), ("2014-10-02 10:20:30", ["foo"]), ("2014-10-05 10:20:30", ["foo"]),
    ("2014-10-06 10:20:30", ["foo"]), ("2014-10-08 10:20:30", ["foo"]), ("2014-10-09 10:20:30", ["foo"]),
    ("2014-10-10 10:20:30", ["foo"]), ("2014-10-11 10:20:30", ["foo"]), ("2014-10-20 10:20:30", ["foo"]),
    ("2014-10-22 10:20:30", ["foo"]), ("2014-11-08 10:20:30", ["foo"]), ("2014-11-10 10:20:30", ["foo"]),
    ("2014-11-12 10:20:30", ["foo"]), ("2014-11-13 10:20:30", ["foo"]),
    ("2014-11-13 10:20:30.100000", ["bar"]), ("2014-11-15 10:20:30", ["foo", "bar"]),
    ("2014-11-18 10:20:30", []), ("2014-11-20 10:20:30", []), ("2014-11-21 10:20:30", []),
    ("2014-11-22 10:20:30", []),
    ("2015-09-01 10:20:30", []), ("2015-09-02 10:20:30", []), ("2015-09-05 10:20:30", []),
    ("2015-09-06 10:20:30", []), ("2015-09-08 10:20:30", []), ("2015-09-09 10:20:30", []),
    ("2015-09-10 10:20:30", []), ("2015-09-11 10:20:30", []), ("2015-09-20 10:20:30", []),
    ("2015-09-22 10:20:30", []), ("2015-08-08 10:20:30", []), ("2015-08-10 10:20:30", []),
    ("2015-08-12 10:20:30", []), ("2015-08-13 10:20:30", []), ("2015-08-13 10:20:30.100000", []),
    ("2015-08-15 10:20:30", []), ("2015-08-18 10:20:30", []), ("2015-08-20 10:20:30", []),
    ("2015-08-21 10:20:30", []), ("2015-08-22 10:20:30", []),
    ("2015-10-01 10:20:30", []), ("2015-10-02 10:20:30", []), ("2015-10-05 10:20:30", []),
    ("2015-10-06 10:20:30", []), ("2015-10-08 10:20:30", []), ("2015-10-09 10:20:30", []),
    ("2015-10-10 10:20:30", []), ("2015-10-11 10:20:30", []), ("2015-10-20 10:20:30", []),
    ("2015-10-22 10:20:30", []), ("2015-10-22 10:20:30", []), ("2015-10-22 10:20:30", ["foo", "bar"]),
    ("2015-10-22 10:20:30", ["foo", "bar"]), ("2015-10-22 10:20:30", ["foo", "bar"]),
    ("2015-11-08 10:20:30", []), ("2015-11-10 10:20:30", []), ("2015-11-12 10:20:30", []),
    ("2015-11-13 10:20:30", []), ("2015-11-13 10:20:30.100000", []), ("2015-11-15 10:20:30", []),
    ("2015-11-18 10:20:30", []), ("2015-11-20 10:20:30", []), ("2015-11-21 10:20:30", []),
    ("2015-11-22 10:20:30", []),
    ("2016-01-01 01:02:03", []), ("2016-01-01 01:03:03", []), ("2016-01-01 07:08:03", []),
    ("2016-01-03 07:02:03", []), ("2016-01-04 10:23:03", []), ("2016-01-04 11:23:03", []),
    ("2016-01-04 12:23:03", []), ("2016-01-04 12:24:03", []), ("2016-01-04 12:28:03", []),
    ("2016-01-04 12:30:03", []), ("2016-01-04 16:23:03", []), ("2016-01-05 09:02:03", []),
    ("2016-01-06 08:02:03", []), ("2016-01-07 10:02:03", []), ("2016-01-08 20:02:03", []),
    ("2016-01-09 21:02:03", []), ("2016-01-12 21:02:03", []), ("2016-01-12 21:08:03", []),
    ("2016-01-18 12:02:03", []),
]
RESTIC_OLDEST = "2014-08-08 10:20:30"

RESTIC_CASES = [
    # golden file index, policy, kept times (newest first)
    (6, RetentionPolicy(keep_daily=3), ["2016-01-18 12:02:03", "2016-01-12 21:08:03", "2016-01-09 21:02:03"]),
    (9, RetentionPolicy(keep_last=5, keep_daily=5),
     ["2016-01-18 12:02:03", "2016-01-12 21:08:03", "2016-01-12 21:02:03", "2016-01-09 21:02:03",
      "2016-01-08 20:02:03", "2016-01-07 10:02:03"]),
    (12, RetentionPolicy(keep_weekly=4),
     ["2016-01-18 12:02:03", "2016-01-12 21:08:03", "2016-01-09 21:02:03", "2016-01-03 07:02:03"]),
    (13, RetentionPolicy(keep_daily=3, keep_weekly=4),
     ["2016-01-18 12:02:03", "2016-01-12 21:08:03", "2016-01-09 21:02:03", "2016-01-03 07:02:03"]),
    (16, RetentionPolicy(keep_yearly=10),
     ["2016-01-18 12:02:03", "2015-11-22 10:20:30", "2014-11-22 10:20:30", RESTIC_OLDEST]),  # + oldest (0.17)
    (17, RetentionPolicy(keep_daily=7, keep_weekly=2, keep_monthly=3, keep_yearly=10),
     ["2016-01-18 12:02:03", "2016-01-12 21:08:03", "2016-01-09 21:02:03", "2016-01-08 20:02:03",
      "2016-01-07 10:02:03", "2016-01-06 08:02:03", "2016-01-05 09:02:03", "2015-11-22 10:20:30",
      "2015-10-22 10:20:30", "2014-11-22 10:20:30", RESTIC_OLDEST]),  # + oldest (0.17)
    (23, RetentionPolicy(keep_within=dt.timedelta(days=7)),
     ["2016-01-18 12:02:03", "2016-01-12 21:08:03", "2016-01-12 21:02:03"]),
]


@pytest.mark.parametrize("golden,policy,want", RESTIC_CASES, ids=[f"restic-golden-{c[0]}" for c in RESTIC_CASES])
def test_restic_golden_cases(golden, policy, want):
    # Ids descend with list position so that equal times keep restic's (stable) input order.
    items = [Snap(f"{1000 - i:04d}", at(t), tags=tags, status="fuzzy") for i, (t, tags) in enumerate(RESTIC_TIMES)]
    restic_now = dt.datetime(2016, 2, 1, tzinfo=UTC)
    got = [d.snapshot.time for d in decide(items, policy, restic_now) if d.keep]
    assert got == [at(t) for t in want]


def test_restic_oldest_reason_prefix():
    items = [Snap(f"{1000 - i:04d}", at(t), tags=tags) for i, (t, tags) in enumerate(RESTIC_TIMES)]
    decisions = decide(items, RetentionPolicy(keep_yearly=10), dt.datetime(2016, 2, 1, tzinfo=UTC))
    oldest = [d for d in decisions if d.snapshot.time == at(RESTIC_OLDEST)][0]
    assert oldest.reasons == ["oldest yearly 2014"]


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------

BASE = dt.datetime(2024, 1, 1, tzinfo=UTC)
counts = st.sampled_from([-1, 0, 0, 0, 1, 2, 3, 5])


@st.composite
def snapshot_lists(draw):
    n = draw(st.integers(0, 40))
    offsets = draw(st.lists(st.integers(0, 3 * 365 * 24 * 60), min_size=n, max_size=n))  # minutes
    items = []
    for i, minutes in enumerate(offsets):
        items.append(Snap(
            f"id{i:03d}",
            BASE + dt.timedelta(minutes=minutes),
            tags=draw(st.lists(st.sampled_from(["pre-update", "manual"]), max_size=2, unique=True)),
            status=draw(st.sampled_from(["complete", "complete", "fuzzy", "failed"])),
        ))
    return items


@st.composite
def policies(draw):
    within = draw(st.one_of(st.none(), st.integers(1, 60 * 24 * 60).map(lambda m: dt.timedelta(minutes=m))))
    tags = draw(st.dictionaries(st.sampled_from(["pre-update", "manual"]), st.sampled_from([-1, 1, 2, 3]), max_size=2))
    return RetentionPolicy(
        keep_last=draw(counts), keep_hourly=draw(counts), keep_daily=draw(counts),
        keep_weekly=draw(counts), keep_monthly=draw(counts), keep_yearly=draw(counts),
        keep_within=within, tags=tags,
    )


# The clock: sometimes before some snapshots (clock skew), usually after all of them.
clocks = st.integers(0, 4 * 365 * 24).map(lambda h: BASE + dt.timedelta(hours=h))
parents = st.sets(st.sampled_from([f"id{i:03d}" for i in range(40)]), max_size=3)

PROPERTY_SETTINGS = settings(max_examples=300, deadline=None)


@PROPERTY_SETTINGS
@given(snapshot_lists(), policies(), clocks, parents)
def test_property_newest_complete_kept_and_never_empty(items, policy, now, running):
    decisions = decide(items, policy, now, running)
    assert len(decisions) == len(items)
    assert {d.snapshot.id for d in decisions} == {s.id for s in items}
    complete = [s for s in items if s.status == "complete"]
    if complete:
        newest = max(complete, key=lambda s: (s.time, s.id))
        assert newest.id in kept(decisions)
    if any(s.status in ("complete", "fuzzy") for s in items):
        assert kept(decisions)
    assert {s.id for s in items if s.id in running} <= set(kept(decisions))
    for d in decisions:
        assert d.keep == bool(d.reasons)


@PROPERTY_SETTINGS
@given(snapshot_lists(), policies(), clocks, parents)
def test_property_idempotent(items, policy, now, running):
    first = decide(items, policy, now, running)
    survivors = [d.snapshot for d in first if d.keep]
    again = decide(survivors, policy, now, running)
    assert all(d.keep for d in again), [d for d in again if not d.keep]


RAISABLE = ["keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly"]


@PROPERTY_SETTINGS
@given(snapshot_lists(), policies(), clocks, st.sampled_from(RAISABLE + ["keep_within", "tags"]),
       st.integers(1, 5), st.booleans())
def test_property_monotone_in_counts(items, policy, now, rule, step, to_unlimited):
    if rule == "keep_within":
        current = policy.keep_within or dt.timedelta(0)
        raised = replace(policy, keep_within=current + dt.timedelta(hours=step))
    elif rule == "tags":
        tags = {t: (c if c == -1 else (-1 if to_unlimited else c + step)) for t, c in policy.tags.items()}
        tags.setdefault("manual", 1)  # adding a rule only keeps more
        raised = replace(policy, tags=tags)
    else:
        current = getattr(policy, rule)
        if current == -1:
            return
        raised = replace(policy, **{rule: -1 if to_unlimited else current + step})
    if policy.is_empty():
        return  # an empty policy keeps everything; any non-empty one may keep less (restic too)
    before = set(kept(decide(items, policy, now)))
    after = set(kept(decide(items, raised, now)))
    assert before <= after, (rule, before - after)


@PROPERTY_SETTINGS
@given(snapshot_lists(), policies(), clocks)
def test_property_order_independent(items, policy, now):
    shuffled = items[::-1]
    assert decide(items, policy, now) == decide(shuffled, policy, now)
