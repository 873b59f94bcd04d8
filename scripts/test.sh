#!/usr/bin/env bash
# Quick start 2: the test suite, against real PostgreSQL, moto_server (S3), restic and zstd.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
