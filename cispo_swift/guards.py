"""What stands between a CISPO micro-batch and the optimizer: the non-finite loss and gradient checks
(CISPO_CHECK_FINITE) and the gate on the optimizer's `step` that also carries out CISPO_KL_BUDGET's skips."""

from __future__ import annotations

import math
from typing import Optional

import torch

NO_SIGNAL_KEY = 'cispo/no_signal_skipped'


def gate_optimizer_step(trainer) -> None:
    """Wrap `trainer.optimizer.step` (the accelerate wrapper the training loop calls) once: a step the KL budget
    skips, or (CISPO_SKIP_NO_SIGNAL) a step whose gradient is exactly zero, does not run at all, so neither the
    weights nor Adam's moments and step counter move; with CISPO_CHECK_FINITE a non-finite gradient stops the run
    before the update. Under DeepSpeed the engine steps inside its backward (the budget is refused there at start)."""
    optimizer = trainer.optimizer
    if optimizer is None or getattr(trainer, '_cispo_gated', None) is optimizer:
        return
    inner = optimizer.step

    def step(*args, **kwargs):
        if not skip_decision(trainer):
            return inner(*args, **kwargs)
        return None

    optimizer.step = step
    trainer._cispo_gated = optimizer


def skip_decision(trainer, zero_test=None) -> bool:
    """Whether the optimizer step now due is skipped (the same on every rank), with its metrics recorded: the KL
    budget first, then the no-signal test (`zero_test()`, default: every parameter's `.grad` is zero); with
    CISPO_CHECK_FINITE a step that runs has finite gradients."""
    cfg, bucket = trainer.cispo_config, trainer._metrics['train']
    if trainer.cispo_budget is not None and trainer.cispo_budget.take_skip(trainer._metrics):
        if cfg.skip_no_signal:
            bucket[NO_SIGNAL_KEY].append(0.0)  # one value per optimizer step: this one was skipped for its drift
        return True
    if cfg.skip_no_signal:
        silent = gradient_is_zero(trainer.model) if zero_test is None else zero_test()
        bucket[NO_SIGNAL_KEY].append(float(silent))
        if silent:
            return True
    if cfg.check_finite:
        check_finite_gradients(trainer.model, trainer.state.global_step, trainer.accelerator.process_index)
    return False


def gradient_is_zero(model) -> bool:
    """Whether the gradient the optimizer would apply is exactly zero on every parameter of every rank (a missing
    gradient counts as zero; NaN does not). Under DDP the gradients are already averaged, but FSDP shards them, so
    the answer is reduced over the ranks."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flags = [(g.to_local() if hasattr(g, 'to_local') else g).ne(0).any() for g in grads]  # FSDP2: the local shard
    device = flags[0].device if flags else next(model.parameters()).device
    signal = torch.stack(flags).any().to(torch.int32) if flags else torch.zeros((), dtype=torch.int32, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(signal, op=torch.distributed.ReduceOp.MAX)
    return not bool(signal)


def check_finite_gradients(model, global_step: int, rank: int) -> None:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
        bad = sum(int(not torch.isfinite(g).all()) for g in grads)
        raise FloatingPointError(
            f'Non-finite gradient at global step {global_step} (rank {rank}): {bad} of {len(grads)} parameter '
            'gradients hold NaN/inf although the loss was finite; training stops before the optimizer step. Usual '
            'causes: fp16 overflow in the backward pass (use bf16 or float32), an exploding learning rate (lower '
            '--learning_rate, keep --max_grad_norm). CISPO_CHECK_FINITE=0 turns this check off.'
        )


def nonfinite_loss_error(
    loss: torch.Tensor,
    token_log_ratio: torch.Tensor,
    mask: torch.Tensor,
    upper: Optional[float],
    beta: float,
    global_step: int,
    rank: int,
    advantages: Optional[torch.Tensor] = None,
    logps: Optional[torch.Tensor] = None,
) -> FloatingPointError:
    """The error for a NaN/inf loss from finite inputs, naming the step and why (`token_log_ratio`, `mask`,
    `advantages`, `logps`: [B, T]). Without a cap the weight is the suspect when r itself, or the product
    r · Â · log π the loss forms, passes the float32 range (computed here in float64)."""
    mask = mask.bool()
    largest = float(torch.where(mask, token_log_ratio, -torch.inf).max()) if mask.any() else float('nan')
    product = 0.0
    if advantages is not None and logps is not None and mask.any():
        size = torch.exp(token_log_ratio.double()) * advantages.double().abs() * logps.double().abs().clamp(min=1.0)
        product = float(torch.where(mask, size, 0.0).max())
    float32_max = torch.finfo(torch.float32).max
    if (upper is None or upper == math.inf) and (largest > 88.7 or product > float32_max):
        what = 'r' if largest > 88.7 else f'the product r · Â · log π ({product:.3g})'
        cause = (
            f'the importance weight r = exp({largest:.1f}) has no cap (--epsilon_high inf), and {what} overflowed '
            'float32. Set a finite cap (e.g. --epsilon_high 5.0), or lower --learning_rate / --num_iterations so '
            'the policy drifts less from π_old.'
        )
    else:
        cause = (
            f'the largest log-ratio is {largest:.3g} (weight cap {upper}), beta {beta}; '
            'usual causes: an exploding learning rate or grad norm, fp16 overflow (use bf16 or float32).'
        )
    return FloatingPointError(
        f'Non-finite loss ({float(loss.detach()):g}) at global step {global_step} (rank {rank}) from finite inputs: '
        f'{cause} Training stops before the optimizer step. CISPO_CHECK_FINITE=0 turns this check off.'
    )
