#!/usr/bin/env bash
# Install the pipeline and its test dependencies into a virtual environment (default: .venv).
#
#   bash launch/install.sh            # CPU machine: torch==2.13.0 CPU build, then the project
#   TORCH_SPEC=torch bash launch/install.sh   # GPU cluster: let pip pick the CUDA build
#
# Settings (environment): VENV (folder, default .venv; set VENV=none to use the active Python),
# PYTHON (interpreter for the venv, default python3), TORCH_SPEC (default torch==2.13.0).
#
# The venv gets its own folder for DeepSpeed's just-in-time built ops, $VENV/torch_extensions (an explicit
# TORCH_EXTENSIONS_DIR still wins). Two environments sharing torch's default ~/.cache/torch_extensions rebuild the
# CPU all-reduce op (built at every start-up) under each other, and a rank that loads a half-written build dies
# in native code.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ "$VENV" != none ]; then
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  PY="$VENV/bin/python"
else
  PY=$(command -v python)
fi
"$PY" -m pip install --quiet --upgrade pip
# torch first and pinned: an unpinned torch (asked for by deepspeed or sentence-transformers)
# would pull several GB of CUDA wheels onto a CPU machine.
"$PY" -m pip install --quiet "$TORCH_SPEC"
"$PY" -m pip install --quiet -e ".[test]"
if [ "$VENV" != none ]; then
  # A .pth line runs at every start of this interpreter, so the ranks a launcher starts get the setting too.
  SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo 'import os, sys; os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))' \
    > "$SITE/distil_torch_extensions.pth"
fi
echo "installed into $("$PY" -c 'import sys; print(sys.prefix)')"
