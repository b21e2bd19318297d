"""Blocks of ms-swift 4.6.0's `GRPOTrainer._compute_loss_and_metrics` (rlhf_trainers/grpo_trainer.py, L934-1226)
that the CISPO loss path needs with swift's exact behaviour, one function per block, each naming what it mirrors.

swift offers no smaller hook than that 290-line method, so the CISPO path re-enters it at these seams and calls
swift's own helpers wherever swift has one. tests/test_trainer_parity.py runs swift's method and ours on the same
batch for every block here (entropy mask, overlong filter, rollout correction, off-policy mask, sequence-level
ratio, KL metric, SDAR, gradient accumulation, chunked loss) and asserts equal losses, gradients and metrics.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from accelerate.utils import gather_object
from swift.rl_core.advantage import compute_sdar_loss
from swift.rlhf_trainers.utils import compute_chord_loss
from trl.trainer.grpo_trainer import nanmax, nanmin

from cispo_swift import compat


def loss_mask(trainer, grpo_batch) -> torch.Tensor:
    """The completion mask without truncated completions under `--overlong_filter` (DAPO). Mirrors the overlong
    block; swift's normaliser `num_items_in_batch` still counts them, and so does ours."""
    mask = grpo_batch.completion_mask
    if trainer.overlong_filter and grpo_batch.truncated_mask.any():
        mask = mask & ~grpo_batch.truncated_mask.unsqueeze(-1).expand_as(mask)
    return mask


def entropy_mask_and_metrics(trainer, entropies: Optional[torch.Tensor], completion_mask: torch.Tensor):
    """`--log_entropy` metrics and the `--top_entropy_quantile` token mask (arXiv 2506.01939): (mask or None,
    metrics). Mirrors the entropy block (before the overlong filter, on the completion mask)."""
    if not trainer.compute_entropy:
        return None, {}
    entropies = entropies.masked_fill(completion_mask == 0, float('nan'))
    metrics = {}
    if trainer.args.log_entropy:
        per_completion = trainer.accelerator.gather(torch.nanmean(entropies, dim=1))
        metrics = {
            'entropy_logs': per_completion.tolist(),
            'entropy_mean': per_completion.nanmean().item(),
            'entropy_max': nanmax(per_completion).item(),
            'entropy_min': nanmin(per_completion).item(),
        }
    if trainer.args.top_entropy_quantile >= 1.0:
        return None, metrics
    threshold = torch.nanquantile(entropies.flatten().float(), 1 - trainer.top_entropy_quantile)
    metrics['entropy_threshold'] = threshold.item()
    return entropies >= threshold, metrics


def rollout_correction(trainer, old_logps, grpo_batch, mask) -> Tuple[Dict, Optional[torch.Tensor]]:
    """Train/inference mismatch diagnostics and the rollout importance-sampling weights (or None), through
    swift's helpers (weights only with a `--rollout_importance_sampling_mode`). Mirrors the rollout-correction
    block."""
    wanted = trainer.rollout_importance_sampling_mode is not None or trainer.log_rollout_offpolicy_metrics
    has_rollout = grpo_batch.rollout_per_token_logps is not None
    if trainer.disable_rollout_importance_sampling or not (wanted and all(gather_object([has_rollout]))):
        return {}, None
    rollout_logps = grpo_batch.rollout_per_token_logps
    metrics = trainer._compute_rollout_offpolicy_metrics(old_logps, rollout_logps, mask)
    rollout_log_ratio, weights = trainer._get_rollout_is_correction(old_logps, rollout_logps, mask)
    if rollout_log_ratio is not None:
        metrics.update(trainer._compute_is_correction_metrics(rollout_log_ratio, weights, mask))
    return compat.gather_rollout_metrics(trainer, metrics) if metrics else {}, weights


def sequence_log_ratio(trainer, log_ratio: torch.Tensor, mask: torch.Tensor) -> Optional[torch.Tensor]:
    """GSPO's sequence-level log ratio [B, 1] for `--importance_sampling_level sequence|sequence_token`, else None.
    Mirrors the importance-sampling-level block: with a detached weight, GSPO-token's sg[s]·π/sg[π] has the value
    of the sequence weight, so both levels give CISPO the same weight."""
    if trainer.importance_sampling_level == 'token':
        return None
    return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)


