"""Policy files (policies/*.toml): schedules, retention, disk thresholds, verify, daemon,
notifications and throttling.

Parsing is strict: an unknown section or key, a wrong type, a bad duration, size, rate or cron
expression raises ConfigError with one line `<file>: [section] key: <what is wrong>`. Every
section and key is optional; what is missing takes the default documented on its dataclass.

Durations are written `<number><unit>` with units s, m (minutes), h, d, w, and may be chained
("1d12h"). Note `m` is minutes here, where restic's `--keep-within` reads it as months: a
policy says "30d" or "4w" for a month.

Cron expressions are standard 5-field crontab (minute hour day-of-month month day-of-week, UTC).
APScheduler 3 numbers weekdays from Monday = 0, crontab from Sunday = 0; `Schedule.trigger()`
translates, so "0 4 * * 0" runs on Sundays as in crontab. Restricting both day-of-month and
day-of-week is refused: crontab ORs the two, APScheduler ANDs them, and a policy must mean one thing.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import tomllib
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from drtool import secrets
from drtool.errors import ConfigError
from drtool.retention import RetentionPolicy

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Public helpers: durations, sizes, rates (reused by config and the daemon)
# ---------------------------------------------------------------------------------------------

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_PART = re.compile(r"(\d+)([smhdw])")


def parse_duration(text: str) -> dt.timedelta:
    """'8h', '30m', '7d', '2w', '90s' or chained '1d12h' -> timedelta. ValueError if malformed."""
    if not isinstance(text, str):
        raise ValueError(f"expected a duration string like '8h', got {_type_name(text)}")
    compact = text.strip().lower()
    if not compact or _DURATION_PART.sub("", compact) != "":
        raise ValueError(f"{text!r} is not a duration (use e.g. 30s, 5m, 8h, 7d, 2w or 1d12h)")
    seconds = sum(int(n) * _DURATION_UNITS[unit] for n, unit in _DURATION_PART.findall(compact))
    return dt.timedelta(seconds=seconds)


_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_bytes(value: int | str) -> int:
    """A size: an integer number of bytes, or '10GiB', '500MB', '1.5 TiB' -> bytes (int)."""
    if isinstance(value, bool):
        raise ValueError("expected a size like '10GiB', got a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size {value} is negative")
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a size like '10GiB', got {_type_name(value)}")
    match = _SIZE.match(value)
    unit = match.group(2).lower() if match else None
    if not match or unit not in _SIZE_UNITS:
        raise ValueError(f"{value!r} is not a size (use e.g. 1048576, 500MB or 10GiB)")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def parse_rate(value: str) -> int:
    """A bandwidth '50MiB/s', '10MB/s' -> bytes per second (int)."""
    if not isinstance(value, str) or not value.strip().lower().endswith("/s"):
        raise ValueError(f"{value!r} is not a rate (use e.g. 50MiB/s)")
    rate = parse_bytes(value.strip()[:-2])
    if rate == 0:
        raise ValueError(f"{value!r}: a rate must be above zero (leave the key out for no limit)")
    return rate


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "a table"}.get(type(value), type(value).__name__)


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------

_WEEKDAYS = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]


def _crontab_weekdays(field_text: str) -> set[int]:
    """The crontab day-of-week field -> set of weekday numbers, Sunday = 0."""
    days: set[int] = set()
    for item in field_text.lower().split(","):
        spec, _, step_text = item.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) == 0:
                raise ValueError(f"day-of-week step {step_text!r} must be a positive integer")
            step = int(step_text)
        if spec == "*":
            lo, hi = 0, 6
        else:
            lo_text, dash, hi_text = spec.partition("-")
            lo = _weekday_number(lo_text)
            hi = _weekday_number(hi_text) if dash else (lo if not step_text else 6)
            if hi < lo:
                raise ValueError(f"day-of-week range {spec!r} runs backwards")
        days.update(d % 7 for d in range(lo, hi + 1, step))
    return days


def _weekday_number(text: str) -> int:
    if text.isdigit() and int(text) <= 7:
        return int(text)
    if text in _WEEKDAYS:
        return _WEEKDAYS.index(text)
    raise ValueError(f"day-of-week {text!r} is not 0-7 or sun..sat")


@dataclass(frozen=True)
class Schedule:
    """When a job runs: kind 'cron' (value: the 5-field crontab text) or 'interval' (value: timedelta)."""

    kind: str
    value: str | dt.timedelta
    text: str

    @classmethod
    def parse(cls, text: str) -> "Schedule":
        """'0 */6 * * *' or 'every 5m'. ValueError with what is wrong."""
        if not isinstance(text, str):
            raise ValueError(f"expected a cron expression or 'every <duration>', got {_type_name(text)}")
        words = text.split()
        if words and words[0].lower() == "every":
            if len(words) != 2:
                raise ValueError(f"{text!r}: write 'every <duration>', e.g. 'every 5m'")
            interval = parse_duration(words[1])
            if interval <= dt.timedelta(0):
                raise ValueError(f"{text!r}: the interval must be above zero")
            return cls("interval", interval, text)
        if len(words) != 5:
            raise ValueError(f"{text!r} has {len(words)} fields; a cron expression has 5 "
                             "(minute hour day-of-month month day-of-week), or write 'every 5m'")
        schedule = cls("cron", " ".join(words), text)
        schedule.trigger()  # validates every field
        return schedule

    def trigger(self, timezone: str | dt.tzinfo = "UTC"):
        """An APScheduler 3 trigger with crontab's meaning (weekdays translated, see module doc)."""
        if self.kind == "interval":
            return IntervalTrigger(seconds=int(self.value.total_seconds()), timezone=timezone)
        minute, hour, day, month, weekday = str(self.value).split()
        if weekday != "*":
            if day != "*":
                raise ValueError(f"{self.text!r} restricts both day-of-month and day-of-week; "
                                 "crontab and the scheduler disagree on that, restrict only one")
            weekday = ",".join(_WEEKDAYS[d] for d in sorted(_crontab_weekdays(weekday)))
        try:
            return CronTrigger.from_crontab(f"{minute} {hour} {day} {month} {weekday}", timezone=timezone)
        except ValueError as exc:
            raise ValueError(f"{self.text!r}: {exc}") from None


