#!/usr/bin/env bash
# A real one-node Slurm on localhost, for tests and CI (tests/test_slurm.py).
#
#   sudo bash launch/slurm_local.sh          # install (apt) if needed, configure, start, wait idle
#   bash launch/slurm_local_stop.sh          # stop what this script started (by PID)
#
# Runs as root in a container without systemd: starts munged, slurmctld and slurmd directly.
# Idempotent: when the daemons it started are still up and the node answers, it only reports.
# Writes /etc/slurm/slurm.conf (the path the Debian binaries read; an existing foreign one is
# kept as slurm.conf.orig-titan-rw) and keeps all state, logs and PIDs in $SLURM_LOCAL_DIR.
#
# Environment:
#   SLURM_LOCAL_DIR      state/log/pid directory (default /tmp/titan_rw_slurm)
#   SLURM_LOCAL_CPUS     CPUs of the node (default: nproc)
#   SLURM_LOCAL_INSTALL  0: never apt-get install, fail if the binaries are missing (default 1)
#   SLURM_LOCAL_TIMEOUT  seconds to wait for the node to be idle (default 60)
set -euo pipefail

STATE=${SLURM_LOCAL_DIR:-/tmp/titan_rw_slurm}
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
MARK="# written by titan_rw launch/slurm_local.sh"
PIDS=$STATE/pids
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-60}
NODE=localhost

log() { echo "[slurm_local] $*"; }
die() { echo "[slurm_local] ERROR: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (it writes $CONF and starts daemons)"

# ---- 1. binaries ---------------------------------------------------------------------------
need_install=0
for b in munged munge slurmctld slurmd sbatch scontrol sinfo; do
  command -v "$b" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin
  command -v "$b" >/dev/null 2>&1 || need_install=1
done
if [ "$need_install" = 1 ]; then
  [ "${SLURM_LOCAL_INSTALL:-1}" = 1 ] || die "slurm/munge binaries missing and SLURM_LOCAL_INSTALL=0"
  log "installing slurm-wlm and munge (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi
export PATH=$PATH:/usr/sbin

mkdir -p "$STATE/ctld" "$STATE/spool"
touch "$PIDS"

alive() {  # alive NAME: the PID recorded for NAME is running that program
  local pid
  pid=$(awk -v n="$1" '$1 == n {print $2}' "$PIDS" | tail -n1)
  [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$1" ]
}
record() {  # record NAME PID
  local tmp
  tmp=$(mktemp "$STATE/pids.XXXX")
  awk -v n="$1" '$1 != n' "$PIDS" >"$tmp" || true
  echo "$1 $2" >>"$tmp"
  mv "$tmp" "$PIDS"
}
node_state() { timeout 10 sinfo -h -n "$NODE" -o %t 2>/dev/null | head -n1 | tr -d '*~#!%$@^-' || true; }

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
# ---- 2. munge ------------------------------------------------------------------------------
if [ ! -s /etc/munge/munge.key ]; then
  log "creating /etc/munge/munge.key"
  mkdir -p /etc/munge
  if command -v mungekey >/dev/null 2>&1; then
    mungekey --create --keyfile=/etc/munge/munge.key --force
  else
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  fi
fi
chown munge:munge /etc/munge /etc/munge/munge.key 2>/dev/null || true
chmod 0700 /etc/munge
chmod 0400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
chmod 0755 /run/munge

if munge_ok; then
  log "munged already answering"
else
  log "starting munged"
  runuser -u munge -- munged --force
  for _ in $(seq 50); do
    munge_ok && break
    sleep 0.1
  done
  munge -n | unmunge >/dev/null || die "munged does not answer (see /var/log/munge/munged.log)"
  record munged "$(cat /run/munge/munged.pid)"
fi

# ---- 3. slurm.conf -------------------------------------------------------------------------
CPUS=${SLURM_LOCAL_CPUS:-$(nproc)}
MEM_MB=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
mkdir -p "$CONF_DIR"
if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF" && [ ! -f "$CONF.orig-titan-rw" ]; then
  log "keeping the existing $CONF as $CONF.orig-titan-rw"
  cp -p "$CONF" "$CONF.orig-titan-rw"
fi
new_conf=$(mktemp)
cat >"$new_conf" <<EOF
$MARK
# One node (this machine, as "localhost"), one partition, no accounting database, no cgroups.
ClusterName=titanrw
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
JobRequeue=1
# keep finished jobs visible to 'scontrol show job' for 10 minutes (no slurmdbd, so no sacct)
MinJobAge=600
KillWait=30
# a requeued job waits cred_expire+1 s before it may start again (default 120 s)
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=5
NodeName=$NODE CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
if ! cmp -s "$new_conf" "$CONF"; then
  cp "$new_conf" "$CONF"
  chmod 0644 "$CONF"
  conf_changed=1
else
  conf_changed=0
fi
rm -f "$new_conf"
if [ "$conf_changed" = 0 ] && alive slurmctld && alive slurmd; then
  case "$(node_state)" in
    idle | mix | alloc)
      log "already running (node $NODE $(node_state)); PIDs in $PIDS"
      exit 0 ;;
  esac
fi

# ---- 4. slurmctld, slurmd ------------------------------------------------------------------
if [ "$conf_changed" = 1 ]; then
  for d in slurmd slurmctld; do
    if alive "$d"; then
      log "config changed: restarting $d"
      pid=$(awk -v n="$d" '$1 == n {print $2}' "$PIDS" | tail -n1)
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do [ -e "/proc/$pid" ] || break; sleep 0.1; done
    fi
  done
fi
start_daemon() {  # start_daemon NAME PIDFILE CMD...
  local name=$1 pidfile=$2
  shift 2
  if alive "$name"; then return 0; fi
  log "starting $name"
  rm -f "$pidfile"
  "$@"
  for _ in $(seq 100); do [ -s "$pidfile" ] && break; sleep 0.1; done
  [ -s "$pidfile" ] || die "$name did not start; see $STATE/$name.log"
  record "$name" "$(cat "$pidfile")"
}
start_daemon slurmctld "$STATE/slurmctld.pid" slurmctld
start_daemon slurmd "$STATE/slurmd.pid" slurmd -N "$NODE"

# ---- 5. wait until the node is idle ---------------------------------------------------------
deadline=$((SECONDS + TIMEOUT))
while :; do
  st=$(node_state)
  case "$st" in
    idle | mix | alloc) break ;;
    down | drain | drng | fail | inval)
      scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
  esac
  [ "$SECONDS" -lt "$deadline" ] || die "node $NODE is '${st:-no answer}' after ${TIMEOUT}s; see $STATE/*.log"
  sleep 0.5
done
log "ready: node $NODE $st, $CPUS CPUs, ${MEM_MB} MB; state in $STATE; PIDs in $PIDS"
