"""Policy files: the shipped ones parse, and every kind of bad input is one clear line."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from drtool import secrets
from drtool.errors import ConfigError
from drtool.policy import Schedule, load_policy, parse_bytes, parse_duration, parse_rate
from drtool.retention import RetentionPolicy

POLICIES = Path(__file__).resolve().parent.parent / "policies"
UTC = dt.timezone.utc


def test_shipped_policies_parse():
    names = sorted(p.name for p in POLICIES.glob("*.toml"))
    assert {"listener.toml", "archival.toml", "miner.toml"} <= set(names)
    for path in POLICIES.glob("*.toml"):
        policy = load_policy(path)
        assert not policy.retention.is_empty(), path
        assert policy.retention.tags.get("pre-update", 0) >= 1, path
        for job in ("backup", "prune", "verify", "drill", "disk"):
            schedule = getattr(policy.schedule, job)
            assert schedule is not None and schedule.trigger() is not None, (path, job)


def test_listener_is_the_documented_default():
    p = load_policy(POLICIES / "listener.toml")
    assert (p.schedule.backup.kind, p.schedule.backup.value) == ("cron", "0 */6 * * *")
    assert p.schedule.disk.kind == "interval" and p.schedule.disk.value == dt.timedelta(minutes=5)
    assert p.retention == RetentionPolicy(keep_last=3, keep_daily=7, keep_weekly=4, keep_monthly=6,
                                          tags={"pre-update": 3})
    assert (p.disk.warn_percent, p.disk.critical_percent) == (80, 90)
    assert p.disk.evict_expired_blobs is False
    assert p.verify.read_data_fraction == 0.05
    assert p.daemon.rpo == dt.timedelta(hours=8)
    assert p.throttle.upload == 50 * 1024 * 1024


def test_archival_and_miner_differ_where_they_should():
    archival = load_policy(POLICIES / "archival.toml")
    miner = load_policy(POLICIES / "miner.toml")
    listener = load_policy(POLICIES / "listener.toml")
    assert archival.retention.keep_monthly > listener.retention.keep_monthly
    assert archival.retention.keep_yearly == -1
    assert miner.daemon.rpo < listener.daemon.rpo
    assert miner.schedule.backup.value < dt.timedelta(hours=6)
    assert miner.disk.evict_expired_blobs is True


def test_cron_weekday_follows_crontab_not_apscheduler():
    # "0 4 * * 0" is Sunday in crontab; APScheduler 3 alone would read 0 as Monday.
    trigger = Schedule.parse("0 4 * * 0").trigger()
    friday = dt.datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
    assert trigger.get_next_fire_time(None, friday) == dt.datetime(2026, 11, 29, 4, 0, tzinfo=UTC)
    weekdays = Schedule.parse("30 1 * * 1-5").trigger()
    saturday = dt.datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    assert weekdays.get_next_fire_time(None, saturday) == dt.datetime(2026, 11, 30, 1, 30, tzinfo=UTC)
    assert Schedule.parse("0 0 * * 7").trigger().get_next_fire_time(None, friday).weekday() == 6


def test_interval_schedule():
    schedule = Schedule.parse("every 30s")
    assert (schedule.kind, schedule.value) == ("interval", dt.timedelta(seconds=30))
    start = dt.datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
    trigger = schedule.trigger()
    first = trigger.get_next_fire_time(None, start)
    assert trigger.get_next_fire_time(first, first) - first == dt.timedelta(seconds=30)


@pytest.mark.parametrize("text,seconds", [
    ("90s", 90), ("30m", 1800), ("8h", 28800), ("7d", 604800), ("2w", 1209600), ("1d12h", 129600), ("0s", 0),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == dt.timedelta(seconds=seconds)


@pytest.mark.parametrize("bad", ["", "8", "h", "8 hours", "1.5h", "-1h", "1y", 8])
def test_parse_duration_rejects(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize("value,expected", [
    (1024, 1024), ("1024", 1024), ("10GiB", 10 * 1024**3), ("500MB", 500 * 1000**2),
    ("1.5 KiB", 1536), ("2tb", 2 * 1000**4), ("7B", 7),
])
def test_parse_bytes(value, expected):
    assert parse_bytes(value) == expected


@pytest.mark.parametrize("bad", ["10 GiBs", "GiB", "-5", -5, True, 1.5, "1e3"])
def test_parse_bytes_rejects(bad):
    with pytest.raises(ValueError):
        parse_bytes(bad)


def test_parse_rate():
    assert parse_rate("50MiB/s") == 50 * 1024 * 1024
    assert parse_rate("800 KB/s") == 800_000
    for bad in ("50MiB", "0MiB/s", "fast/s", 50):
        with pytest.raises(ValueError):
            parse_rate(bad)


def test_empty_file_takes_defaults(tmp_path):
    path = tmp_path / "empty.toml"
    path.write_text("")
    policy = load_policy(path)
    assert policy.retention.is_empty()
    assert policy.schedule.backup is None
    assert policy.disk.paths == (".",) and policy.disk.critical_percent == 90


def test_webhook_urls_become_secrets(tmp_path):
    url = "https://hooks.example.net/services/T0/B0/s3cr3tT0ken"
    path = tmp_path / "notify.toml"
    path.write_text(f'[notify]\nfailure = ["{url}"]\n')
    assert load_policy(path).notify.failure == (url,)
    assert "s3cr3tT0ken" not in secrets.redact(f"POST {url} failed")


# One row per kind of error: (policy text, section, key, words the message must contain)
BAD = [
    ("unknown section", "[retension]\nkeep_last = 3\n", "[retension]", None, "unknown section"),
    ("unknown key", "[retention]\nkeep_lst = 3\n", "[retention]", "keep_lst", "unknown key"),
    ("section not a table", "disk = 5\n", "[disk]", None, "must be a table"),
    ("string for integer", '[retention]\nkeep_daily = "7"\n', "[retention]", "keep_daily", "expected an integer"),
    ("boolean for integer", "[retention]\nkeep_daily = true\n", "[retention]", "keep_daily", "expected an integer"),
    ("count below -1", "[retention]\nkeep_daily = -2\n", "[retention]", "keep_daily", "out of range"),
    ("bad keep_within", '[retention]\nkeep_within = "7 days"\n', "[retention]", "keep_within", "not a duration"),
    ("tag rule of zero", "[retention.tags]\npre-update = 0\n", "[retention.tags]", "pre-update", "at least 1"),
    ("tag rule wrong type", '[retention.tags]\npre-update = "3"\n', "[retention.tags]", "pre-update",
     "expected an integer"),
    ("cron wrong field count", '[schedule]\nbackup = "0 */6 * *"\n', "[schedule]", "backup", "4 fields"),
    ("cron value out of range", '[schedule]\nprune = "61 3 * * *"\n', "[schedule]", "prune", "59"),
    ("cron weekday out of range", '[schedule]\nverify = "0 4 * * 8"\n', "[schedule]", "verify", "day-of-week"),
    ("cron day and weekday", '[schedule]\ndrill = "0 5 1 * 0"\n', "[schedule]", "drill", "day-of-month and day-of-week"),
    ("bad interval", '[schedule]\ndisk = "every five minutes"\n', "[schedule]", "disk", "every <duration>"),
    ("zero interval", '[schedule]\ndisk = "every 0m"\n', "[schedule]", "disk", "above zero"),
    ("schedule not a string", "[schedule]\ndisk = 300\n", "[schedule]", "disk", "got an integer"),
    ("percent out of range", "[disk]\nwarn_percent = 120\n", "[disk]", "warn_percent", "out of range"),
    ("warn above critical", "[disk]\nwarn_percent = 95\ncritical_percent = 90\n", "[disk]", "warn_percent",
     "above critical_percent"),
    ("paths not a list", '[disk]\npaths = "data"\n', "[disk]", "paths", "array of strings"),
    ("empty paths", "[disk]\npaths = []\n", "[disk]", "paths", "at least one"),
    ("bad size", '[disk]\nmin_free_bytes = "10 gigs"\n', "[disk]", "min_free_bytes", "not a size"),
    ("boolean expected", '[disk]\nevict_expired_blobs = "yes"\n', "[disk]", "evict_expired_blobs", "true or false"),
    ("fraction above one", "[verify]\nread_data_fraction = 5\n", "[verify]", "read_data_fraction", "out of range"),
    ("port out of range", "[daemon]\nmetrics_port = 70000\n", "[daemon]", "metrics_port", "out of range"),
    ("bad rpo", '[daemon]\nrpo = "8"\n', "[daemon]", "rpo", "not a duration"),
    ("zero rpo", '[daemon]\nrpo = "0h"\n', "[daemon]", "rpo", "above zero"),
    ("bad webhook", '[notify]\nfailure = ["ftp://hooks.example.net/t0ken"]\n', "[notify]", "failure",
     "not an http"),
    ("bad rate", '[throttle]\nupload = "50MiB"\n', "[throttle]", "upload", "not a rate"),
    ("zero concurrency", "[throttle]\nmax_concurrent_requests = 0\n", "[throttle]", "max_concurrent_requests",
     "out of range"),
]


@pytest.mark.parametrize("text,section,key,words", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_naming_file_section_key(tmp_path, text, section, key, words):
    path = tmp_path / "node-policy.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_policy(path)
    message = str(info.value)
    assert "\n" not in message
    assert info.value.exit_code == 2
    prefix = f"{path}: {section}" + (f" {key}:" if key else ":")
    assert message.startswith(prefix), message
    assert words in message, message
    assert "t0ken" not in message  # webhook URLs are never echoed


def test_invalid_toml_and_missing_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[retention\nkeep_last = 3\n")
    with pytest.raises(ConfigError) as info:
        load_policy(path)
    assert str(info.value).startswith(f"{path}: invalid TOML:") and "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="cannot read policy file"):
        load_policy(tmp_path / "missing.toml")
