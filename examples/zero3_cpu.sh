# CISPO (Clipped Importance Sampling Policy Optimization), MiniMax-M1: https://arxiv.org/abs/2506.13585
# DeepSpeed ZeRO-3 on CPU: two processes (gloo) train the tiny model, the LM head fused and partitioned.
# Build the model and data first:  python -m cispo_swift.demo.tiny --out runs/tiny
# What the plugin does for this run (cispo_swift/deepspeed_cpu.py), while swift parses its arguments:
# - initialises DeepSpeed's distributed state with gloo: with --use_cpu true transformers never does, and ZeRO-3's
#   model loading (deepspeed.zero.Init) would see world size 1 and stop on its batch-size check;
# - refuses fp16 on a CPU without fp16 kernels (swift turns fp16 on for float32 models; DeepSpeed would reject it
#   after the model has loaded): hence --fp16 false.
# CISPO_FUSED_LOGPS=1 computes the log-probs and the CISPO loss inside the LM head's forward, where ZeRO-3 has gathered
# the head's partitioned weight, chunk by chunk, never holding the [tokens, vocab] logits (docs/distributed.md).
# DeepSpeed's first run on a machine compiles a shared-memory op with ninja (about 2.5 minutes, cached afterwards).
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MODEL_DIR=${MODEL_DIR:-$ROOT/runs/tiny/model}
DATA=${DATA:-$ROOT/runs/tiny/data/train.jsonl}
OUTPUT_DIR=${OUTPUT_DIR:-$ROOT/runs/zero3_cpu/output}
PLUGIN=$(python -m cispo_swift plugin-path) || exit 1
TASKS_PLUGIN=$(python -m cispo_swift plugin-path --tasks) || exit 1
export MODELSCOPE_OFFLINE=1
export HF_HUB_OFFLINE=1
export CUDA_VISIBLE_DEVICES=''
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export NPROC_PER_NODE=${NPROC_PER_NODE:-2}
export CISPO_FUSED_LOGPS=${CISPO_FUSED_LOGPS:-1}

swift rlhf \
    --rlhf_type grpo \
    --model "$MODEL_DIR" \
    --model_type qwen2 \
    --template qwen \
    --torch_dtype float32 \
    --fp16 false \
    --tuner_type full \
    --use_cpu true \
    --deepspeed zero3 \
    --dataset "$DATA" \
    --external_plugins "$PLUGIN" "$TASKS_PLUGIN" \
    --reward_funcs cispo_tiny_letter \
    --loss_type cispo \
    --epsilon_high 5.0 \
    --beta 0 \
    --num_iterations 2 \
    --num_generations 8 \
    --per_device_train_batch_size 8 \
    --gradient_accumulation_steps 1 \
    --max_completion_length 16 \
    --temperature 1.0 \
    --learning_rate 1e-3 \
    --lr_scheduler_type constant \
    --warmup_ratio 0 \
    --max_steps 50 \
    --logging_steps 1 \
    --save_strategy no \
    --report_to none \
    --dataloader_num_workers 0 \
    --dataset_num_proc 1 \
    --seed 42 \
    --check_model false \
    --output_dir "$OUTPUT_DIR" \
    "$@"
