#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, in one folder: munged, slurmctld and slurmd on localhost, for
# trying the SLURM scripts on a laptop or a CI machine, and for the tests in tests/slurm/.
#
# Usage:
#   bash slurm/local_cluster.sh install        # apt-get install slurm-wlm munge (as root), when missing
#   bash slurm/local_cluster.sh start DIR      # write DIR/slurm.conf, start the daemons, wait for the node to be idle
#   export SLURM_CONF=DIR/slurm.conf           # every sbatch/squeue/scontrol/scancel then talks to this cluster
#   bash slurm/local_cluster.sh stop DIR       # stop the daemons and the jobs they run (DIR stays, with the logs)
#   bash slurm/local_cluster.sh status DIR     # 0 when the node answers, with `sinfo`'s line
#
# The cluster: one node `localhost` in partition `local`, declaring CPUS CPUs (default 16), GPUS count-only GPUs
# (default 8; gres files are symbolic links to /dev/null, so `--gpus-per-node` is accepted and SLURM sets
# CUDA_VISIBLE_DEVICES, but there is no GPU behind them) and REAL_MEMORY_MB of memory (default 512000), whatever
# the machine has (SlurmdParameters=config_overrides). Processes are tracked by /proc (proctrack/linuxproc,
# task/none: no cgroups needed). JobRequeue=1; a requeued job may start again after cred_expire=10 s (121 s by
# default); the scheduler runs every second. No slurmdbd: `sacct` has no data (AccountingStorageType=none); each
# finished job is appended to DIR/jobcomp.txt (jobcomp/filetxt) and `scontrol show job` keeps finished jobs for
# MinJobAge=1800 s. Jobs run as the user who starts the cluster (root on a CI machine; as another user slurmd can
# only run that user's jobs, which is all a laptop needs).
#
# Settings (environment): CPUS, GPUS, REAL_MEMORY_MB, SLURMCTLD_PORT and SLURMD_PORT (default: free ports),
# START_TIMEOUT_S (60).
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"  # the daemons live there, which a user's PATH often lacks

die() { echo "local_cluster.sh: $*" >&2; exit 1; }

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

