#!/usr/bin/env bash
# Set up the environment (idempotent) and pass the checks: ruff lint + format, then the whole pytest suite.
# Extra arguments go to pytest (e.g. `scripts/test.sh -m "not slow"` for the fast tests only).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MODELSCOPE_OFFLINE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
# The oldest supported ms-swift (4.5.3), fast tests, in its own venv.
bash scripts/test_oldest.sh
