"""CISPO_KL_BUDGET and CISPO_SKIP_NO_SIGNAL inside DeepSpeed's engine (ZeRO-1/2/3).

Under DeepSpeed the training loop's `optimizer.step()` does nothing: accelerate's `backward` runs the engine's
backward and, at the accumulation boundary, `engine.step()`, whose `_take_model_step` calls the ZeRO optimizer's
`step` (DeepSpeed 0.19.8, runtime/engine.py). `gate` wraps that `step`. A step the plugin skips takes DeepSpeed's own
path for a skipped (fp16-overflow) step: both ZeRO optimizers call `_update_scale(self.overflow)` right before
`if self.overflow:` (stage_1_and_2.py `step`; stage3.py `_loss_scale_update_and_overflow_cleanup`), so the wrapped
`_update_scale` updates the loss scale with the real overflow and then marks the step as overflowed. The optimizer
then clears its gradient partitions and returns without touching the weights, Adam's moments or its step count. The
mark is cleared again before the engine reads it, so the learning-rate schedule steps as it does without DeepSpeed
(it follows the global step; accelerate would hold the training loop's schedule back for an overflowed step).
tests/test_deepspeed_gate.py pins these names.

The no-signal test reads the reduced gradient partitions the optimizer is about to apply
(`averaged_gradients`, filled at the boundary when the optimizer state is not offloaded) on every rank.
"""

from __future__ import annotations

import json
import os
from typing import List, Optional, Tuple

import torch

from cispo_swift import guards

STAGES = (1, 2, 3)


def gate(trainer) -> None:
    """Wrap the ZeRO optimizer's `step` of `trainer`'s DeepSpeed engine once (see the module docstring)."""
    engine = trainer.model_wrapped
    optimizer = engine.optimizer
    if getattr(optimizer, '_cispo_gated', False):
        return
    check_engine(engine, trainer.cispo_config.skip_no_signal)
    forced = [False]
    inner_step, inner_update = optimizer.step, optimizer._update_scale

    def _update_scale(has_overflow=False):
        inner_update(has_overflow)
        if forced[0]:
            optimizer.overflow = True

    def step(*args, **kwargs):
        forced[0] = guards.skip_decision(trainer, lambda: partitioned_gradient_is_zero(optimizer))
        try:
            return inner_step(*args, **kwargs)
        finally:
            if forced[0]:
                optimizer.overflow = False
                optimizer._global_grad_norm = 0.0  # DeepSpeed would report inf, its mark of an overflow
            forced[0] = False

    optimizer._update_scale = _update_scale
    optimizer.step = step
    optimizer._cispo_gated = True


def skip_unseen_step(trainer) -> None:
    """An optimizer step whose micro-batches all re-used a spent generation batch: the engine never ran them. The
    gate records the skip; the engine counts the step and steps a schedule of its own, as in `_take_model_step`
    (the training loop steps its own schedule)."""
    guards.skip_decision(trainer)  # the budget decides first: the gradient test is not reached
    engine = trainer.model_wrapped
    engine._global_grad_norm = 0.0
    engine.global_steps += 1
    if engine.lr_scheduler is not None:
        engine.lr_scheduler.step()


def check_engine(engine, skip_no_signal: bool) -> None:
    stage = engine.zero_optimization_stage()
    if stage not in STAGES:
        raise RuntimeError(
            f'CISPO_KL_BUDGET / CISPO_SKIP_NO_SIGNAL under DeepSpeed need ZeRO stage 1, 2 or 3, where the plugin can '
            f'skip a step inside the ZeRO optimizer; this run uses stage {stage}. Use --deepspeed zero1, zero2 or '
            'zero3, or unset the option.'
        )
    if skip_no_signal and engine.zero_use_cpu_optimizer():  # offload_optimizer on cpu or nvme
        raise RuntimeError(
            'CISPO_SKIP_NO_SIGNAL=1 with DeepSpeed optimizer offload: the offloaded optimizer accumulates the '
            'gradients where the plugin cannot read them, so it cannot tell a step without signal. Use a ZeRO '
            'config without offload_optimizer, or unset CISPO_SKIP_NO_SIGNAL (CISPO_KL_BUDGET works with offload).'
        )


