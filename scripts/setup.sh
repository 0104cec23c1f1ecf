#!/usr/bin/env bash
# Creates .venv and installs chuanliu into it. Usage: scripts/setup.sh [extra,...]   (e.g. "test")
# On a machine without an NVIDIA GPU the CPU build torch==2.13.0 is installed first, so that resolving
# chuanliu's "torch>=2.4" finds it satisfied and never downloads a CUDA build. With a GPU, pip picks torch.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
venv="${VENV:-.venv}"
python="${PYTHON:-$(command -v python3.11 || command -v python3)}"
stamp="$venv/.chuanliu-installed${extras:+-$extras}"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then exit 0; fi

"$python" - <<'PY' || { echo "chuanliu needs Python >= 3.10 (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)
PY
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] NVIDIA GPU found: pip resolves a CUDA build of torch"
    spec=".${extras:+[$extras,gpu]}"; [ -n "$extras" ] || spec=".[gpu]"
    # flash-attn builds against the installed torch; install torch first, then the rest.
    "${pip[@]}" "torch>=2.4"
    "${pip[@]}" --no-build-isolation -e "$spec" || { echo "[setup] GPU extras failed; installing without them" >&2; "${pip[@]}" -e ".${extras:+[$extras]}"; }
else
    echo "[setup] no GPU: installing the CPU build torch==2.13.0"
    "${pip[@]}" "torch==2.13.0"
    "${pip[@]}" -e ".${extras:+[$extras]}"
fi
touch "$stamp"
