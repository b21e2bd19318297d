# CISPO (Clipped Importance Sampling Policy Optimization), MiniMax-M1: https://arxiv.org/abs/2506.13585
# Tiny CPU run: a 2-layer Qwen2 built in code learns the synthetic `letter` task (cispo_swift/demo/tasks.py);
# the reward goes from about 0.1 to about 1.0 in 200 steps (under a minute of training on 2 cores).
# Build the model and data first:  python -m cispo_swift.demo.tiny --out runs/tiny
# --epsilon_high is swift's absolute cap on the IS weight (w = min(r, 5.0)), not 1 + eps.
# --num_iterations 2 reuses each generation batch for a second step, so the ratio r is not identically 1.
# cispo_tiny_letter_exact has weight 0: logged as rewards/TinyLetterExact/mean (an accuracy), not trained on.
# --check_model false skips a model-hub query that retries for seconds without network.
# Built-in swift cispo instead of the plugin's:  PLUGIN=none bash examples/tiny_cpu.sh
# The plugin's own options are CISPO_* environment variables; they pass through to swift.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MODEL_DIR=${MODEL_DIR:-$ROOT/runs/tiny/model}
DATA=${DATA:-$ROOT/runs/tiny/data/train.jsonl}
OUTPUT_DIR=${OUTPUT_DIR:-$ROOT/runs/tiny/output}
PLUGIN=${PLUGIN:-$(python -m cispo_swift plugin-path)} || exit 1
TASKS_PLUGIN=${TASKS_PLUGIN:-$(python -m cispo_swift plugin-path --tasks)} || exit 1
PLUGINS=("$TASKS_PLUGIN")
[ "$PLUGIN" = none ] || PLUGINS=("$PLUGIN" "${PLUGINS[@]}")
export MODELSCOPE_OFFLINE=1
export HF_HUB_OFFLINE=1
export CUDA_VISIBLE_DEVICES=''
# One thread: the model is tiny, and on a shared 2-core machine extra threads spin against other jobs
# (measured 87 s vs 5 s of training for 100 steps under load).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

swift rlhf \
    --rlhf_type grpo \
    --model "$MODEL_DIR" \
    --model_type qwen2 \
    --template qwen \
    --torch_dtype float32 \
    --tuner_type full \
    --dataset "$DATA" \
    --external_plugins "${PLUGINS[@]}" \
    --reward_funcs cispo_tiny_letter cispo_tiny_letter_exact \
    --reward_weights 1 0 \
    --loss_type cispo \
    --epsilon_high 5.0 \
    --beta 0 \
    --num_iterations 2 \
    --num_generations 8 \
    --per_device_train_batch_size 16 \
    --gradient_accumulation_steps 1 \
    --max_completion_length 16 \
    --temperature 1.0 \
    --learning_rate 1e-3 \
    --lr_scheduler_type constant \
    --warmup_ratio 0 \
    --max_steps 200 \
    --logging_steps 1 \
    --save_strategy no \
    --report_to none \
    --log_completions true \
    --dataloader_num_workers 0 \
    --dataset_num_proc 1 \
    --seed 42 \
    --check_model false \
    --output_dir "$OUTPUT_DIR" \
    "$@"
