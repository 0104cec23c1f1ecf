#!/usr/bin/env bash
# Creates .venv and installs chuanliu into it (editable). Usage: scripts/setup.sh [extras]   e.g. "test"
#
# Without an NVIDIA GPU, the CPU build torch==2.13.0 is installed first, so resolving chuanliu's "torch>=2.4"
# finds it satisfied and never downloads a multi-GB CUDA build. With a GPU, pip resolves torch (a CUDA build);
# CHUANLIU_GPU_EXTRAS=1 also installs the GPU-only kernels (flash-attn, triton), which may compile for a while.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
venv="${VENV:-.venv}"
python="${PYTHON:-$(command -v python3.11 || command -v python3)}"
stamp="$venv/.chuanliu-installed${extras:+-$extras}"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt "$0" ]; then exit 0; fi

"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "chuanliu needs Python >= 3.11; set PYTHON=/path/to/python3.11" >&2; exit 1; }
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
export DS_BUILD_OPS="${DS_BUILD_OPS:-0}"  # DeepSpeed without prebuilt C++ ops: ZeRO with torch's AdamW needs none
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] NVIDIA GPU found: pip resolves a CUDA build of torch"
    "${pip[@]}" "torch>=2.4"
    if [ "${CHUANLIU_GPU_EXTRAS:-0}" = 1 ]; then
        # flash-attn builds against the installed torch, hence no build isolation.
        "${pip[@]}" --no-build-isolation ".[gpu]" \
            || echo "[setup] GPU extras failed to install; chuanliu runs without them (fusion=auto skips them)" >&2
    fi
else
    echo "[setup] no GPU: installing the CPU build torch==2.13.0"
    "${pip[@]}" "torch==2.13.0"
fi
"${pip[@]}" -e ".${extras:+[$extras]}"
touch "$stamp"
echo "[setup] done: $venv"
