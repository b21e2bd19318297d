# CISPO (Clipped Importance Sampling Policy Optimization), MiniMax-M1: https://arxiv.org/abs/2506.13585
# Math reasoning RL on Qwen2.5-7B (base model, zero-RL as in MiniMax-M1's Fig. 2) with the accuracy reward on
# AI-MO/NuminaMath-TIR, one node with 8 GPUs (80 GiB), vLLM generation colocated with training.
# Needs: pip install -e . (cispo-swift), vllm, deepspeed, math_verify (swift's `accuracy` reward).
# Not run in this project's CI (no GPU there); tests/test_examples.py checks every flag against swift's parser, and
# its CPU twin math_qwen2.5_vllm_colocate_cpu.sh (same flags but the few that cannot work on CPU) runs at tiny scale.
#
# Starting point from ScaleRL (arXiv 2510.13786), which found these choices to help at scale:
#   --epsilon_high 5.0          the absolute cap of the detached weight, w = sg(min(r, 5)) (ScaleRL's ε_max; swift's
#                               convention: the cap itself, not 1 + ε)
#   CISPO_FP32_LM_HEAD=1        logits in FP32 (MiniMax-M1 §3.1: train/inference probability correlation 0.987→0.997)
#   --vllm_engine_kwargs ...    vLLM's LM head in FP32 too (hf_overrides head_dtype), the inference side of the same fix;
#                               together they lowered the mismatch most (docs/vllm_cpu.md)
#   CISPO_NORM=prompt           prompt-level loss averaging
#   --scale_rewards batch       advantages normalised by the batch's reward std (swift: group|batch|none|gdpo)
#   --dynamic_sample true       zero-variance filtering: groups whose rewards are all equal are dropped and new
#                               prompts sampled (swift's only filter is DAPO's resampling, up to --max_resample_times)
#   --steps_per_generation 8    8 optimizer steps (mini-batches) per generation batch: off-policy updates, where CISPO
#                               keeps the gradient that PPO-style clipping drops. --num_iterations N would instead
#                               reuse each mini-batch N times.
# Generation batch: 8 GPUs x 4 completions x 8 steps = 256 completions = 32 prompts x 8 generations.
# With --steps_per_generation 1 and --num_iterations 1 every update is on-policy and r = 1 (CISPO = REINFORCE); then
# set CISPO_ANCHOR=rollout to anchor the weight on vLLM's log-probs instead.
PLUGIN=${PLUGIN:-$(python -m cispo_swift plugin-path)} || exit 1

NPROC_PER_NODE=8 \
CISPO_NORM=prompt \
CISPO_FP32_LM_HEAD=1 \
swift rlhf \
    --rlhf_type grpo \
    --model Qwen/Qwen2.5-7B \
    --tuner_type full \
    --torch_dtype bfloat16 \
    --dataset AI-MO/NuminaMath-TIR \
    --load_from_cache_file true \
    --external_plugins "$PLUGIN" \
    --reward_funcs accuracy \
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
    --max_completion_length 4096 \
    --temperature 1.0 \
    --use_vllm true \
    --vllm_mode colocate \
    --vllm_gpu_memory_utilization 0.4 \
    --vllm_tensor_parallel_size 1 \
    --vllm_max_model_len 5120 \
    --vllm_engine_kwargs '{"hf_overrides": {"head_dtype": "float32"}}' \
    --sleep_level 1 \
    --offload_model true \
    --offload_optimizer true \
    --deepspeed zero3 \
    --gradient_checkpointing true \
    --learning_rate 1e-6 \
    --lr_scheduler_type constant \
    --warmup_ratio 0 \
    --num_train_epochs 1 \
    --logging_steps 1 \
    --log_completions true \
    --save_steps 100 \
    --save_total_limit 2 \
    --report_to tensorboard \
    --dataloader_num_workers 4 \
    --output_dir output/cispo_qwen2.5_7b_math \
    "$@"
