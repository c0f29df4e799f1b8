#!/usr/bin/env bash
# Stop the daemons launch/slurm_local.sh started, by the PIDs it recorded (never by name).
#   bash launch/slurm_local_stop.sh            # slurmd, slurmctld, then munged
#   SLURM_LOCAL_PURGE=1 bash ...stop.sh        # also delete the state directory
# A munged that was already running before slurm_local.sh is left alone (it was not recorded).
set -uo pipefail

STATE=${SLURM_LOCAL_DIR:-/tmp/titan_rw_slurm}
PIDS=$STATE/pids
log() { echo "[slurm_local_stop] $*"; }

if [ ! -f "$PIDS" ]; then
  log "nothing recorded in $PIDS"
  exit 0
fi
for name in slurmd slurmctld munged; do
  pid=$(awk -v n="$name" '$1 == n {print $2}' "$PIDS" | tail -n1)
  [ -n "$pid" ] || continue
  if [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$name" ]; then
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 100); do [ -e "/proc/$pid" ] || break; sleep 0.1; done
    if [ -e "/proc/$pid" ]; then
      log "$name (pid $pid) ignored SIGTERM for 10 s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null
    fi
  else
    log "$name (pid $pid) is not running"
  fi
done
rm -f "$PIDS"
if [ "${SLURM_LOCAL_PURGE:-0}" = 1 ]; then
  rm -rf "$STATE"
  log "removed $STATE"
fi
