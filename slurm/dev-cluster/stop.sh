#!/usr/bin/env bash
# Stop the dev cluster started by start.sh: each daemon by its pid file (never by name: other clusters may run).
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE="${TRELLIS_SLURM_DIR:-$(cd "$HERE/../.." && pwd)/.slurm-dev}"

stop_pidfile() {
  local f="$1" pid
  [ -f "$f" ] || return 0
  pid="$(cat "$f")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  fi
  rm -f "$f"
}

# Nodes first (their job steps end with them), then the controller, then munge.
for f in "$STATE"/slurmd-*.pid; do [ -e "$f" ] && stop_pidfile "$f"; done
stop_pidfile "$STATE/slurmctld.pid"
stop_pidfile "$STATE/munged.pid"
echo "dev-cluster: stopped ($STATE)" >&2