@dataclass(frozen=True)
class Schedules:
    """Job schedules; None = the daemon does not run that job."""

    backup: Schedule | None = None
    prune: Schedule | None = None
    verify: Schedule | None = None
    drill: Schedule | None = None
    disk: Schedule | None = None


# ---------------------------------------------------------------------------------------------
# The other sections
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiskPolicy:
    """Disk thresholds. Paths are relative to the node's data_dir, or absolute; drtool's own
    cache and staging directories are always watched in addition (by the disk module)."""

    paths: tuple[str, ...] = (".",)
    warn_percent: float = 80.0
    critical_percent: float = 90.0
    min_free_bytes: int = 0  # 0 = no free-bytes limit
    max_inode_percent: float = 90.0
    evict_expired_blobs: bool = False


@dataclass(frozen=True)
class VerifyPolicy:
    read_data_fraction: float = 0.0  # share of stored bytes re-read and re-hashed by scheduled verify


@dataclass(frozen=True)
class DaemonPolicy:
    metrics_port: int = 9464  # 0 = no /metrics and /healthz listener
    rpo: dt.timedelta = dt.timedelta(hours=24)  # /healthz unhealthy when the newest snapshot is older


@dataclass(frozen=True)
class NotifyPolicy:
    """Webhook URLs called on job start, success and failure (registered as secrets)."""

    start: tuple[str, ...] = ()
    success: tuple[str, ...] = ()
    failure: tuple[str, ...] = ()


@dataclass(frozen=True)
class ThrottlePolicy:
    upload: int | None = None  # bytes per second; None = unlimited
    download: int | None = None
    max_concurrent_requests: int | None = None


@dataclass(frozen=True)
class Policy:
    source: str
    schedule: Schedules = field(default_factory=Schedules)
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)
    disk: DiskPolicy = field(default_factory=DiskPolicy)
    verify: VerifyPolicy = field(default_factory=VerifyPolicy)
    daemon: DaemonPolicy = field(default_factory=DaemonPolicy)
    notify: NotifyPolicy = field(default_factory=NotifyPolicy)
    throttle: ThrottlePolicy = field(default_factory=ThrottlePolicy)


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------


