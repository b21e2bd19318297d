#!/usr/bin/env bash
# The CPU demo in one command, from a fresh clone: set up .venv, build the tiny model and data under runs/demo/,
# train it with CISPO through `swift rlhf` (examples/tiny_cpu.sh), print first-vs-last reward and the CISPO
# metrics, and draw runs/demo/curves.png. About a minute after setup on 2 CPU cores.
# Arguments go to swift rlhf (e.g. --max_steps 50); CISPO_* options reach the plugin through the environment.
# PLUGIN=none trains with swift's built-in cispo instead of the plugin.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash scripts/setup.sh
# This clone's venv and package, whatever else is on the paths.
export PATH="$ROOT/.venv/bin:$PATH"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export MODELSCOPE_OFFLINE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
DEMO=${DEMO_DIR:-$ROOT/runs/demo}

t0=$SECONDS
python -m cispo_swift.demo.tiny --out "$DEMO" > /dev/null
echo "tiny model and data in $DEMO ($((SECONDS - t0)) s)"

t0=$SECONDS
echo "training with swift rlhf (log: $DEMO/train.log) ..."
if ! MODEL_DIR="$DEMO/model" DATA="$DEMO/data/train.jsonl" OUTPUT_DIR="$DEMO/output" \
    bash examples/tiny_cpu.sh "$@" > "$DEMO/train.log" 2>&1; then
  tail -n 40 "$DEMO/train.log"
  echo "swift rlhf failed; full log: $DEMO/train.log" >&2
  exit 1
fi
echo "trained in $((SECONDS - t0)) s"

# swift writes each run to a new $DEMO/output/vN-TIMESTAMP/; both commands read the newest.
python -m cispo_swift summary "$DEMO/output"
python -m cispo_swift plot "$DEMO/output" -o "$DEMO/curves.png" --title 'CISPO on the tiny CPU model (letter task)'