def partition_gradients(optimizer) -> List[torch.Tensor]:
    """This rank's partitions of the reduced gradient the ZeRO optimizer's next `step` applies."""
    tensors: List[torch.Tensor] = []
    for value in getattr(optimizer, 'averaged_gradients', {}).values():
        if torch.is_tensor(value):
            tensors.append(value)
        elif value is not None:
            tensors.extend(g for g in value if g is not None)
    return tensors


def partitioned_gradient_is_zero(optimizer) -> bool:
    """Whether the gradient is exactly zero on every partition of every rank. Refuses to guess when the optimizer
    holds no partitions at all (a DeepSpeed version or mode that keeps them elsewhere): that must not read as zero."""
    tensors = partition_gradients(optimizer)
    if not tensors:
        raise RuntimeError(
            'CISPO_SKIP_NO_SIGNAL=1 found no gradient partitions in the ZeRO optimizer (averaged_gradients is empty) '
            'at an optimizer step, so it cannot tell whether the step carries signal. This DeepSpeed version or mode '
            'is not supported by the skip: unset CISPO_SKIP_NO_SIGNAL.'
        )
    signal = torch.stack([t.ne(0).any() for t in tensors]).any().to(torch.int32)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(signal, op=torch.distributed.ReduceOp.MAX)
    return not bool(signal)


# swift's --deepspeed presets (ms-swift 4.6.0 `SftArguments._init_deepspeed`: NAME -> swift/config/NAME.json).
PRESETS = ('zero0', 'zero1', 'zero2', 'zero3', 'zero2_offload', 'zero3_offload')


def zero_settings(deepspeed) -> Optional[Tuple[int, bool]]:
    """(ZeRO stage, optimizer offloaded) of a `--deepspeed` value (a swift preset name, a JSON file, a JSON string
    or a dict), or None where it cannot be read before the run starts (the engine is checked then)."""
    config = deepspeed
    if isinstance(config, str):
        text = config
        if config in PRESETS:
            import swift

            text = os.path.join(os.path.dirname(swift.__file__), 'config', f'{config}.json')
        try:
            if os.path.isfile(text):
                with open(text) as f:
                    config = json.load(f)
            else:
                config = json.loads(text)
        except (OSError, ValueError):
            return None
    if not isinstance(config, dict):
        return None
    zero = config.get('zero_optimization') or {}
    stage = zero.get('stage', 0)
    offload = zero.get('offload_optimizer') or {}
    device = offload.get('device', 'none') if isinstance(offload, dict) else 'none'
    return (stage if isinstance(stage, int) else 0), device not in (None, 'none')


def check_settings(deepspeed, kl_budget, skip_no_signal: bool) -> None:
    """At argument parsing: refuse the step-skipping options where the plugin cannot skip a DeepSpeed step."""
    settings = zero_settings(deepspeed)
    if settings is None or (kl_budget is None and not skip_no_signal):
        return
    stage, offload = settings
    option = 'CISPO_SKIP_NO_SIGNAL=1' if kl_budget is None else f'CISPO_KL_BUDGET={kl_budget}'
    if stage not in STAGES:
        raise ValueError(
            f'{option} with --deepspeed at ZeRO stage {stage}: the plugin skips a step inside the ZeRO optimizer, '
            'which stage 0 does not use. Use --deepspeed zero1, zero2 or zero3, or unset the option.'
        )
    if skip_no_signal and offload:
        raise ValueError(
            'CISPO_SKIP_NO_SIGNAL=1 with DeepSpeed optimizer offload (offload_optimizer): the offloaded optimizer '
            'accumulates the gradients where the plugin cannot read them, so it cannot tell a step without signal. '
            'Use --deepspeed zero2 or zero3 (no offload), or unset CISPO_SKIP_NO_SIGNAL (CISPO_KL_BUDGET works '
            'with offload).'
        )
