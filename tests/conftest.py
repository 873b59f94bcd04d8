"""Shared fixtures. Each area keeps its own in tests/support/<area>.py."""

pytest_plugins = [
    "tests.support.s3",
    "tests.support.pg",
    "tests.support.sample",
    "tests.support.node",
]