install_packages() {
  local missing=()
  command -v slurmctld >/dev/null 2>&1 || missing+=(slurmctld)
  command -v slurmd >/dev/null 2>&1 || missing+=(slurmd)
  command -v sbatch >/dev/null 2>&1 || missing+=(slurm-client)
  command -v munged >/dev/null 2>&1 || missing+=(munge)
  [ ${#missing[@]} -gt 0 ] || return 0
  [ "$(id -u)" = 0 ] || die "missing ${missing[*]}: run 'sudo apt-get install -y slurm-wlm munge' (or as root: $0 install)"
  command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get: install SLURM and munge by hand"
  echo "installing ${missing[*]} with apt-get" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

write_config() {
  local dir=$1 user ctld_port slurmd_port cpus gpus mem i
  user=$(id -un)
  ctld_port=${SLURMCTLD_PORT:-$(free_port)}
  slurmd_port=${SLURMD_PORT:-$(free_port)}
  cpus=${CPUS:-16} gpus=${GPUS:-8} mem=${REAL_MEMORY_MB:-512000}
  mkdir -p "$dir"/{munge,state,spool/slurmd-localhost,log,gpu}
  rm -f "$dir"/gpu/*
  for ((i = 0; i < gpus; i++)); do ln -s /dev/null "$dir/gpu/nvidia$i"; done
  cat > "$dir/slurm.conf" <<EOF
# Written by slurm/local_cluster.sh: a single-node cluster on localhost.
ClusterName=local
SlurmctldHost=localhost
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/slurmd-%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$dir/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
GresTypes=gpu
SlurmdParameters=config_overrides
JobRequeue=1
MailProg=/bin/true
ReturnToService=2
MinJobAge=1800
KillWait=30
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/jobcomp.txt
JobAcctGatherType=jobacct_gather/none
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem Gres=gpu:$gpus State=UNKNOWN
PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
  : > "$dir/plugstack.conf"
  if [ "$gpus" -gt 0 ]; then
    echo "NodeName=localhost Name=gpu File=$dir/gpu/nvidia[0-$((gpus - 1))]" > "$dir/gres.conf"
  else
    : > "$dir/gres.conf"
  fi
  # munged refuses a key readable by others; clients need to reach the socket (the folder must be 755).
  if [ ! -s "$dir/munge/munge.key" ]; then
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
  fi
  chmod 700 "$dir/munge"
  chmod 400 "$dir/munge/munge.key"
  chmod 755 "$dir" "$dir/munge"
}

wait_idle() {
  local dir=$1 deadline state
  deadline=$((SECONDS + ${START_TIMEOUT_S:-60}))
  while [ $SECONDS -lt $deadline ]; do
    state=$(SLURM_CONF="$dir/slurm.conf" sinfo -h -n localhost -o %T 2>/dev/null || true)
    case $state in
      idle|mixed|allocated) return 0 ;;
      down*|drain*)  # a restart on an existing state folder: bring the node back
        SLURM_CONF="$dir/slurm.conf" scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
  done
  echo "local_cluster.sh: the node did not become idle in ${START_TIMEOUT_S:-60} s (state: ${state:-no answer})" >&2
  tail -n 20 "$dir"/log/*.log >&2 || true
  return 1
}

start() {
  local dir
  dir=$(mkdir -p "$1" && cd "$1" && pwd)
  for b in munged slurmctld slurmd sbatch; do
    command -v "$b" >/dev/null 2>&1 || die "$b not found: bash $0 install (as root), or apt-get install slurm-wlm munge"
  done
  stop "$dir" 2>/dev/null || true
  write_config "$dir"
  munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed" \
    || die "munged did not start: $(tail -n 5 "$dir/log/munged.log" 2>/dev/null)"
  chmod 755 "$dir/munge"
  SLURM_CONF="$dir/slurm.conf" slurmctld -f "$dir/slurm.conf" -i \
    || die "slurmctld did not start: $(tail -n 5 "$dir/log/slurmctld.log" 2>/dev/null)"
  SLURM_CONF="$dir/slurm.conf" slurmd -f "$dir/slurm.conf" -N localhost \
    || die "slurmd did not start: $(tail -n 5 "$dir/log/slurmd.log" 2>/dev/null)"
  wait_idle "$dir"
  echo "cluster up: export SLURM_CONF=$dir/slurm.conf"
}

stop_pidfile() {
  local pidfile=$1 pid i
  [ -s "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null || { rm -f "$pidfile"; return 0; }
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$pidfile"
}

stop() {
  local dir=$1
  [ -d "$dir" ] || return 0
  dir=$(cd "$dir" && pwd)
  if [ -f "$dir/slurm.conf" ] && [ -s "$dir/slurmctld.pid" ]; then
    # end the jobs first, so that no job step outlives the cluster
    SLURM_CONF="$dir/slurm.conf" scancel --full --user="$(id -un)" 2>/dev/null || true
    local i
    for ((i = 0; i < 80; i++)); do  # KillWait (30 s) and a margin
      [ -n "$(SLURM_CONF="$dir/slurm.conf" squeue -h -t R,CG -o %i 2>/dev/null)" ] || break
      sleep 0.5
    done
  fi
  stop_pidfile "$dir/slurmd.pid"
  stop_pidfile "$dir/slurmctld.pid"
  stop_pidfile "$dir/munge/munged.pid"
  pkill_steps "$dir"
}

# slurmstepd processes of this cluster that are left (slurmd stopped while a job was ending): they carry this
# cluster's SLURM_CONF in their environment.
pkill_steps() {
  local dir=$1 pid
  for pid in $(pgrep slurmstepd || true); do
    if tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | grep -qx "SLURM_CONF=$dir/slurm.conf"; then
      kill -9 "$pid" 2>/dev/null || true
    fi
  done
}

status() {
  local dir=$1
  [ -f "$dir/slurm.conf" ] || die "no cluster in $dir"
  SLURM_CONF="$dir/slurm.conf" sinfo -h -N -o '%N %T %c CPUs %G'
}

case ${1:-} in
  install) install_packages ;;
  start) [ -n "${2:-}" ] || die "usage: $0 start DIR"; install_packages; start "$2" ;;
  stop) [ -n "${2:-}" ] || die "usage: $0 stop DIR"; stop "$2" ;;
  status) [ -n "${2:-}" ] || die "usage: $0 status DIR"; status "$2" ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
esac
