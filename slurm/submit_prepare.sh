#!/usr/bin/env bash
# Submit the data-preparation array and its join/validate job (which runs only if every task succeeded).
#
# Usage: bash slurm/submit_prepare.sh [--array 0-15] [--sbatch-args "--partition=cpu --account=X"] -- \
#            --input '/data/wiki/*.jsonl.zst' --output /scratch/wikibooks [more prepare_data.py arguments]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ARRAY=${ARRAY:-0-15}
SBATCH_ARGS=${SBATCH_ARGS:-}
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
mkdir -p logs
# shellcheck disable=SC2086  # SBATCH_ARGS is a list of options
jid=$(sbatch --parsable $SBATCH_ARGS --array="$ARRAY" slurm/prepare_data.sbatch "$@")
# shellcheck disable=SC2086
jid_join=$(sbatch --parsable $SBATCH_ARGS --job-name=prepare-join --cpus-per-task=4 \
  --dependency=afterok:"$jid" slurm/prepare_data.sbatch join "$out")
echo "submitted array $jid (tasks $ARRAY) and join/validate $jid_join -> $out"