def off_policy_mask(trainer, logps, old_logps, mask, grpo_batch) -> torch.Tensor:
    """`mask` without the sequences `--off_policy_sequence_mask_delta` drops, through swift's helper. Mirrors the
    off-policy block (reference: the rollout log-probs when present, else π_old)."""
    if trainer.off_policy_sequence_mask_delta is None:
        return mask
    reference = grpo_batch.rollout_per_token_logps
    reference = old_logps if reference is None else reference
    advantages = grpo_batch.advantages
    seq_advantages = (advantages * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    keep = trainer._compute_off_policy_sequence_mask(logps, reference, mask, seq_advantages)
    return mask & keep.unsqueeze(-1).expand_as(mask)


def kl_metric(trainer, per_token_kl: torch.Tensor, mask: torch.Tensor) -> float:
    """swift's `kl` metric: the per-rank token mean, averaged over ranks (kept with swift's meaning for every loss
    type; `cispo/kl` is the exact token mean over all ranks). Mirrors `masked_batch_mean` + gather_for_metrics."""
    mean = (per_token_kl * mask).sum() / mask.sum().clamp(min=1.0)
    return trainer.accelerator.gather_for_metrics(mean).nanmean().item()


def auxiliary_losses(trainer, loss, logps, mask, grpo_batch, mode: str) -> torch.Tensor:
    """GA compensation of the Σ/N loss, then SDAR and CHORD, which are micro-batch means. Mirrors the order of the
    window-normalised branch, the SDAR block and the CHORD call at the end."""
    loss = compat.undo_gradient_accumulation_scaling(trainer, loss)
    if trainer.sdar_loss_coef > 0 and grpo_batch.teacher_per_token_logps is not None:
        sdar_loss, sdar_metrics = compute_sdar_loss(
            student_log_probs=logps,
            teacher_log_probs=grpo_batch.teacher_per_token_logps,
            response_mask=mask,
            gate_beta=trainer.sdar_gate_beta,
        )
        loss = loss + trainer.sdar_loss_coef * sdar_loss
        for key, value in sdar_metrics.items():
            trainer._metrics[mode][key].append(value)
        trainer._metrics[mode]['sdar/coef'].append(trainer.sdar_loss_coef)
    if mode == 'train' and trainer.chord_sft_iterator is not None:
        loss = compute_chord_loss(trainer, grpo_loss=loss)
    return loss


def chunked_loss(trainer, model, model_inputs, grpo_batch, origin_data, on_chunk):
    """`--dynamic_num_samples`: the loss over chunks of the micro-batch. Mirrors swift's `_compute_loss_chunked`
    (same chunking, every rank running the same number of forwards, a dummy chunk weighted 0) except the
    reduction: swift averages chunk losses weighted by samples, which shrinks a Σ/N loss by about the number of
    chunks; CISPO's chunk losses are each Σ_chunk/N already, so the batch loss is their plain sum.

    `on_chunk(source_batch, chunk_batch, start, end)` lets the caller carry its own per-sequence data over.
    Returns (loss, [(chunk metrics, chunk size)]).
    """
    mode = 'train' if trainer.model.training else 'eval'
    args = trainer.args
    chunk_size = args.per_device_train_batch_size if mode == 'train' else args.per_device_eval_batch_size
    padding_free = trainer.template.padding_free
    batch_size = grpo_batch.seq_lengths.shape[0] if padding_free else model_inputs['input_ids'].shape[0]
    max_chunks = max((bs + chunk_size - 1) // chunk_size for bs in gather_object([batch_size]))
    new_chunk_size = (batch_size + max_chunks - 1) // max_chunks
    losses, all_metrics = [], []
    chunk_inputs, chunk_batch = {}, None
    for chunk_idx in range(max_chunks):
        start = chunk_idx * new_chunk_size
        end = min(start + new_chunk_size, batch_size)
        is_dummy = start >= batch_size
        if not is_dummy:
            chunk_inputs, chunk_batch = trainer.get_chunked_inputs(model_inputs, grpo_batch, start, end, origin_data)
            on_chunk(grpo_batch, chunk_batch, start, end)
        chunk_loss, chunk_metrics = trainer._compute_loss_and_metrics(model, chunk_inputs, chunk_batch)
        losses.append(chunk_loss * 0.0 if is_dummy else chunk_loss)
        if not is_dummy:
            all_metrics.append((chunk_metrics, end - start))
    return torch.stack(losses).sum(), all_metrics
