"""The trainer's side of the fused LM head (`CISPO_FUSED_LOGPS`) and of the FP32 head (`CISPO_FP32_LM_HEAD`).

`fused.py` holds the kernels (pure torch, no swift); this module connects them to swift's model forward: it finds
the output layer and runs swift's forward with the head's own forward replaced, so that inside it the last hidden
states, the head weight and the targets go to `fused.chunked_token_logps` (any loss) or
`fused.fused_linear_logp_loss` (the CISPO objective, gradient formed in the forward). Running inside the head's
forward is what makes DeepSpeed ZeRO-3 work: its module hooks gather the partitioned weight there.
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
    """The model's output layer when it is a plain nn.Linear (the fused path needs its weight and bias), also after
    FSDP2's `fully_shard` has changed its class in place to a generated `FSDPLinear(FSDPModule, nn.Linear)`."""
    head = output_layer(model)
    if type(head) is torch.nn.Linear:
        return head
    bases = type(head).__bases__
    if len(bases) == 2 and bases[1] is torch.nn.Linear and bases[0].__name__ == 'FSDPModule':
        return head
    return None


def unsupported_reason(trainer) -> Optional[str]:
    """Why the chunked LM-head path cannot serve this run, or None."""
    if trainer.is_multimodal:
        return 'multimodal models compute logits through their own heads'
    if trainer.template.sequence_parallel_size > 1:
        return 'sequence parallelism computes log-probs in its own (gathering) path'
    model = trainer.accelerator.unwrap_model(trainer.model)
    config = getattr(model.get_base_model() if is_peft_model(model) else model, 'config', None)
    for attr in _LOGIT_TRANSFORMS:
        if getattr(config, attr, None) not in (None, 1, 1.0):
            return f'the model transforms its logits ({attr}={getattr(config, attr)})'
    if lm_head(model) is None:
        kind = type(output_layer(model)).__name__
        return f'the output layer is {kind}, not a plain torch.nn.Linear (e.g. LoRA on lm_head)'
    return None


def through_head(trainer, model, model_inputs, logits_to_keep: int, compute):
    """swift's model forward (so DDP and DeepSpeed wrappers and hooks run) with the LM head's forward replaced by
    `compute(head, hidden)`, hidden the last hidden states of the completion positions [B, T, H]; returns what
    `compute` returned, which the model passes out as its "logits".

    The computation runs inside the head module's own forward, so DeepSpeed ZeRO-3's module hooks gather the head's
    partitioned weight for it (and again before its backward) and reduce the weight's gradient like any other.
    Mirrors the forward of swift 4.6.0 `GRPOTrainer._get_logps_via_local_forward` (use_cache, logits_to_keep + 1,
    the [-(T + 1):-1] slice); tests/test_trainer_fused.py compares the results with that method's.
    """
    if 'use_cache' in trainer.model_kwarg_keys:
        model_inputs['use_cache'] = False
    if 'logits_to_keep' in trainer.model_kwarg_keys:
        model_inputs['logits_to_keep'] = logits_to_keep + 1
    head = lm_head(trainer.accelerator.unwrap_model(model))
    if head is None:  # checked at start; a wrapper applied later (e.g. by accelerate.prepare) can still change it
        kind = type(output_layer(trainer.accelerator.unwrap_model(model))).__name__
        raise RuntimeError(
            f'CISPO_FUSED_LOGPS=1: the output layer became {kind} after start-up; unset CISPO_FUSED_LOGPS.'
        )
    with _head_computes(head, lambda hidden: compute(head, hidden[:, -(logits_to_keep + 1) : -1, :])):
        return model(**model_inputs).logits


def token_logps(trainer, model, model_inputs, logits_to_keep: int, input_ids, compute_entropy: bool):
    """Drop-in for swift's `_get_logps_via_local_forward` through `fused.chunked_token_logps`: (log-probs [B, T],
    entropies [B, T] or None); the backward recomputes each chunk's logits. `[1, nnz]` in padding-free mode."""
    cfg, extra = trainer.cispo_config, {}
    targets = input_ids[:, -logits_to_keep:]

    def compute(head, hidden):
        B, T, H = hidden.shape
        logps, entropies = chunked_token_logps(
            hidden.reshape(B * T, H),
            head.weight,
            head.bias,
            targets.reshape(B * T),
            temperature=trainer.temperature,
            chunk_size=cfg.fused_chunk_size,
            fp32_head=cfg.fp32_lm_head,
            compute_entropy=compute_entropy,
        )
        extra['entropies'] = None if entropies is None else entropies.view(B, T)
        return logps.view(B, T)

    logps = through_head(trainer, model, model_inputs, logits_to_keep, compute)
    return logps, extra['entropies']


def objective_with_logps(
    trainer, model, model_inputs, grpo_batch, tokens: L.TokenInputs, objective: L.Objective
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """`loss.cispo_objective` through `fused.fused_linear_logp_loss`, three LM-head matmuls: (loss, log-probs
    [B, T] detached, entropies [B, T] or None). Each chunk's gradient w.r.t. its log-probs is the autograd gradient
    of the same objective the plain path calls, evaluated on that chunk's tokens."""
    keep = grpo_batch.logits_to_keep
    targets = model_inputs['input_ids'][:, -keep:]
    coef_fn = autograd_coef_fn(lambda logps, start, end: L.cispo_objective(logps, tokens[start:end], objective))
    cfg, extra = trainer.cispo_config, {}

    def compute(head, hidden):
        B, T, H = hidden.shape
        loss, logps, entropies = fused_linear_logp_loss(
            hidden.reshape(B * T, H),
            head.weight,
            head.bias,
            targets.reshape(B * T),
            coef_fn,
            temperature=trainer.temperature,
            chunk_size=cfg.fused_chunk_size,
            fp32_head=cfg.fp32_lm_head,
            compute_entropy=trainer.compute_entropy,
        )
        extra['logps'] = logps.view(B, T)
        extra['entropies'] = None if entropies is None else entropies.view(B, T)
        return loss

    loss = through_head(trainer, model, model_inputs, keep, compute)
    return loss, extra['logps'], extra['entropies']


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
def _head_computes(head: torch.nn.Module, compute):
    saved = head.__dict__.get('forward')  # an instance-level forward, e.g. the FP32 head
    head.forward = compute
    try:
        yield
    finally:
        if saved is None:
            del head.forward
        else:
            head.forward = saved
