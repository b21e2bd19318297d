"""Completions without a single token (the policy sampled EOS first) in swift 4.6.0's GRPO batches.

The crash (ms-swift 4.6.0, any ``--loss_type``, padded batches): a completion whose first sampled token is EOS has
no token left when EOS is also the pad token (SmolLM2: ``<|im_end|>``; the tiny demo model stops on its pad
``<|endoftext|>`` too), because ``TransformersEngine._infer_full`` drops pad ids from the generated ids. Its labels
are then all -100, and ``collate_to_grpo_micro_batch`` (swift/rlhf_trainers/utils.py) sizes the completion window as

    logits_to_keep = (labels.shape[-1] - (labels != -100).int().argmax(-1)).max()

where ``argmax`` of an all-False row is 0: the window becomes the whole sequence, T. ``_get_logps_via_local_forward``
(swift/rlhf_trainers/grpo_trainer.py) then keeps ``logits[:, -(T + 1):-1]`` (T - 1 positions, as there are only T)
against ``input_ids[:, -T:]`` (T positions), and ``selective_log_softmax`` raises ``RuntimeError: Size does not match
at dimension 1 expected index [B, T, 1] to be no larger than self [B, T - 1, V]``, while computing the old-policy
log-probs in ``GRPOTrainer._prepare_batch_inputs``, before any loss.

The repair: the window a batch needs is the widest completion region of the rows that have one (1 if none has).
``narrow_completion_frame`` recomputes it from the whole-sequence completion mask swift built, and narrows the mask
(and the rollout log-probs, if any) to it in place. The empty row keeps an all-zero mask: it contributes no token to
the loss, and ``num_items_in_batch`` (the token normaliser swift computes from the masks afterwards) counts it as 0.
Its advantage still enters the group statistics, as its reward does. A batch without empty rows is left untouched.
Padding-free batches (``--padding_free``) use another frame and are not handled here.
"""

from __future__ import annotations

from typing import Any

import torch


def completion_window(completion_mask: torch.Tensor) -> int:
    """The completion window swift should have used: max over rows with a completion token of (T - first token),
    or 1 when no row has one (the window must not be empty: ``x[:, -0:]`` is the whole row).

    ``completion_mask``: [B, T] bool, in the whole-sequence frame (``labels != -100``).
    """
    has_token = completion_mask.any(-1)  # [B]
    if not bool(has_token.any()):
        return 1
    first = completion_mask.int().argmax(-1)  # [B]; 0 for the rows without a token, which are excluded below
    width = completion_mask.shape[-1] - first
    return int(width[has_token].max().item())


def narrow_completion_frame(grpo_batch: Any, seq_len: int) -> bool:
    """Repair, in place, a ``GRPOBatch`` whose completion window swift widened to the whole sequence because a row has
    no completion token. Returns True if it changed the batch.

    ``seq_len``: T, the width of ``input_ids``. Only a window of width T with an empty row is repaired (a window of T
    is otherwise impossible: every sequence starts with its prompt).
    """
    mask = grpo_batch.completion_mask  # [B, T] when swift's window is the whole sequence
    if grpo_batch.logits_to_keep is None or grpo_batch.logits_to_keep < seq_len or mask.shape[-1] != seq_len:
        return False
    if bool(mask.any(-1).all()):
        return False
    width = completion_window(mask)
    grpo_batch.logits_to_keep = width
    grpo_batch.completion_mask = mask[:, -width:]
    # Non-padding-free frame: every row spans the window (build_completion_mask_and_seq_lengths, swift 4.6.0).
    grpo_batch.seq_lengths = torch.full_like(grpo_batch.seq_lengths, width)
    if grpo_batch.rollout_per_token_logps is not None:
        grpo_batch.rollout_per_token_logps = grpo_batch.rollout_per_token_logps[:, -width:]
    return True
