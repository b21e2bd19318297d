#!/usr/bin/env bash
# The plugin under swift's Megatron CLI, on CPU, in .venv-megatron (built by scripts/setup.sh --megatron;
# MEGATRON_VENV=DIR puts it elsewhere): `megatron rlhf` with the plugin as far as it runs without a GPU (argument
# parsing, plugin loading, torch.distributed on gloo), and the patched Megatron GRPO loss on given tensors against
# swift's own loss and an independent reference. Transformer Engine is stubbed for import (tests/te_stub).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --megatron
VENV=${MEGATRON_VENV:-.venv-megatron}
export MODELSCOPE_OFFLINE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD/tests/te_stub${PYTHONPATH:+:$PYTHONPATH}"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_megatron.py "$@"
