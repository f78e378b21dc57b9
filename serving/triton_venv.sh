#!/usr/bin/env bash
# Create .venv-triton: a separate virtual environment holding nvidia-pytriton (a real
# Triton server 2.51 with the Python backend) for development and CI.
#
# Why a separate venv: pytriton needs numpy<2 (with numpy 2 the model loads but answers
# are empty), while the main venv runs numpy 2.  torch stays pinned to the CPU wheel.
#
# Usage: bash serving/triton_venv.sh [VENV_DIR]      (default .venv-triton; idempotent)
set -euo pipefail
VENV="${1:-.venv-triton}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
STAMP="$VENV/.ecomrec-triton-ok"
if [[ -f "$STAMP" ]]; then
    echo "triton venv: $VENV already complete ($(cat "$STAMP"))"
    exit 0
fi
start=$(date +%s)
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet \
    "nvidia-pytriton==0.7.0" "numpy<2" "torch==2.13.0" "onnxruntime" "onnx"
# smoke test: the import works and numpy is 1.x
"$VENV/bin/python" - <<'PYEOF'
import numpy, pytriton  # noqa: F401
assert numpy.__version__.startswith("1."), numpy.__version__
print("pytriton ok, numpy", numpy.__version__)
PYEOF
end=$(date +%s)
echo "installed in $((end - start)) s" | tee "$STAMP"
