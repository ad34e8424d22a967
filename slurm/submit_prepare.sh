#!/usr/bin/env bash
# Submit the data-preparation array and its join/validate job (which runs only if every task succeeded).
#
# Usage: bash slurm/submit_prepare.sh [--array 0-15] [--sbatch-args "--partition=cpu --account=X"] -- \
#            --input '/data/wiki/*.jsonl.zst' --output /scratch/wikibooks [more prepare_data.py arguments]
#
# --sbatch-args (or SBATCH_ARGS) go to both jobs and override the defaults below, the join's included. The join
# job asks 4 CPUs. Logs: LOG_DIR (default logs)/prepare-data-<array id>_<task>.out and
# LOG_DIR/prepare-join-<job id>.out. A failed task: bash slurm/requeue_prepare.sh <array id> <task>.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ARRAY=${ARRAY:-0-15}
SBATCH_ARGS=${SBATCH_ARGS:-}
LOG_DIR=${LOG_DIR:-logs}
while [ $# -gt 0 ]; do
  case $1 in
    --array) ARRAY=$2; shift 2 ;;
    --sbatch-args) SBATCH_ARGS=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "unknown option $1 (prepare_data.py arguments go after --)" >&2; exit 2 ;;
  esac
done
out=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case ${args[$i]} in
    --output|-o) out=${args[$((i + 1))]:-} ;;
    --output=*) out=${args[$i]#--output=} ;;
  esac
done
[ -n "$out" ] || { echo "give --output DIR after --" >&2; exit 2; }
read -r -a sbatch_args <<< "$SBATCH_ARGS"  # split on spaces, no globbing
mkdir -p "$LOG_DIR"
# Defaults first: sbatch takes the last value of an option, so the user's win.
jid=$(sbatch --parsable --output="$LOG_DIR/%x-%A_%a.out" "${sbatch_args[@]}" --array="$ARRAY" \
  slurm/prepare_data.sbatch "$@")
jid=${jid%%;*}
jid_join=$(sbatch --parsable --job-name=prepare-join --cpus-per-task=4 --output="$LOG_DIR/%x-%j.out" \
  "${sbatch_args[@]}" --dependency=afterok:"$jid" slurm/prepare_data.sbatch join "$out")
echo "submitted array $jid (tasks $ARRAY) and join/validate ${jid_join%%;*} -> $out"
