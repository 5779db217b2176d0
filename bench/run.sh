#!/usr/bin/env bash
# Run `maskrcnn bench` once the machine is quiet: waits (up to WAIT_MAX seconds) for the 1-minute load average to
# fall below MAX_LOAD, because timings taken beside another CPU-heavy job are noise. Arguments go to the bench.
set -euo pipefail
MAX_LOAD="${MAX_LOAD:-1.2}"
WAIT_MAX="${WAIT_MAX:-900}"
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
waited=0
while awk -v max="$MAX_LOAD" '{ exit !($1 > max) }' /proc/loadavg 2>/dev/null; do
  if [ "$waited" -ge "$WAIT_MAX" ]; then
    echo "load still $(cut -d' ' -f1 /proc/loadavg) after ${waited}s; running anyway" >&2
    break
  fi
  echo "load $(cut -d' ' -f1 /proc/loadavg) > $MAX_LOAD, waiting..." >&2
  sleep 60
  waited=$((waited + 60))
done
exec maskrcnn bench "$@"
