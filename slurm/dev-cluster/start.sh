#!/usr/bin/env bash
# A real single-host Slurm cluster for tests and demos: munged + slurmctld + two fake nodes (slurmd -N n1/n2)
# on 127.0.0.1 with private ports and their own munge key. Idempotent: a running cluster is left as it is.
#
#   slurm/dev-cluster/start.sh            # prints the `export SLURM_CONF=...` line to use it
#   slurm/dev-cluster/stop.sh
#
# Environment: TRELLIS_SLURM_DIR (state dir, default <repo>/.slurm-dev), TRELLIS_SLURM_PORT (base port,
# default 16817: ctld, ctld+1 = n1, ctld+2 = n2), TRELLIS_SLURM_NODE_CPUS (CPUs per fake node, default 4).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
STATE="${TRELLIS_SLURM_DIR:-$REPO/.slurm-dev}"
PORT="${TRELLIS_SLURM_PORT:-16817}"
CPUS="${TRELLIS_SLURM_NODE_CPUS:-4}"
WAIT_S="${TRELLIS_SLURM_WAIT_S:-60}"
NODES=(n1 n2)

log() { echo "dev-cluster: $*" >&2; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_missing() {
  local missing=()
  command -v slurmctld >/dev/null || missing+=(slurmctld)
  command -v slurmd >/dev/null || missing+=(slurmd)
  command -v sbatch >/dev/null || missing+=(slurm-client)
  command -v munged >/dev/null || missing+=(munge)
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    log "missing ${missing[*]}: install them (Debian/Ubuntu: apt-get install ${missing[*]})"; exit 3
  fi
  log "installing ${missing[*]} (about a minute)"
  # The packages' own services are not started in containers without systemd; we start our own daemons.
  export DEBIAN_FRONTEND=noninteractive
  timeout 300 apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || { timeout 120 apt-get update -qq && timeout 300 apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }
}

write_config() {
  mkdir -p "$STATE"/{munge,ctld,log,spool}
  chmod 700 "$STATE/munge"
  if [ ! -s "$STATE/munge/munge.key" ]; then
    # Our own key: this cluster never trusts (or is trusted by) a real one on the same host.
    dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$STATE/munge/munge.key"
  fi
  local host; host="$(hostname -s)"
  cat > "$STATE/slurm.conf" <<EOF
# Written by slurm/dev-cluster/start.sh; two fake nodes on this host.
ClusterName=trellisdev
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=10: a requeued job restarts after ~10 s instead of ~2 minutes.
AuthInfo=socket=$STATE/munge/munge.socket,cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
# No cgroups in containers: track processes by parent pid.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Fake nodes advertise the configured CPUs, not the host's.
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
JobRequeue=1
# Keep finished jobs visible to scontrol for an hour (no accounting database: scontrol is how we read exit codes).
MinJobAge=3600
# Time the ranks get between SIGTERM (scancel, scontrol requeue) and SIGKILL: enough to finish a step and save.
KillWait=30
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=n1 NodeAddr=127.0.0.1 NodeHostname=$host Port=$((PORT + 1)) CPUs=$CPUS State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.1 NodeHostname=$host Port=$((PORT + 2)) CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
}

start_daemons() {
  export SLURM_CONF="$STATE/slurm.conf"
  if ! alive "$STATE/munged.pid"; then
    munged --force --key-file="$STATE/munge/munge.key" --socket="$STATE/munge/munge.socket" \
      --pid-file="$STATE/munged.pid" --log-file="$STATE/log/munged.log" --seed-file="$STATE/munge/munge.seed"
  fi
  if ! alive "$STATE/slurmctld.pid"; then
    # -c: fresh state, so job ids restart at 1 (never reuse a submitit folder across restarts).
    slurmctld -c -f "$SLURM_CONF"
  fi
  for n in "${NODES[@]}"; do
    mkdir -p "$STATE/spool/$n"
    alive "$STATE/slurmd-$n.pid" || slurmd -N "$n" -f "$SLURM_CONF"
  done
}

wait_idle() {
  local deadline=$((SECONDS + WAIT_S)) out=""
  while [ $SECONDS -lt $deadline ]; do
    out="$(sinfo -h -N -p debug -o '%N %t' 2>/dev/null || true)"
    if [ "$(grep -cE ' (idle|mix|alloc)$' <<<"$out")" -eq ${#NODES[@]} ]; then
      log "up: $(tr '\n' ' ' <<<"$out")"; return 0
    fi
    # Nodes left down/drained by an earlier run of this cluster come back once resumed.
    grep -qE ' (down|drain|drng)\*?$' <<<"$out" && scontrol update nodename=n1,n2 state=resume 2>/dev/null || true
    sleep 1
  done
  log "nodes not idle after ${WAIT_S}s: ${out:-no answer from slurmctld}; logs in $STATE/log"; exit 4
}

install_missing
write_config
start_daemons
wait_idle
echo "export SLURM_CONF=$STATE/slurm.conf"
