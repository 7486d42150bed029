#!/usr/bin/env bash
# The CUDA checks of the shared-prefix training forward, in one go, for a GPU machine whose Python has torch and
# transformers but no trl (the lent machines' image). Prepare the wheels once where pip works:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl trl==1.16.0
# then run this from the repository root with .whl carried. It checks parity (float32 and bf16) and times
# forward + backward, packed against per-row, for one ARPO-like group (bench/gpu_check.py). Not yet run on a GPU.
set -euo pipefail
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 bench/gpu_check.py "$@"
python3 bench/gpu_check.py --rows 32 --completion 3000 --max-tokens 65536 "$@"
