#!/usr/bin/env bash
# `maskrcnn bench` on a shared machine: before each scenario wait (up to WAIT_IDLE seconds) until other processes
# leave the CPUs idle, because timings taken beside another CPU-heavy job are noise. Arguments go to the bench;
# the table's "foreign CPU" column says how much of the machine other processes still took during a scenario.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
exec maskrcnn bench --wait-idle "${WAIT_IDLE:-900}" "$@"
