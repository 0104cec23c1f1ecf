#!/usr/bin/env bash
# Downloads into .whl/ the wheels `make gpu-check` needs and a bare GPU machine lacks: Python 3.12, x86-64, no
# dependencies resolved (each is named). The machine already has torch, triton, numpy, pyyaml, sentencepiece,
# pytest and pytest-timeout; deepspeed, megatron-core and wandb are not needed (chuanliu imports them lazily).
# Usage (on a machine with pip access): scripts/gpu_wheels.sh [DIR]   then carry DIR to the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-.whl}"
python="${PYTHON:-$(command -v python3)}"
mkdir -p "$dir"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do platforms+=(--platform "$p"); done
pip_dl=("$python" -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: --python-version 3.12
        --implementation cp "${platforms[@]}" -d "$dir")
"${pip_dl[@]}" "hydra-core==1.3.2" "omegaconf==2.3.0" "tqdm>=4.66"  # the entry points' configs
"${pip_dl[@]}" "liger-kernel==0.8.5" "torchao==0.18.0"                # fusion=liger and precision=fp8 rows
# omegaconf's parser runtime is published as a source archive only: build its (pure Python) wheel here.
"$python" -m pip wheel --disable-pip-version-check -q --no-deps -w "$dir" "antlr4-python3-runtime==4.9.3"
ls -1 "$dir"
