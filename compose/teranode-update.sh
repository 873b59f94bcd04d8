#!/usr/bin/env bash
# Update a Teranode compose stack the SOP's way, with a verified pre-update snapshot first.
#
#   compose/teranode-update.sh [--dir /opt/teranode-quickstart] [--config drtool.toml] [--health-timeout 600]
#
# Steps: 1. drtool hook pre-update (a tagged, verified snapshot; its failure stops everything)
#        2. docker compose pull   3. docker compose down   4. docker compose up -d
#        5. wait until every service is running (and healthy where it has a health check)
# Set TERANODE_VERSION in the stack's .env to the new version before running it.
set -euo pipefail

STACK_DIR=/opt/teranode-quickstart
DRTOOL_CONFIG=${DRTOOL_CONFIG:-}
HEALTH_TIMEOUT=600
DRTOOL=${DRTOOL:-drtool}
DOCKER=${DOCKER:-docker}

while [ $# -gt 0 ]; do
  case "$1" in
    --dir) STACK_DIR=$2; shift 2 ;;
    --config) DRTOOL_CONFIG=$2; shift 2 ;;
    --health-timeout) HEALTH_TIMEOUT=$2; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "teranode-update: unknown argument $1" >&2; exit 2 ;;
  esac
done

cd "$STACK_DIR"
drtool_args=()
[ -n "$DRTOOL_CONFIG" ] && drtool_args=(--config "$DRTOOL_CONFIG")

echo "==> 1/5 pre-update snapshot (drtool hook pre-update)"
if ! hook_json=$("$DRTOOL" "${drtool_args[@]}" --json hook pre-update --env-file "$STACK_DIR/.env"); then
  echo "teranode-update: the pre-update snapshot failed (see above): NOT updating" >&2
  exit 1
fi
snapshot=$(printf '%s' "$hook_json" | python3 -c 'import json,sys; print(json.load(sys.stdin)["snapshot"]["id"][:8])')
echo "    snapshot $snapshot saved and verified"

rollback() {
  cat >&2 <<MSG

teranode-update: the update did not come up healthy.
To roll back to the state before the update:
  cd $STACK_DIR
  $DOCKER compose down
  # put the previous TERANODE_VERSION back in .env, then:
  $DRTOOL ${drtool_args[*]} restore $snapshot --force
  $DOCKER compose up -d
MSG
}

echo "==> 2/5 docker compose pull"
"$DOCKER" compose pull || { rollback; exit 1; }
echo "==> 3/5 docker compose down"
"$DOCKER" compose down || { rollback; exit 1; }
echo "==> 4/5 docker compose up -d"
"$DOCKER" compose up -d || { rollback; exit 1; }

echo "==> 5/5 waiting up to ${HEALTH_TIMEOUT}s for every service to be up"
deadline=$(( $(date +%s) + HEALTH_TIMEOUT ))
while :; do
  # one line per container: "<state> <health>" (health empty without a health check)
  states=$("$DOCKER" compose ps --all --format '{{.State}} {{.Health}}' || true)
  if [ -n "$states" ] && ! printf '%s\n' "$states" | grep -Eqv '^running( healthy)? *$'; then
    echo "    all services running"
    break
  fi
  if [ "$(date +%s)" -ge "$deadline" ]; then
    printf '%s\n' "$states" >&2
    rollback
    exit 1
  fi
  sleep 5
done
echo "update done; the pre-update snapshot $snapshot stays for rollback (kept per [retention.tags] pre-update)"
