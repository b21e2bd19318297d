"""The trainer's side of the fused LM head (`CISPO_FUSED_LOGPS`) and of the FP32 head (`CISPO_FP32_LM_HEAD`).

`fused.py` holds the kernels (pure torch, no swift); this module connects them to swift's model forward: it finds
the output layer, runs swift's forward with the head bypassed to get the last hidden states, and hands hidden
states, head weight and targets to `fused.chunked_token_logps` (any loss) or `fused.fused_linear_logp_loss`
(the CISPO objective, gradient formed in the forward).
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from accelerate.utils import is_peft_model

from cispo_swift import loss as L
from cispo_swift.fused import autograd_coef_fn, chunked_token_logps, fused_linear_logp_loss

_LOGIT_TRANSFORMS = ('final_logit_softcapping', 'logit_scale', 'logits_scaling', 'output_multiplier_scale')


def output_layer(model: torch.nn.Module) -> Optional[torch.nn.Module]:
    base = model.get_base_model() if is_peft_model(model) else model
    return base.get_output_embeddings() if hasattr(base, 'get_output_embeddings') else None


def lm_head(model: torch.nn.Module) -> Optional[torch.nn.Linear]:
    """The model's output layer when it is a plain nn.Linear (the fused path needs its weight and bias)."""
    head = output_layer(model)
    return head if type(head) is torch.nn.Linear else None


def unsupported_reason(trainer) -> Optional[str]:
    """Why the chunked LM-head path cannot serve this run, or None."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if trainer.is_multimodal:
        return 'multimodal models compute logits through their own heads'
    if trainer.template.sequence_parallel_size > 1:
        return 'sequence parallelism computes log-probs in its own (gathering) path'
    if is_deepspeed_zero3_enabled():
        return "DeepSpeed ZeRO-3 partitions the LM head weight outside the model's forward"
    model = trainer.accelerator.unwrap_model(trainer.model)
    config = getattr(model.get_base_model() if is_peft_model(model) else model, 'config', None)
    for attr in _LOGIT_TRANSFORMS:
        if getattr(config, attr, None) not in (None, 1, 1.0):
            return f'the model transforms its logits ({attr}={getattr(config, attr)})'
    if lm_head(model) is None:
        kind = type(output_layer(model)).__name__
        return f'the output layer is {kind}, not a plain torch.nn.Linear (e.g. LoRA on lm_head)'
    return None


def hidden_states(trainer, model, model_inputs, head: torch.nn.Linear, logits_to_keep: int) -> torch.Tensor:
    """The last hidden states of the completion positions, [B, T, H], from swift's own forward (so DDP and
    DeepSpeed wrappers and hooks run) with the LM head bypassed: the model's "logits" are its hidden states.

    Mirrors the forward of swift 4.6.0 `GRPOTrainer._get_logps_via_local_forward` (use_cache, logits_to_keep + 1,
    the [-(T + 1):-1] slice); tests/test_trainer_fused.py compares the results with that method's.
    """
    if 'use_cache' in trainer.model_kwarg_keys:
        model_inputs['use_cache'] = False
    if 'logits_to_keep' in trainer.model_kwarg_keys:
        model_inputs['logits_to_keep'] = logits_to_keep + 1
    with _head_returns_hidden(head):
        hidden = model(**model_inputs).logits
    return hidden[:, -(logits_to_keep + 1) : -1, :]


def token_logps(trainer, model, model_inputs, logits_to_keep: int, input_ids, compute_entropy: bool):
    """Drop-in for swift's `_get_logps_via_local_forward` through `fused.chunked_token_logps`: (log-probs [B, T],
    entropies [B, T] or None); the backward recomputes each chunk's logits. `[1, nnz]` in padding-free mode."""
    head = lm_head(trainer.accelerator.unwrap_model(model))
    hidden = hidden_states(trainer, model, model_inputs, head, logits_to_keep)
    B, T, H = hidden.shape
    cfg = trainer.cispo_config
    logps, entropies = chunked_token_logps(
        hidden.reshape(B * T, H),
        head.weight,
        head.bias,
        input_ids[:, -logits_to_keep:].reshape(B * T),
        temperature=trainer.temperature,
        chunk_size=cfg.fused_chunk_size,
        fp32_head=cfg.fp32_lm_head,
        compute_entropy=compute_entropy,
    )
    return logps.view(B, T), (None if entropies is None else entropies.view(B, T))


def objective_with_logps(
    trainer, model, model_inputs, grpo_batch, tokens: L.TokenInputs, objective: L.Objective
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """`loss.cispo_objective` through `fused.fused_linear_logp_loss`, three LM-head matmuls: (loss, log-probs
    [B, T] detached, entropies [B, T] or None). Each chunk's gradient w.r.t. its log-probs is the autograd gradient
    of the same objective the plain path calls, evaluated on that chunk's tokens."""
    head = lm_head(trainer.accelerator.unwrap_model(model))
    keep = grpo_batch.logits_to_keep
    hidden = hidden_states(trainer, model, model_inputs, head, keep)  # [B, T, H]
    B, T, H = hidden.shape

    coef_fn = autograd_coef_fn(lambda logps, start, end: L.cispo_objective(logps, tokens[start:end], objective))
    cfg = trainer.cispo_config
    loss, logps, entropies = fused_linear_logp_loss(
        hidden.reshape(B * T, H),
        head.weight,
        head.bias,
        model_inputs['input_ids'][:, -keep:].reshape(B * T),
        coef_fn,
        temperature=trainer.temperature,
        chunk_size=cfg.fused_chunk_size,
        fp32_head=cfg.fp32_lm_head,
        compute_entropy=trainer.compute_entropy,
    )
    return loss, logps.view(B, T), (None if entropies is None else entropies.view(B, T))


def fp32_lm_head(model: torch.nn.Module) -> bool:
    """MiniMax-M1's precision fix: the LM head computes its logits in float32 whatever the model's dtype, also
    under autocast. Returns whether the head's weight is in a lower precision (else only autocast is overridden).
    """
    head = lm_head(model)
    if head is None:
        raise ValueError(
            f'CISPO_FP32_LM_HEAD=1 needs a plain torch.nn.Linear output layer; this model has '
            f'{type(output_layer(model)).__name__} (e.g. a LoRA-wrapped lm_head). Unset CISPO_FP32_LM_HEAD or keep '
            'lm_head out of --target_modules.'
        )
    head.forward = types.MethodType(_fp32_forward, head)
    return head.weight.dtype != torch.float32


def _fp32_forward(self, hidden: torch.Tensor) -> torch.Tensor:
    bias = None if self.bias is None else self.bias.float()
    with torch.autocast(hidden.device.type, enabled=False):
        return F.linear(hidden.float(), self.weight.float(), bias)


@contextmanager
def _head_returns_hidden(head: torch.nn.Module):
    saved = head.__dict__.get('forward')  # an instance-level forward, e.g. the FP32 head
    head.forward = _identity
    try:
        yield
    finally:
        if saved is None:
            del head.forward
        else:
            head.forward = saved


def _identity(hidden: torch.Tensor) -> torch.Tensor:
    return hidden
