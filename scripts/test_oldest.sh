#!/usr/bin/env bash
# Run the fast tests against the oldest supported ms-swift (4.5.3, requirements-swift45.lock) in .venv-swift45.
# Idempotent like setup.sh: the venv is built once and rebuilt only when the lock or pyproject.toml changes.
# Extra arguments go to pytest (default: the whole tests/ directory without the slow end-to-end tests).
# SWIFT45_VENV=DIR puts the venv elsewhere (e.g. outside a CI clone, so that it survives between runs).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${SWIFT45_VENV:-.venv-swift45}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp=$VENV/.cispo-setup-stamp
want=$(cat requirements-swift45.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  # torch first and alone: pip takes the CPU build from the local wheel directory (see setup.sh).
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements-swift45.lock
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e .
  echo "$want" > "$stamp"
fi
"$VENV/bin/python" -c 'import swift.version, transformers; print(f"ms-swift {swift.version.__version__}, transformers {transformers.__version__}")'
export MODELSCOPE_OFFLINE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider -m 'not slow' "$@"
