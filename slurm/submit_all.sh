#!/usr/bin/env bash
# Submit the whole pipeline as a chain of SLURM jobs, each starting only if the previous one succeeded
# (--dependency=afterok):
#   1. data preparation, an array (slurm/prepare_data.sbatch, task i of n tokenizes its share of the inputs)
#   2. join + validate (slurm/prepare_data.sbatch join): manifest.json, every checksum checked
#   3. distillation (slurm/pretrain.sbatch): multi-node DeepSpeed, checkpoints, requeued on preemption
#   4. export + evaluate (one small job): launch/export.py RUN_DIR EXPORT_DIR, then launch/evaluate.py on the
#      validation split (student, and the teacher for comparison) -> EXPORT_DIR/eval.json
#   5. optional, when GLUE_TASKS is set (all, or e.g. sst2,mrpc): the GLUE suite on the export (slurm/glue.sbatch)
#      -> EXPORT_DIR/glue/glue.json; GLUE_SBATCH_ARGS adds sbatch options for it
# A requeued pretrain job (preemption, time limit) keeps its job id, so job 4 still waits for it to finish.
#
# Usage (from anywhere; the jobs run from the repository root, which must be on a shared file system):
#   bash slurm/submit_all.sh --data /scratch/wikibooks --run-dir /scratch/runs/distilbert --nodes 4 \
#       --prepare-args "--input /data/wiki/ --input /data/books/ --tokenizer bert-base-uncased" \
#       -- optimizer.lr=3e-4 batch.micro_size=32          # after --: recipe overrides for launch/pretrain.py
#   bash slurm/submit_all.sh --skip-prepare --data /scratch/wikibooks ...   # data already prepared: jobs 3 and 4
#   bash slurm/submit_all.sh --dry-run ...                # print the sbatch commands, submit nothing
#
# Options: --data DIR (required: prepared dataset, or where to prepare it), --run-dir DIR (default runs/JOB_NAME),
#   --nodes N (pretrain nodes, default 2), --array A-B (preparation tasks, default 0-15), --prepare-args "ARGS"
#   (launch/prepare_data.py arguments besides --output, split on spaces, no quoting or globbing: give folders
#   rather than patterns), --eval-args "ARGS" (launch/evaluate.py arguments), --skip-prepare, --dry-run.
# Settings (environment, with defaults): JOB_NAME (distil: the pretrain job's name, and the default run dir),
#   SBATCH_ARGS (options for every job, e.g. "--account=X --partition=gpu"; split on spaces),
#   PREPARE_SBATCH_ARGS, PRETRAIN_SBATCH_ARGS, EXPORT_SBATCH_ARGS (options for one stage, e.g. PRETRAIN_SBATCH_ARGS=
#   "--time=48:00:00 --gpus-per-node=4"; they come after this script's defaults, so they win), LOG_DIR (logs: every
#   job's .out file, and pretrain.sbatch's per-job folder), EXPORT_DIR ($RUN_DIR/export), EVAL_TEACHER (the teacher.name_or_path
#   override if given, else bert-base-uncased for the distilbert_base recipe, else none), PYTHON (python; VENV/bin/python
#   if VENV is set). Everything else in the environment (RECIPE, DS_CONFIG, VENV, NCCL_*, ...) reaches the jobs
#   (sbatch --export=ALL); see slurm/pretrain.sbatch for its settings.
# A failed preparation task: fix the cause, then `bash slurm/requeue_prepare.sh <array id> <task>`; the chain goes on.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }

JOB_NAME=${JOB_NAME:-distil}
LOG_DIR=${LOG_DIR:-logs}
export LOG_DIR
data="" run_dir="" nodes=2 array=0-15 prepare_args="" eval_args="" skip_prepare=0 dry_run=0
while [ $# -gt 0 ]; do
  case $1 in
    --data) data=$2; shift 2 ;;
    --run-dir) run_dir=$2; shift 2 ;;
    --nodes) nodes=$2; shift 2 ;;
    --array) array=$2; shift 2 ;;
    --prepare-args) prepare_args=$2; shift 2 ;;
    --eval-args) eval_args=$2; shift 2 ;;
    --skip-prepare) skip_prepare=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage ;;
    --) shift; break ;;
    *) echo "unknown option $1 (recipe overrides go after --)" >&2; exit 2 ;;
  esac
done
overrides=("$@")
[ -n "$data" ] || { echo "give --data DIR (the prepared dataset, or where to prepare it)" >&2; exit 2; }
run_dir=${run_dir:-runs/$JOB_NAME}
export_dir=${EXPORT_DIR:-$run_dir/export}
for v in "$data" "$run_dir"; do
  case $v in *,*) echo "paths with commas cannot go through sbatch --export: $v" >&2; exit 2 ;; esac
done
if [ -n "${VENV:-}" ]; then PYTHON=${PYTHON:-$VENV/bin/python}; fi
PYTHON=${PYTHON:-python}

# Split option strings on spaces without globbing ('*' stays '*').
read -r -a sbatch_all <<< "${SBATCH_ARGS:-}"
read -r -a sbatch_prepare <<< "${PREPARE_SBATCH_ARGS:-}"
read -r -a sbatch_pretrain <<< "${PRETRAIN_SBATCH_ARGS:-}"
read -r -a sbatch_export <<< "${EXPORT_SBATCH_ARGS:-}"
read -r -a prepare <<< "$prepare_args"
read -r -a evaluate <<< "$eval_args"

