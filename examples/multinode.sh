# CISPO (Clipped IS-weight Policy Optimization), MiniMax-M1: https://arxiv.org/abs/2506.13585
# Two nodes × 8 GPUs, swift's launch conventions. Run the same script on both nodes:
#   node 0 (its address is MASTER_ADDR):  MASTER_ADDR=10.0.0.1 NODE_RANK=0 bash examples/multinode.sh
#   node 1:                               MASTER_ADDR=10.0.0.1 NODE_RANK=1 bash examples/multinode.sh
# output_dir must be on storage both nodes see: every process reads the checkpoint (and its cispo_config.json)
# when resuming with --resume_from_checkpoint.
# --epsilon_high is swift's absolute cap on the IS weight (w = min(r, 5.0), ScaleRL's ε_max), not 1 + ε.
# 16 GPUs × 2 × 8 steps = 256 completions (32 prompts × 8) per generation batch, 8 optimizer steps each; the
# loss divides by the completion tokens of the whole batch on all 16 GPUs (MiniMax-M1 eq. 4).
# --save_steps is a multiple of 8 (steps_per_generation × num_iterations): resumes from there are exact.
NNODES=2 \
NODE_RANK=${NODE_RANK:?set NODE_RANK to 0 on the master node and 1 on the other} \
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR to the address of the NODE_RANK=0 node} \
MASTER_PORT=${MASTER_PORT:-29500} \
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
    --per_device_train_batch_size 2 \
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
    --output_dir output/cispo_multinode \
    "$@"
