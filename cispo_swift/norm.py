"""Loss normalisation across micro-batches and ranks: the per-token factor s_t of `loss.token_scale`.

`token` needs only swift's `num_items_in_batch`. `sequence` and `prompt` need counts over the whole generation
batch on all ranks (sequences, prompt groups, each group's tokens); they are gathered once, when swift prepares
the micro-batches, and carried by each micro-batch's GRPOBatch as `cispo_groups`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict

import torch
from accelerate.utils import gather_object

from cispo_swift import loss as L


@dataclass
class GroupCounts:
    """Sequences and prompt groups of the generation batch (all ranks), and each sequence's group token count [B]."""

    num_sequences: float
    num_groups: float
    group_tokens: torch.Tensor


def attach_group_counts(trainer, samples, batches) -> None:
    """Gather (prompt id, completion length) of every sequence on every rank; give each micro-batch its counts."""
    chunks = trainer.split_by_mini_batches(samples)
    local = []
    for chunk, batch in zip(chunks, batches, strict=True):
        lengths = batch['grpo_batch'].completion_mask.sum(-1).tolist()
        local.extend(zip([s.prompt_id for s in chunk], lengths, strict=True))
    everything = gather_object(local)
    group_tokens: Dict[Any, float] = {}
    for prompt_id, length in everything:
        group_tokens[prompt_id] = group_tokens.get(prompt_id, 0.0) + float(length)
    for chunk, batch in zip(chunks, batches):
        gb = batch['grpo_batch']
        tokens = torch.tensor([group_tokens[s.prompt_id] for s in chunk], device=gb.completion_mask.device)
        gb.cispo_groups = GroupCounts(float(len(everything)), float(len(group_tokens)), tokens)


def copy_group_counts(source, target, start: int, end: int) -> None:
    """A chunk [start, end) of a micro-batch (`--dynamic_num_samples`) keeps its sequences' counts."""
    groups = getattr(source, 'cispo_groups', None)
    if groups is not None:
        target.cispo_groups = GroupCounts(groups.num_sequences, groups.num_groups, groups.group_tokens[start:end])


def token_scale(trainer, grpo_batch, mask: torch.Tensor):
    """s_t times the number of ranks P (DDP averages the rank gradients), see `loss.token_scale`."""
    world = trainer.accelerator.num_processes
    mode = trainer.cispo_config.norm
    if mode == 'token':
        # swift's normaliser for its built-in cispo: the completion tokens of the generation batch, all ranks.
        return world / torch.as_tensor(grpo_batch.num_items_in_batch).clamp(min=1.0)
    groups = getattr(grpo_batch, 'cispo_groups', None)
    if groups is None:
        raise RuntimeError(f'CISPO_NORM={mode}: the batch lacks its group counts (cispo-swift internal error).')
    scale = L.token_scale(
        mask,
        mode,
        num_tokens=float(grpo_batch.num_items_in_batch),
        num_sequences=groups.num_sequences,
        group_tokens=groups.group_tokens,
        num_groups=groups.num_groups,
    )
    return scale * world