class _Section:
    """Reads one TOML table, naming file, section and key in every error, and refuses leftovers."""

    def __init__(self, source: str, name: str, table: Any, keys: tuple[str, ...] = ()):
        self.source, self.name, self.keys = source, name, keys
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [{name}]: must be a table, got {_type_name(table)}")
        self.table = table
        self.seen: set[str] = set()

    def error(self, key: str, what: str) -> ConfigError:
        return ConfigError(f"{self.source}: [{self.name}] {key}: {what}")

    def has(self, key: str) -> bool:
        return key in self.table

    def get(self, key: str) -> Any:
        self.seen.add(key)
        return self.table[key]

    def integer(self, key: str, default: Any, lo: int, hi: int | None = None, hint: str = "") -> Any:
        if not self.has(key):
            return default
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"expected an integer, got {_type_name(value)}")
        if value < lo or (hi is not None and value > hi):
            allowed = f"{lo}..{hi}" if hi is not None else f"{lo} or more"
            raise self.error(key, f"{value} is out of range ({allowed}){hint}")
        return value

    def number(self, key: str, default: float, lo: float, hi: float) -> float:
        if not self.has(key):
            return default
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(key, f"expected a number, got {_type_name(value)}")
        if not lo <= value <= hi:
            raise self.error(key, f"{value} is out of range ({lo:g}..{hi:g})")
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        if not self.has(key):
            return default
        value = self.get(key)
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {_type_name(value)}")
        return value

    def strings(self, key: str, default: tuple[str, ...], allow_empty: bool = True) -> tuple[str, ...]:
        if not self.has(key):
            return default
        value = self.get(key)
        if not isinstance(value, list):
            raise self.error(key, f"expected an array of strings, got {_type_name(value)}")
        for n, item in enumerate(value, 1):
            if not isinstance(item, str) or not item.strip():
                raise self.error(key, f"item {n} must be a non-empty string")
        if not value and not allow_empty:
            raise self.error(key, "must list at least one entry")
        return tuple(value)

    def convert(self, key: str, default: Any, parse) -> Any:
        """A value through a parse_* helper; its ValueError becomes this key's ConfigError."""
        if not self.has(key):
            return default
        try:
            return parse(self.get(key))
        except ValueError as exc:
            raise self.error(key, str(exc)) from None

    def done(self) -> None:
        """Refuse any key nothing read: a typo must not silently fall back to a default."""
        for key in self.table:
            if key not in self.seen:
                raise self.error(key, f"unknown key (this section takes: {', '.join(self.keys)})")


def _section(source: str, data: dict, name: str, keys: tuple[str, ...]) -> _Section:
    return _Section(source, name, data.get(name, {}), keys)


_SCHEDULE_KEYS = ("backup", "prune", "verify", "drill", "disk")
_RETENTION_KEYS = ("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly",
                   "keep_yearly", "keep_within", "tags")
_DISK_KEYS = ("paths", "warn_percent", "critical_percent", "min_free_bytes", "max_inode_percent",
              "evict_expired_blobs")
_SECTIONS = {
    "schedule": _SCHEDULE_KEYS,
    "retention": _RETENTION_KEYS,
    "disk": _DISK_KEYS,
    "verify": ("read_data_fraction",),
    "daemon": ("metrics_port", "rpo"),
    "notify": ("start", "success", "failure"),
    "throttle": ("upload", "download", "max_concurrent_requests"),
}


def load_policy(path: str | Path) -> Policy:
    """Read and validate one policy file."""
    source = str(path)
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read policy file: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    return policy_from_dict(data, source)


def policy_from_dict(data: dict, source: str) -> Policy:
    """Validate an already-decoded policy document; `source` names it in errors."""
    for name in data:
        if name not in _SECTIONS:
            raise ConfigError(f"{source}: [{name}]: unknown section "
                              f"(a policy has: {', '.join(_SECTIONS)})")
    policy = Policy(
        source=source,
        schedule=_parse_schedule(_section(source, data, "schedule", _SCHEDULE_KEYS)),
        retention=_parse_retention(_section(source, data, "retention", _RETENTION_KEYS)),
        disk=_parse_disk(_section(source, data, "disk", _DISK_KEYS)),
        verify=_parse_verify(_section(source, data, "verify", _SECTIONS["verify"])),
        daemon=_parse_daemon(_section(source, data, "daemon", _SECTIONS["daemon"])),
        notify=_parse_notify(_section(source, data, "notify", _SECTIONS["notify"])),
        throttle=_parse_throttle(_section(source, data, "throttle", _SECTIONS["throttle"])),
    )
    log.debug("policy %s: %s", source, policy.retention.describe())
    return policy