# The teacher and sequence length for the evaluation: from the overrides, else the recipe's defaults.
teacher=${EVAL_TEACHER:-} seq_len=""
for o in "${overrides[@]}"; do
  case $o in
    teacher.name_or_path=*) teacher=${EVAL_TEACHER:-${o#*=}} ;;
    data.seq_len=*) seq_len=${o#*=} ;;
  esac
done
if [ "${RECIPE:-distilbert_base}" = distilbert_base ]; then
  teacher=${teacher:-bert-base-uncased}
  seq_len=${seq_len:-512}
fi
eval_cmd=("$PYTHON" launch/evaluate.py --data "$data" --output "$export_dir/eval.json")
if [ -n "$teacher" ] && [ "$teacher" != null ]; then eval_cmd+=(--teacher "$teacher"); fi
if [ -n "$seq_len" ]; then eval_cmd+=(--seq-len "$seq_len"); fi
eval_cmd+=("${evaluate[@]}" "$export_dir")
# sbatch --wrap runs its command under /bin/sh (dash on Debian and Ubuntu): POSIX only, so no pipefail and no
# bash quoting ($'...' from printf %q); each word in single quotes.
shquote() {
  local a out=""
  for a in "$@"; do out+="'${a//\'/\'\\\'\'}' "; done
  printf '%s' "$out"
}
wrap="set -eu; $(shquote "$PYTHON" launch/export.py "$run_dir" "$export_dir"); $(shquote "${eval_cmd[@]}")"

# submit NAME ARGS...: sbatch --parsable ARGS, the job id on stdout (with --dry-run: the command on stderr, and
# <NAME> as the id).
submit() {
  local name=$1 out
  shift
  if [ "$dry_run" = 1 ]; then
    local a line="sbatch --parsable"
    for a in "$@"; do
      if [[ $a =~ ^[A-Za-z0-9_./=:,@%+-]+$ ]]; then line+=" $a"; else line+=" $(printf '%q' "$a")"; fi
    done
    echo "$line" >&2
    echo "<$name>"
    return
  fi
  out=$(sbatch --parsable "$@")
  echo "${out%%;*}"  # "jobid;cluster" on federated setups
}
# A dry run prints the commands on stdout (each submit's stderr), the ids go to the variables.
if [ "$dry_run" = 1 ]; then exec 2>&1; else mkdir -p "$LOG_DIR"; fi

after=()
if [ "$skip_prepare" = 0 ]; then
  # This script's defaults first, the user's options after them: sbatch takes the last value of an option.
  jid_prepare=$(submit prepare --output="$LOG_DIR/%x-%A_%a.out" "${sbatch_all[@]}" "${sbatch_prepare[@]}" \
    --array="$array" slurm/prepare_data.sbatch --output "$data" "${prepare[@]}")
  jid_join=$(submit join --job-name=prepare-join --cpus-per-task=4 --output="$LOG_DIR/%x-%j.out" "${sbatch_all[@]}" \
    "${sbatch_prepare[@]}" --dependency=afterok:"$jid_prepare" slurm/prepare_data.sbatch join "$data")
  after=(--dependency=afterok:"$jid_join")
  echo "prepare: array $jid_prepare (tasks $array) -> join/validate $jid_join -> $data"
fi
jid_train=$(submit pretrain --output="$LOG_DIR/%x-%j.out" "${sbatch_all[@]}" "${sbatch_pretrain[@]}" \
  --job-name="$JOB_NAME" --nodes="$nodes" --export=ALL,DATA="$data",RUN_DIR="$run_dir" "${after[@]}" \
  slurm/pretrain.sbatch "${overrides[@]}")
echo "pretrain: $jid_train ($nodes nodes) -> $run_dir ($LOG_DIR/$JOB_NAME-$jid_train.out)"
jid_export=$(submit export --job-name="$JOB_NAME-export" --nodes=1 --ntasks=1 --gpus-per-node=1 --cpus-per-task=8 \
  --time=01:00:00 --output="$LOG_DIR/%x-%j.out" "${sbatch_all[@]}" "${sbatch_export[@]}" \
  --dependency=afterok:"$jid_train" --wrap="$wrap")
echo "export/evaluate: $jid_export -> $export_dir, $export_dir/eval.json"
if [ -n "${GLUE_TASKS:-}" ]; then  # GLUE_TASKS itself reaches the job through --export=ALL
  read -r -a sbatch_glue <<< "${GLUE_SBATCH_ARGS:-}"
  jid_glue=$(submit glue "${sbatch_all[@]}" "${sbatch_glue[@]}" --export=ALL,MODEL="$export_dir" \
    --dependency=afterok:"$jid_export" slurm/glue.sbatch)
  echo "glue: $jid_glue ($GLUE_TASKS) -> $export_dir/glue/glue.json"
fi
echo "jobs: ${jid_prepare:+$jid_prepare $jid_join }$jid_train $jid_export${jid_glue:+ $jid_glue}   (squeue --me; scancel to stop the chain)"
