#!/usr/bin/env bash
# `make gpu-check`: the GPU check (experiments/gpu_check.py) with whatever Python the machine offers.
#   - a chuanliu .venv (scripts/setup.sh on a GPU machine) is used as is;
#   - otherwise the machine's python3 and torch, plus the wheels of scripts/gpu_wheels.sh found in .whl/ (or
#     $CHUANLIU_WHEELS), installed offline into a private directory on PYTHONPATH.
# Usage: scripts/gpu_check.sh [OUT_DIR] [extra experiments.gpu_check arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/gpu_check_$(date -u +%Y-%m-%d_%H-%M-%S)}"
shift || true
if [ -x .venv/bin/python ]; then
    python=.venv/bin/python
else
    python="$(command -v python3)"
    wheels="${CHUANLIU_WHEELS:-.whl}"
    if ! "$python" -c 'import hydra, omegaconf' 2>/dev/null; then
        ls "$wheels"/*.whl >/dev/null 2>&1 || { echo "[gpu-check] no .venv and no wheels in $wheels: run" \
            "scripts/gpu_wheels.sh where pip can download, and bring $wheels along" >&2; exit 1; }
        site="${TMPDIR:-/tmp}/chuanliu-site"
        "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
            "$wheels"/*.whl
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m experiments.gpu_check --out "$out" "$@"
