"""Which CISPO micro-batches and optimizer steps run: the gate on the optimizer step (the KL budget's skips,
CISPO_SKIP_NO_SIGNAL, the finite-gradient check; `guards` without DeepSpeed, `deepspeed_gate` with it) and the
micro-batches that re-use a generation batch whose KL budget is spent, which cost no forward or backward."""

from __future__ import annotations

import torch

from cispo_swift import deepspeed_gate, guards


def gate_steps(trainer) -> None:
    """Install the gate on the optimizer step, once (each call checks that it is in place)."""
    if not trainer.is_deepspeed_enabled:
        guards.gate_optimizer_step(trainer)
    elif trainer.cispo_budget is not None or trainer.cispo_config.skip_no_signal:
        deepspeed_gate.gate(trainer)  # the engine steps inside its backward; the loop's optimizer.step is a no-op


def reuses_spent_batch(trainer) -> bool:
    """Whether this micro-batch re-uses a generation batch whose KL budget is spent: its optimizer step is skipped
    whatever it computes, so it costs no forward or backward. A micro-batch that starts a new generation batch
    (swift's `_prepare_inputs`, GRPOTrainer 4.6.0: `_step % generate_every == 0`) always runs. Under DeepSpeed a
    whole accumulation window is skipped or none of it: the engine must reach the window's boundary to clear the
    gradients it has accumulated."""
    if trainer.cispo_budget is None or trainer._buffered_inputs is None:
        return False
    args = trainer.args
    every = args.steps_per_generation * trainer.template.sequence_parallel_size * trainer.num_iterations
    spent = trainer.cispo_budget.spent and trainer._step % every != 0
    if trainer.is_deepspeed_enabled:
        if trainer._step % args.gradient_accumulation_steps == 0:
            trainer._cispo_window_spent = spent
        return spent and getattr(trainer, '_cispo_window_spent', False)
    return spent


def skip_micro_batch(trainer) -> torch.Tensor:
    """Pass over one micro-batch of a spent generation batch: what `training_step` returns in its place."""
    trainer._step += 1  # what TRL's GRPOTrainer.training_step (trl 0.29) counts after each micro-batch
    trainer.cispo_budget.skip_pending = True
    if trainer.is_deepspeed_enabled and trainer._step % trainer.args.gradient_accumulation_steps == 0:
        deepspeed_gate.skip_unseen_step(trainer)  # the engine never saw this window
    return torch.zeros((), device=trainer.args.device)
