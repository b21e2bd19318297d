"""A GRPOTrainer without a model: swift's loss code and ours run on the same hand-made batch.

`make_trainer` builds a `CISPOGRPOTrainer` through `__new__` (no model, no accelerator set-up) with the attributes
that swift's `_compute_loss_and_metrics` reads, taken from swift's own `GRPOConfig` defaults. Log-probs come
from a leaf tensor `logits` [B, T, V] through log-softmax, so gradients of both implementations can be compared
on the same parameter.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from types import SimpleNamespace

import torch
from swift.rl_core.data import GRPOBatch
from swift.rlhf_trainers import GRPOConfig, GRPOTrainer

from cispo_swift.config import CISPOConfig
from cispo_swift.trainer import CISPOGRPOTrainer


class SingleProcessAccelerator:
    num_processes = 1
    process_index = 0
    is_main_process = True

    def gather(self, tensor):
        return tensor

    gather_for_metrics = gather


def default_args(**overrides) -> SimpleNamespace:
    """swift's GRPOConfig field defaults as a plain namespace (no TrainingArguments post-init)."""
    values = {}
    for f in dataclasses.fields(GRPOConfig):
        if f.default is not dataclasses.MISSING:
            values[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            values[f.name] = f.default_factory()
    values.update(
        loss_type='cispo', epsilon_high=5.0, beta=0.0, gradient_accumulation_steps=1, output_dir='/nonexistent'
    )
    values.update(overrides)
    return SimpleNamespace(**values)


class _Model:
    training = True


def make_trainer(cispo: CISPOConfig | None = None, **arg_overrides) -> CISPOGRPOTrainer:
    trainer = CISPOGRPOTrainer.__new__(CISPOGRPOTrainer)
    trainer.args = default_args(**arg_overrides)
    trainer.model = _Model()
    trainer.accelerator = SingleProcessAccelerator()
    trainer.is_deepspeed_enabled = False  # set by transformers.Trainer.__init__
    trainer._has_teacher = False
    trainer.chord_sft_iterator = None
    trainer.model_accepts_loss_kwargs = False
    trainer.compute_loss_func = None
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    trainer.template = SimpleNamespace(padding_free=False, sequence_parallel_size=1)
    trainer.disable_rollout_importance_sampling = False
    trainer.dynamic_num_samples = False
    trainer._metrics = {'train': defaultdict(list), 'eval': defaultdict(list)}
    trainer._logs = {'entropy': []}
    trainer.state = SimpleNamespace(global_step=0)
    import cispo_swift.config as config_module

    previous = config_module._configured
    config_module._configured = cispo or CISPOConfig()
    try:
        trainer._prepare_algorithm_params()
    finally:
        config_module._configured = previous
    trainer.beta = trainer.args.beta  # set by TRL's __init__ in a real trainer
    trainer.compute_entropy = trainer.args.log_entropy or trainer.top_entropy_quantile < 1.0
    return trainer


def make_batch(seed: int = 0, B: int = 6, T: int = 7, V: int = 11, spread: float = 2.0, rollout: bool = False):
    """A batch with ratios far from 1 (some above the cap 5), mixed-sign advantages and ragged lengths.

    Returns (logits leaf [B, T, V], token ids [B, T], GRPOBatch, entropies [B, T]).
    """
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64).float().requires_grad_(True)
    ids = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    with torch.no_grad():
        logps = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    old = logps + spread * torch.randn(B, T, generator=g)
    adv = torch.randn(B, 1, generator=g).expand(B, T).clone()
    batch = GRPOBatch(
        completion_mask=mask,
        truncated_mask=torch.zeros(B, dtype=torch.bool),
        seq_lengths=lengths,
        old_per_token_logps=old,
        ref_per_token_logps=logps + 0.3 * torch.randn(B, T, generator=g),
        rollout_per_token_logps=(old + 0.1 * torch.randn(B, T, generator=g)) if rollout else None,
        advantages=adv,
        num_items_in_batch=mask.sum().float() * 2,  # as if a second micro-batch of the same size existed
        logits_to_keep=T,
    )
    entropies = torch.rand(B, T, generator=g) * 2
    return logits, ids, batch, entropies


def attach_logps(trainer, logits, ids, entropies):
    """Route the trainer's log-prob computation to log_softmax(logits) gathered at ids."""

    def fake(model, model_inputs, grpo_batch, compute_entropy=False, origin_data=None):
        rows = model_inputs.get('rows', slice(None))  # a chunk of the batch selects its rows
        logps = torch.log_softmax(logits[rows], -1).gather(-1, ids[rows].unsqueeze(-1)).squeeze(-1)
        return logps, (entropies[rows] if compute_entropy else None)

    trainer._get_per_token_logps_and_entropies = fake
    return trainer


def swift_loss(trainer, batch):
    """The installed swift's built-in loss on the same trainer state (its own `_compute_loss_and_metrics`)."""
    return GRPOTrainer._compute_loss_and_metrics(trainer, None, {}, batch)


def our_loss(trainer, batch):
    return trainer._compute_loss_and_metrics(None, {}, batch)


def tiny_qwen2(vocab=97, layers=2, tied=False, lora=False, seed=0):
    """A small randomly initialised Qwen2ForCausalLM (optionally LoRA-wrapped on q/v), deterministic in `seed`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    model = Qwen2ForCausalLM(cfg)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=['q_proj', 'v_proj'], init_lora_weights=False))
    return model
