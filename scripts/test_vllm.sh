#!/usr/bin/env bash
# vLLM on CPU, end to end, in .venv-vllm (built by scripts/setup.sh --vllm; VLLM_VENV=DIR puts it elsewhere):
# the vllm_cpu plugin's tests, `swift rlhf --use_vllm true --vllm_mode colocate` runs (weight sync, CISPO_ANCHOR=rollout,
# the four rollout IS modes, plugin vs built-in), the CPU colocate example, and SmolLM2-135M-Instruct when
# `python -m cispo_swift model smollm2` can provide it (or SMOLLM2_DIR points at its checkpoint).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --vllm
VENV=${VLLM_VENV:-.venv-vllm}
export MODELSCOPE_OFFLINE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_vllm_cpu.py tests/test_vllm_e2e.py "$@"