def _parse_schedule(s: _Section) -> Schedules:
    jobs = {key: s.convert(key, None, Schedule.parse) for key in _SCHEDULE_KEYS}
    s.done()
    return Schedules(**jobs)


def _parse_retention(s: _Section) -> RetentionPolicy:
    counts = {key: s.integer(key, 0, lo=-1, hint="; -1 = unlimited, 0 = off") for key in _RETENTION_KEYS[:6]}
    within = s.convert("keep_within", None, parse_duration)
    tags: dict[str, int] = {}
    if s.has("tags"):
        t = _Section(s.source, f"{s.name}.tags", s.get("tags"))  # any key is a tag name
        for tag in t.table:
            if not tag or any(ch.isspace() or ch == "," for ch in tag):
                raise t.error(repr(tag), "a tag has no spaces or commas")
            count = t.integer(tag, None, lo=-1)
            if count == 0:
                raise t.error(tag, "0 would keep none; a tag rule keeps at least 1 (or -1 for all)")
            tags[tag] = count
    s.done()
    return RetentionPolicy(keep_within=within, tags=tags, **counts)


def _parse_disk(s: _Section) -> DiskPolicy:
    disk = DiskPolicy(
        paths=s.strings("paths", DiskPolicy.paths, allow_empty=False),
        warn_percent=s.number("warn_percent", DiskPolicy.warn_percent, 1, 100),
        critical_percent=s.number("critical_percent", DiskPolicy.critical_percent, 1, 100),
        min_free_bytes=s.convert("min_free_bytes", DiskPolicy.min_free_bytes, parse_bytes),
        max_inode_percent=s.number("max_inode_percent", DiskPolicy.max_inode_percent, 1, 100),
        evict_expired_blobs=s.boolean("evict_expired_blobs", DiskPolicy.evict_expired_blobs),
    )
    s.done()
    if disk.warn_percent > disk.critical_percent:
        key = "warn_percent" if s.has("warn_percent") else "critical_percent"
        raise s.error(key, f"warn_percent ({disk.warn_percent:g}) is above "
                           f"critical_percent ({disk.critical_percent:g})")
    return disk


def _parse_verify(s: _Section) -> VerifyPolicy:
    verify = VerifyPolicy(read_data_fraction=s.number("read_data_fraction", 0.0, 0, 1))
    s.done()
    return verify


def _positive_duration(text: str) -> dt.timedelta:
    duration = parse_duration(text)
    if duration <= dt.timedelta(0):
        raise ValueError(f"{text!r}: must be above zero")
    return duration


def _parse_daemon(s: _Section) -> DaemonPolicy:
    daemon = DaemonPolicy(
        metrics_port=s.integer("metrics_port", DaemonPolicy.metrics_port, lo=0, hi=65535),
        rpo=s.convert("rpo", DaemonPolicy.rpo, _positive_duration),
    )
    s.done()
    return daemon


def _parse_notify(s: _Section) -> NotifyPolicy:
    lists = {}
    for key in _SECTIONS["notify"]:
        urls = s.strings(key, ())
        for n, url in enumerate(urls, 1):
            parts = urllib.parse.urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                # The URL itself is not shown: webhook URLs often carry a token.
                raise s.error(key, f"item {n} is not an http:// or https:// URL")
            secrets.register(url)
        lists[key] = urls
    s.done()
    return NotifyPolicy(**lists)


def _parse_throttle(s: _Section) -> ThrottlePolicy:
    throttle = ThrottlePolicy(
        upload=s.convert("upload", None, parse_rate),
        download=s.convert("download", None, parse_rate),
        max_concurrent_requests=s.integer("max_concurrent_requests", None, lo=1, hi=1024),
    )
    s.done()
    return throttle
