# CISPO (Clipped IS-weight Policy Optimization), MiniMax-M1: https://arxiv.org/abs/2506.13585
# One node, 8 GPUs, DeepSpeed ZeRO-3, vLLM colocated with the trainer (8 × 80 GiB for a 7B model).
# --epsilon_high is swift's absolute cap on the IS weight (w = min(r, 5.0), ScaleRL's ε_max), not 1 + ε.
# Off-policy updates: each generation batch (8 GPUs × 4 × 8 steps = 256 completions = 32 prompts × 8) feeds 8
# optimizer steps, so steps 2-8 have r ≠ 1. The loss is normalised by the completion tokens of the whole
# generation batch on all GPUs (MiniMax-M1 eq. 4), whatever the split over GPUs.
# Checkpoints: --save_steps is a multiple of steps_per_generation × num_iterations (8), the only steps where
# swift resumes exactly (it does not save the generation batch being reused). Each checkpoint holds
# cispo_config.json; resuming with other CISPO settings is refused unless CISPO_ALLOW_CONFIG_CHANGE=1.
# CISPO_FUSED_LOGPS=1: log-probs and loss chunk by chunk inside the LM head's forward, where ZeRO-3 has gathered
# its weight; the [tokens, 152k] logits are never held (per rank, 0.12x the peak memory of swift's path at
# 4 x 1,024 tokens on CPU: docs/distributed.md). CISPO_FP32_LM_HEAD=1: the head in float32 (MiniMax-M1).
CISPO_FUSED_LOGPS=${CISPO_FUSED_LOGPS:-1} \
CISPO_FP32_LM_HEAD=${CISPO_FP32_LM_HEAD:-1} \
CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 \
NPROC_PER_NODE=8 \
swift rlhf \
    --rlhf_type grpo \
    --model Qwen/Qwen2.5-7B \
    --external_plugins "$(python -m cispo_swift plugin-path)" \
    --loss_type cispo \
    --epsilon_high 5.0 \
    --beta 0 \
    --dataset AI-MO/NuminaMath-TIR#10000 \
    --reward_funcs accuracy \
    --tuner_type full \
    --torch_dtype bfloat16 \
    --deepspeed zero3 \
    --use_vllm true \
    --vllm_mode colocate \
    --vllm_gpu_memory_utilization 0.4 \
    --vllm_max_model_len 4608 \
    --sleep_level 1 \
    --offload_model true \
    --offload_optimizer true \
    --num_generations 8 \
    --per_device_train_batch_size 4 \
    --gradient_accumulation_steps 1 \
    --steps_per_generation 8 \
    --num_iterations 1 \
    --max_completion_length 4096 \
    --temperature 1.0 \
    --learning_rate 1e-6 \
    --lr_scheduler_type constant \
    --warmup_ratio 0 \
    --num_train_epochs 1 \
    --gradient_checkpointing true \
    --logging_steps 1 \
    --save_steps 80 \
    --save_total_limit 3 \
    --log_completions true \
    --dataloader_num_workers 4 \
    --dataset_num_proc 4 \
    --output_dir output/cispo_zero3 \
    "$@"
