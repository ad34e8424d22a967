#!/usr/bin/env bash
# Rerun failed tasks of a data-preparation array, and let the jobs waiting on the array (the join, and through it
# the rest of the chain) go on once they succeed.
#
# Usage: bash slurm/requeue_prepare.sh ARRAY_JOB_ID TASK [TASK ...]
#   e.g. bash slurm/requeue_prepare.sh 1234 7      # task 7 of array 1234 failed; fix the cause first
#
# Why not only `scontrol requeue 1234_7`: SLURM marks an `afterok:1234` dependency as never satisfiable as soon as
# one task fails, and does not revisit it when the task is requeued and succeeds (the join job stays pending with
# reason DependencyNeverSatisfied). So this script requeues the tasks, then gives every pending job that waits on
# the array a dependency on each task of the array (`afterok:1234_0:1234_1:...`), which SLURM evaluates afresh.
# A rerun task skips the units it had finished (verified) and redoes the partial ones.
set -euo pipefail
[ $# -ge 2 ] || { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
array=$1
shift
case $array in *[!0-9]*) echo "ARRAY_JOB_ID must be the array's numeric job id, got $array" >&2; exit 2 ;; esac

for task in "$@"; do
  scontrol requeue "${array}_${task}"
  echo "requeued ${array}_${task}"
done

# Every task of the array, from SLURM's records of it (finished tasks are kept for MinJobAge, 300 s by default;
# a task no longer listed has finished long ago, successfully or not, and then its dependency is already decided).
# Tasks not yet started are one record with a range ("ArrayTaskId=3-15%4", "1,5-7", "0-14:2").
expand_tasks() {
  local spec part lo hi step
  while read -r spec; do
    spec=${spec%%%*}
    IFS=, read -r -a parts <<< "$spec"
    for part in "${parts[@]}"; do
      step=1
      case $part in *:*) step=${part#*:}; part=${part%%:*} ;; esac
      lo=${part%-*} hi=${part#*-}
      seq "$lo" "$step" "$hi"
    done
  done
}
mapfile -t tasks < <(scontrol show job -o "$array" | grep -o 'ArrayTaskId=[^ ]*' | cut -d= -f2 | expand_tasks \
  | sort -n -u)
[ ${#tasks[@]} -gt 0 ] || { echo "no task of array $array found (scontrol show job $array)" >&2; exit 1; }
dep="afterok"
for t in "${tasks[@]}"; do dep+=":${array}_${t}"; done

# Pending jobs whose dependency names the array: "afterok:1234_*(failed)" and the like.
renewed=0
while read -r job deps; do
  case $deps in
    *":${array}_"*|*":${array}("*|*":${array}") ;;
    *) continue ;;
  esac
  scontrol update jobid="$job" dependency="$dep"
  echo "job $job now waits on $dep"
  renewed=$((renewed + 1))
done < <(squeue -h -t PD -o '%i %E')
[ "$renewed" -gt 0 ] || echo "no pending job waits on array $array"
