# CISPO (Clipped Importance Sampling Policy Optimization), MiniMax-M1: https://arxiv.org/abs/2506.13585
# LoRA on one GPU: Qwen2.5-7B-Instruct, accuracy reward on AI-MO/NuminaMath-TIR, vLLM colocated (sleeps during the
# training step). Sized for one 80 GiB GPU (not measured here); lower --vllm_gpu_memory_utilization,
# --max_completion_length or --per_device_train_batch_size for less.
# Needs: pip install -e . (cispo-swift), vllm, math_verify (swift's `accuracy` reward).
# Not run in this project's CI (no GPU there); tests/test_examples.py checks every flag against swift's parser.
# --epsilon_high 5.0 is the absolute cap of the detached weight, w = sg(min(r, 5)), not 1 + ε.
# --steps_per_generation 4: four optimizer steps per generation batch, so the ratio r moves away from 1.
# CISPO_FP32_LM_HEAD=1 computes the logits in FP32 (bf16 model, vLLM sampling); LoRA's all-linear leaves lm_head out,
# as the FP32 head requires.
PLUGIN=${PLUGIN:-$(python -m cispo_swift plugin-path)} || exit 1

CUDA_VISIBLE_DEVICES=0 \
CISPO_FP32_LM_HEAD=1 \
swift rlhf \
    --rlhf_type grpo \
    --model Qwen/Qwen2.5-7B-Instruct \
    --tuner_type lora \
    --lora_rank 16 \
    --lora_alpha 32 \
    --target_modules all-linear \
    --torch_dtype bfloat16 \
    --dataset AI-MO/NuminaMath-TIR#5000 \
    --load_from_cache_file true \
    --external_plugins "$PLUGIN" \
    --reward_funcs accuracy \
    --loss_type cispo \
    --epsilon_high 5.0 \
    --beta 0 \
    --num_generations 8 \
    --per_device_train_batch_size 8 \
    --gradient_accumulation_steps 1 \
    --steps_per_generation 4 \
    --max_completion_length 2048 \
    --temperature 1.0 \
    --use_vllm true \
    --vllm_mode colocate \
    --vllm_gpu_memory_utilization 0.4 \
    --vllm_max_model_len 3072 \
    --sleep_level 1 \
    --gradient_checkpointing true \
    --learning_rate 1e-5 \
    --warmup_ratio 0.05 \
    --num_train_epochs 1 \
    --logging_steps 1 \
    --log_completions true \
    --save_steps 100 \
    --save_total_limit 2 \
    --report_to tensorboard \
    --dataloader_num_workers 4 \
    --output_dir output/cispo_qwen2.5_7b_lora \
    "$@"
