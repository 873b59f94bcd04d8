#!/usr/bin/env bash
# Quick start 1: build a sample Teranode node, back it up, verify, restore, verify again.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/drtool demo "${@:-drtool-demo}"
