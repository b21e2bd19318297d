"""swift's GRPOTrainer with the CISPO loss computed by `cispo_swift.loss`.

Only `--loss_type cispo` takes this path; every other loss type goes to swift's code untouched. The trainer
gathers tensors from swift's batch (log-probs from swift's own forward, advantages, masks), calls the pure
functions of `loss.py`, and reuses swift's helpers for everything around the loss (rollout importance-sampling
correction, off-policy sequence mask, gradient-accumulation scaling, CHORD/SDAR auxiliary losses).
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
from contextlib import contextmanager
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from accelerate.utils import gather_object, is_peft_model
from swift.rl_core.advantage import compute_sdar_loss
from swift.rl_core.data import GRPOBatch
from swift.rlhf_trainers import GRPOTrainer
from swift.rlhf_trainers.utils import compute_chord_loss
from swift.utils import get_logger
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl.trainer.grpo_trainer import nanmax, nanmin

from cispo_swift import compat
from cispo_swift import loss as L
from cispo_swift.config import DEFAULT_WEIGHT_CAP, CISPOConfig, current_config
from cispo_swift.fused import chunked_token_logps, fused_linear_logp_loss

logger = get_logger()

# The loss types swift 4.6's GRPOTrainer implements; anything else fails deep inside its loss.
SWIFT_LOSS_TYPES = ('grpo', 'bnpo', 'dr_grpo', 'dapo', 'cispo', 'sapo', 'real', 'fipo')
CONFIG_FILE = 'cispo_config.json'
# Saved with the settings but not compared on resume: it does not change the loss.
RESUME_UNCHECKED = ('allow_config_change',)
# How to set each saved setting back, for the resume error; the weight bounds follow from the others.
SETTING_FLAGS = {
    'epsilon_high': '--epsilon_high',
    'ppo_epsilon_for_metrics': '--epsilon',
    'importance_sampling_level': '--importance_sampling_level',
    'beta': '--beta',
    'loss_type': '--loss_type',
}


class CISPOGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose `--loss_type cispo` loss is exact, safe by default and observable (metrics `cispo/*`)."""

    # ---- set-up ---------------------------------------------------------------------------------------------

    def _prepare_algorithm_params(self):
        # Runs at the top of GRPOTrainer.__init__, before models are wrapped: the place to refuse bad settings.
        super()._prepare_algorithm_params()
        if self.loss_type not in SWIFT_LOSS_TYPES:
            raise ValueError(
                f'--loss_type {self.loss_type!r} is not a GRPO loss type. Valid: {", ".join(SWIFT_LOSS_TYPES)}. '
                'Fix the spelling (CISPO is `--loss_type cispo`).'
            )
        self.cispo_active = self.loss_type == 'cispo'
        if not self.cispo_active:
            return
        self.cispo_config: CISPOConfig = current_config()
        self._resolve_cispo_bounds()
        self._check_cispo_compatibility()
        self._check_distributed_launch()

    def _resolve_cispo_bounds(self):
        args, cfg = self.args, self.cispo_config
        explicit = args.epsilon_high is not None
        if not explicit:
            # swift falls back to --epsilon here, i.e. every weight capped at 0.2.
            eps_high = DEFAULT_WEIGHT_CAP if cfg.clip_mode == 'absolute' else DEFAULT_WEIGHT_CAP - 1.0
            self.cispo_default_note = (
                f'--epsilon_high not given: using {eps_high} (weight cap {DEFAULT_WEIGHT_CAP}, ScaleRL) instead of '
                f"swift's fallback to --epsilon={args.epsilon}, which would cap every weight at {args.epsilon}"
            )
        else:
            eps_high = float(args.epsilon_high)
            self.cispo_default_note = None
            if eps_high <= 0:
                raise ValueError(
                    f'--epsilon_high {eps_high} with --loss_type cispo: the bound must be positive. '
                    'Use e.g. --epsilon_high 5.0 (ScaleRL), or leave it unset for that default.'
                )
            if cfg.clip_mode == 'absolute' and eps_high < 1.0:
                raise ValueError(
                    f'--epsilon_high {eps_high} with --loss_type cispo caps the importance weight min(r, ε_high) '
                    f'at {eps_high} < 1: every on-policy token (r = 1) would be down-weighted to {eps_high}, '
                    'shrinking the whole loss. Use a cap ≥ 1, e.g. --epsilon_high 5.0 (ScaleRL). If you meant '
                    f'the relative convention clip(r, ·, 1 + ε_high) (verl, MiniMax-M1 eq. 5), set '
                    'CISPO_CLIP_MODE=relative.'
                )
        self.epsilon_high = eps_high
        self.cispo_lower, self.cispo_upper = L.clip_bounds(eps_high, cfg.eps_low, cfg.clip_mode)

    def _check_cispo_compatibility(self):
        args, cfg = self.args, self.cispo_config
        if args.use_liger_kernel:
            raise ValueError(
                '--use_liger_kernel with --loss_type cispo would bypass the cispo-swift loss (Liger computes its own '
                "CISPO, with swift's cap semantics). Remove --use_liger_kernel."
            )
        if args.delta is not None:
            logger.warning(
                f'--delta {args.delta} has no effect with --loss_type cispo: the two-sided clip of the ratio it '
                'bounds does not exist in CISPO (the clipped weight is detached). It is ignored.'
            )
        if args.importance_sampling_level in ('sequence', 'sequence_token') and cfg.norm == 'token':
            logger.warning(
                f'--importance_sampling_level {args.importance_sampling_level} with CISPO_NORM=token: each sequence '
                'has one weight, and the token-sum normalisation then weighs a sequence by its length. '
                'CISPO_NORM=sequence gives every sequence the same weight (GSPO averages per sequence).'
            )
        if cfg.anchor == 'rollout' and not args.use_vllm:
            raise ValueError(
                "CISPO_ANCHOR=rollout anchors the weight on the inference engine's log-probs, which swift "
                'collects only when generating with vLLM (--use_vllm true). Use --use_vllm true, or '
                'CISPO_ANCHOR=old.'
            )

    def _check_distributed_launch(self):
        """Refuse a multi-process launch that would train every process alone.

        Without a GPU, swift's launcher starts a gloo process group, but transformers only trains data-parallel
        on CPU with `--use_cpu true`; otherwise each process sees world size 1, trains on its own full batch
        (normalised by its own token count) and all of them write the same output_dir.
        """
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        world = torch.distributed.get_world_size()
        if world > 1 and self.args.world_size != world:
            raise RuntimeError(
                f'{world} processes were launched (NPROC_PER_NODE/torchrun), but the trainer runs with world size '
                f'{self.args.world_size}: each process would train alone on its own batch and overwrite the '
                "others' output. On a machine without GPUs add --use_cpu true (data parallel over gloo); "
                'otherwise launch a single process.'
            )

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._check_resume_settings()
        if not self.cispo_active:
            return
        if self.cispo_config.norm != 'token' and self.template.sequence_parallel_size > 1:
            raise ValueError(
                f'CISPO_NORM={self.cispo_config.norm} needs every sequence of the generation batch on its rank; '
                'sequence parallelism splits them. Use CISPO_NORM=token with --sequence_parallel_size > 1.'
            )
        if self.cispo_config.fp32_lm_head:
            _fp32_lm_head(self.accelerator.unwrap_model(self.model))
        self.cispo_fused = False
        if self.cispo_config.fused_logps:
            reason = self._fused_unsupported_reason()
            if reason:
                logger.info(f"cispo-swift: CISPO_FUSED_LOGPS=1 falls back to swift's log-prob path: {reason}.")
            else:
                self.cispo_fused = True
        self._cispo_extrema = {'train': {}, 'eval': {}}
        logger.info(self._cispo_summary())
        if self.accelerator.is_main_process:
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(os.path.join(self.args.output_dir, CONFIG_FILE), 'w') as f:
                json.dump(self.cispo_effective_settings(), f, indent=2, sort_keys=True)

    def cispo_effective_settings(self) -> Dict[str, Any]:
        """Everything that determines the CISPO loss: the options plus the swift flags that enter it."""
        return {
            **self.cispo_config.to_dict(),
            'epsilon_high': self.epsilon_high,
            'weight_lower': self.cispo_lower,
            'weight_upper': self.cispo_upper,
            'ppo_epsilon_for_metrics': self.epsilon_low,
            'importance_sampling_level': self.importance_sampling_level,
            'beta': self.beta,
        }

    def _cispo_summary(self) -> str:
        cfg = self.cispo_config
        lo, hi = self.cispo_lower, self.cispo_upper
        if cfg.clip_mode == 'absolute':
            weight = f'min(r, {hi})'
        else:
            weight = f'clip(r, {lo if lo is not None else "-inf"}, {hi})'
        parts = [
            f'cispo-swift: CISPO loss active: w = sg({weight}) [{cfg.clip_mode}]',
            f'norm={cfg.norm}',
            f'anchor={cfg.anchor}',
            f'unified_mask={f"on (eps {cfg.mask_eps_low:g}/{cfg.mask_eps_high:g})" if cfg.mask else "off"}',
            f'is_level={self.importance_sampling_level}',
            f'beta={self.beta}',
            f'fp32_lm_head={int(cfg.fp32_lm_head)}',
            f'fused_logps={int(cfg.fused_logps)}',
            f'ppo_epsilon(metric)={self.epsilon_low}',
        ]
        line = ', '.join(parts)
        if self.cispo_default_note:
            line += f'. {self.cispo_default_note}'
        return line

    # ---- fused log-probs (CISPO_FUSED_LOGPS) ------------------------------------------------------------------

    def _fused_unsupported_reason(self) -> Optional[str]:
        """Why the chunked LM-head path cannot serve this run, or None."""
        from transformers.integrations import is_deepspeed_zero3_enabled

        if self.is_multimodal:
            return 'multimodal models compute logits through their own heads'
        if self.template.sequence_parallel_size > 1:
            return 'sequence parallelism computes log-probs in its own (gathering) path'
        if is_deepspeed_zero3_enabled():
            return "DeepSpeed ZeRO-3 partitions the LM head weight outside the model's forward"
        model = self.accelerator.unwrap_model(self.model)
        base = model.get_base_model() if is_peft_model(model) else model
        config = getattr(base, 'config', None)
        for attr in ('final_logit_softcapping', 'logit_scale', 'logits_scaling', 'output_multiplier_scale'):
            if getattr(config, attr, None) not in (None, 1, 1.0):
                return f'the model transforms its logits ({attr}={getattr(config, attr)})'
        if _lm_head(model) is None:
            kind = type(_output_layer(model)).__name__
            return f'the output layer is {kind}, not a plain torch.nn.Linear (e.g. LoRA on lm_head)'
        return None

    def _hidden_states(self, model, model_inputs, head, logits_to_keep: int) -> torch.Tensor:
        """The last hidden states of the completion positions, [B, T, H], from swift's own forward (so DDP and
        DeepSpeed wrappers and hooks run) with the LM head bypassed: the model's "logits" are its hidden states."""
        if 'use_cache' in self.model_kwarg_keys:
            model_inputs['use_cache'] = False
        if 'logits_to_keep' in self.model_kwarg_keys:
            model_inputs['logits_to_keep'] = logits_to_keep + 1
        with _head_returns_hidden(head):
            hidden = model(**model_inputs).logits
        return hidden[:, -(logits_to_keep + 1) : -1, :]

    def _get_logps_via_local_forward(self, model, model_inputs, logits_to_keep, input_ids, compute_entropy=False):
        head = _lm_head(self.accelerator.unwrap_model(model)) if getattr(self, 'cispo_fused', False) else None
        if head is None:
            return super()._get_logps_via_local_forward(model, model_inputs, logits_to_keep, input_ids, compute_entropy)
        hidden = self._hidden_states(model, model_inputs, head, logits_to_keep)  # [B, T, H]; [1, nnz, H] padding-free
        targets = input_ids[:, -logits_to_keep:]
        B, T, H = hidden.shape
        logps, entropies = chunked_token_logps(
            hidden.reshape(B * T, H),
            head.weight,
            head.bias,
            targets.reshape(B * T),
            temperature=self.temperature,
            chunk_size=self.cispo_config.fused_chunk_size,
            fp32_head=self.cispo_config.fp32_lm_head,
            compute_entropy=compute_entropy,
        )
        return logps.view(B, T), (entropies.view(B, T) if entropies is not None else None)

    # ---- checkpoints ------------------------------------------------------------------------------------------

    def _save_checkpoint(self, *args, **kwargs):
        result = super()._save_checkpoint(*args, **kwargs)
        if getattr(self, 'cispo_active', False) and self.args.should_save:
            # Beside the weights, so that a resume can be checked against the settings they were trained with.
            checkpoint = os.path.join(self.args.output_dir, f'{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}')
            with open(os.path.join(checkpoint, CONFIG_FILE), 'w') as f:
                json.dump(self.cispo_effective_settings(), f, indent=2, sort_keys=True)
        return result

    def _warn_if_resume_mid_generation(self, checkpoint: str):
        """swift keeps the completions reused for num_iterations × steps_per_generation micro-steps in memory only
        (`_buffered_inputs`, `_step`); a resume regenerates at once, so it only continues the run exactly from a
        checkpoint taken where a new generation batch starts."""
        try:
            with open(os.path.join(checkpoint, 'trainer_state.json')) as f:
                step = int(json.load(f)['global_step'])
        except (OSError, ValueError, KeyError):
            return
        every = self.args.steps_per_generation * self.template.sequence_parallel_size * self.num_iterations
        micro_steps = step * self.args.gradient_accumulation_steps
        if micro_steps % every:
            logger.warning(
                f'Resuming from step {step}, in the middle of a generation batch: swift generates every {every} '
                f'micro-steps (num_iterations {self.num_iterations} × steps_per_generation '
                f'{self.args.steps_per_generation}) and does not save the batch being reused, so this run generates '
                'a new one now and its off-policy steps differ from an uninterrupted run. For exact resumes, save '
                f'at steps where step × gradient_accumulation_steps is a multiple of {every}.'
            )

    def _check_resume_settings(self):
        """Before training: refuse to resume from a checkpoint saved with other CISPO settings (or by a CISPO run
        resumed without `--loss_type cispo`), unless CISPO_ALLOW_CONFIG_CHANGE=1."""
        checkpoint = self.args.resume_from_checkpoint
        if not isinstance(checkpoint, str) or not os.path.isdir(checkpoint):
            return  # nothing to resume, or transformers will report the bad path
        if self.cispo_active:
            self._warn_if_resume_mid_generation(checkpoint)
        path = os.path.join(checkpoint, CONFIG_FILE)
        if not os.path.isfile(path):
            if self.cispo_active:
                logger.warning(
                    f'{checkpoint} has no {CONFIG_FILE} (not saved by cispo-swift, or by a version before 0.1): '
                    'the CISPO settings of this resumed run cannot be checked against those it was trained with.'
                )
            return
        with open(path) as f:
            saved = json.load(f)
        if self.cispo_active:
            cfg = self.cispo_config
            current = json.loads(json.dumps(self.cispo_effective_settings()))
        else:
            cfg = current_config()
            saved, current = {'loss_type': 'cispo'}, {'loss_type': self.loss_type}
        missing = object()
        changed = [
            (key, saved.get(key, missing), current.get(key, missing))
            for key in sorted(set(saved) | set(current))
            if key not in RESUME_UNCHECKED and saved.get(key, missing) != current.get(key, missing)
        ]
        if not changed:
            logger.info(f'cispo-swift: resuming from {checkpoint} with the CISPO settings it was saved with.')
            return

        def show(value):
            return 'absent' if value is missing else repr(value)

        lines = '\n'.join(f'  {key}: {show(old)} in the checkpoint, {show(new)} now' for key, old, new in changed)
        hints = [_setting_hint(key, old) for key, old, _ in changed if old is not missing]
        message = (
            f'Resuming from {checkpoint} with CISPO settings that differ from those saved in {path}:\n{lines}\n'
            'The loss would change in the middle of the run.'
        )
        if cfg.allow_config_change:
            logger.warning(f'{message} Continuing, because CISPO_ALLOW_CONFIG_CHANGE=1.')
            return
        restore = ', '.join(h for h in hints if h) or 'the values above'
        raise ValueError(
            f'{message} To resume as trained, use: {restore}. If the change is intended, set '
            'CISPO_ALLOW_CONFIG_CHANGE=1 (Python API: cispo_swift.configure(..., allow_config_change=True)).'
        )

    def _get_per_token_logps_and_entropies(self, model, model_inputs, grpo_batch, *args, **kwargs):
        # swift 4.6.0 widens the completion window of a batch holding an empty completion (EOS sampled first) to the
        # whole sequence and crashes; narrow it back first (cispo_swift/empty_completions.py). Other loss types keep
        # swift's behaviour.
        if getattr(self, 'cispo_active', False) and not self.template.padding_free and 'input_ids' in model_inputs:
            from cispo_swift.empty_completions import narrow_completion_frame

            narrow_completion_frame(grpo_batch, model_inputs['input_ids'].shape[-1])
        return super()._get_per_token_logps_and_entropies(model, model_inputs, grpo_batch, *args, **kwargs)

    # ---- normalisation metadata -------------------------------------------------------------------------------

    def _prepare_batch_inputs(self, samples):
        batches = super()._prepare_batch_inputs(samples)
        if self.cispo_active and self.cispo_config.norm != 'token':
            self._attach_group_counts(samples, batches)
        return batches

    def _attach_group_counts(self, samples, batches):
        """Global sequence, group and per-group token counts for `sequence`/`prompt` normalisation."""
        chunks = self.split_by_mini_batches(samples)
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
            gb.cispo_num_sequences = float(len(everything))
            gb.cispo_num_groups = float(len(group_tokens))
            gb.cispo_group_tokens = torch.tensor(
                [group_tokens[s.prompt_id] for s in chunk], dtype=torch.float32, device=gb.completion_mask.device
            )

    # ---- the loss ---------------------------------------------------------------------------------------------

    def _compute_loss_and_metrics(self, model, model_inputs: Dict[str, Any], grpo_batch: GRPOBatch):
        if not self.cispo_active:
            return super()._compute_loss_and_metrics(model, model_inputs, grpo_batch)
        mode = 'train' if self.model.training else 'eval'
        cfg = self.cispo_config
        completion_mask = grpo_batch.completion_mask  # [B, T]
        advantages = grpo_batch.advantages  # [B, T]
        # Overlong filter (DAPO): truncated completions leave the loss; swift's normaliser still counts them.
        if self.overlong_filter and grpo_batch.truncated_mask.any():
            completion_mask = completion_mask & ~grpo_batch.truncated_mask.unsqueeze(-1).expand_as(completion_mask)

        terms = _Terms(
            valid=grpo_batch.completion_mask.reshape(-1),
            mask=completion_mask.reshape(-1),
            advantages=advantages.reshape(-1),
            ref=(grpo_batch.ref_per_token_logps.reshape(-1) if self.beta != 0.0 and not self.kl_in_reward else None),
        )
        if self._fused_loss_applies(grpo_batch):
            # Three LM-head matmuls: the loss's gradient w.r.t. each chunk's log-probs is formed in the forward.
            old_logps = grpo_batch.old_per_token_logps
            rollout_metrics, rollout_is_weights = self._rollout_correction(old_logps, grpo_batch, completion_mask)
            terms.anchor = self._anchor_logps(grpo_batch, old_logps).reshape(-1)
            terms.rollout_weights = _flat(rollout_is_weights, completion_mask)
            terms.scale = _flat(self._token_scale(grpo_batch, completion_mask), completion_mask)
            policy_loss, logps, entropies = self._fused_policy_loss(model, model_inputs, grpo_batch, terms)
            entropy_mask, entropy_metrics = self._entropy_mask_and_metrics(entropies, grpo_batch.completion_mask)
        else:
            logps, entropies = self._get_per_token_logps_and_entropies(
                model, model_inputs, grpo_batch, compute_entropy=self.compute_entropy
            )  # [B, T]
            entropy_mask, entropy_metrics = self._entropy_mask_and_metrics(entropies, grpo_batch.completion_mask)
            old_logps = logps.detach() if grpo_batch.old_per_token_logps is None else grpo_batch.old_per_token_logps
            rollout_metrics, rollout_is_weights = self._rollout_correction(old_logps, grpo_batch, completion_mask)
            terms.anchor = self._anchor_logps(grpo_batch, old_logps).reshape(-1)
            if self.importance_sampling_level in ('sequence', 'sequence_token'):
                # With a detached weight, GSPO-token's sg[s]·π/sg[π] has the same value as the sequence weight.
                token_log_ratio = _masked_log_ratio(logps.detach(), terms.anchor.view_as(logps), completion_mask)
                terms.log_ratio = _flat(L.sequence_log_ratio(token_log_ratio, completion_mask), completion_mask)
            elif self.importance_sampling_level != 'token':
                raise ValueError(f'Unknown --importance_sampling_level {self.importance_sampling_level!r}.')
            terms.entropy_mask = _flat(entropy_mask, completion_mask)
            terms.rollout_weights = _flat(rollout_is_weights, completion_mask)
            if self.off_policy_sequence_mask_delta is not None:
                reference = grpo_batch.rollout_per_token_logps
                reference = old_logps if reference is None else reference
                seq_advantages = (advantages * completion_mask).sum(-1) / completion_mask.sum(-1).clamp(min=1.0)
                keep = self._compute_off_policy_sequence_mask(logps, reference, completion_mask, seq_advantages)
                completion_mask = completion_mask & keep.unsqueeze(-1).expand_as(completion_mask)
                terms.mask = completion_mask.reshape(-1)
            terms.scale = _flat(self._token_scale(grpo_batch, completion_mask), completion_mask)
            policy_loss = self._policy_objective(logps.reshape(-1), slice(None), terms)

        anchor_logps = terms.anchor.view_as(logps)
        if cfg.check_finite:  # before backward and the optimizer step
            self._check_finite(logps, anchor_logps, advantages, grpo_batch, completion_mask)
        loss = compat.undo_gradient_accumulation_scaling(self, policy_loss)

        if self.sdar_loss_coef > 0 and grpo_batch.teacher_per_token_logps is not None:
            sdar_loss, sdar_metrics = compute_sdar_loss(
                student_log_probs=logps,
                teacher_log_probs=grpo_batch.teacher_per_token_logps,
                response_mask=completion_mask,
                gate_beta=self.sdar_gate_beta,
            )
            loss = loss + self.sdar_loss_coef * sdar_loss
            for key, value in sdar_metrics.items():
                self._metrics[mode][key].append(value)
            self._metrics[mode]['sdar/coef'].append(self.sdar_loss_coef)

        log_ratio = _masked_log_ratio(logps.detach(), anchor_logps, grpo_batch.completion_mask)
        if terms.log_ratio is not None:
            log_ratio = terms.log_ratio.view_as(logps)
        metrics_data = {
            'mode': mode,
            'entropy': entropy_metrics,
            'completion_mask': completion_mask,
            'completion_token_count': completion_mask.sum().clamp(min=1.0),
            'cispo_sums': self._gathered_stats(log_ratio, advantages, completion_mask),
        }
        if terms.ref is not None:
            per_token_kl = L.k3_kl(grpo_batch.ref_per_token_logps, logps.detach())
            metrics_data['kl'] = self._gathered_token_mean(per_token_kl, completion_mask)
        if rollout_metrics:
            metrics_data['rollout_correction'] = compat.gather_rollout_metrics(self, rollout_metrics)
        if mode == 'train' and self.chord_sft_iterator is not None:
            loss = compute_chord_loss(self, grpo_loss=loss)
        return loss, metrics_data

    def _policy_objective(self, logps: torch.Tensor, sl: slice, terms: _Terms) -> torch.Tensor:
        """Σ_t ℓ_t · s_t over the flattened tokens `sl`: this rank's share of the loss (before swift's GA scaling).

        ℓ = −M · sg(clip(r)) · Â · log π  [· entropy mask]  [+ β · KL]  [· rollout IS weight]   (MiniMax-M1 eq. 4/6)
        One definition for both paths: the plain one calls it on all tokens, the fused one per chunk of tokens,
        differentiating it w.r.t. the chunk's log-probs. `logps` [n] is float32 or the model's dtype.
        """
        cfg = self.cispo_config
        if terms.log_ratio is not None:
            log_ratio = terms.log_ratio[sl]
        else:
            log_ratio = _masked_log_ratio(logps.detach(), terms.anchor[sl], terms.valid[sl])
        advantages = terms.advantages[sl]
        weight = L.importance_weight(log_ratio, self.cispo_lower, self.cispo_upper)  # sg(clip(r))
        token_mask = None
        if cfg.mask:
            token_mask = L.unified_token_mask(log_ratio, advantages, cfg.mask_eps_low, cfg.mask_eps_high)
        per_token = L.per_token_loss(logps, weight, advantages, token_mask)
        if terms.entropy_mask is not None:
            per_token = per_token * terms.entropy_mask[sl]
        if terms.ref is not None:
            per_token = per_token + self.beta * L.k3_kl(terms.ref[sl], logps)
        if terms.rollout_weights is not None:
            per_token = per_token * terms.rollout_weights[sl]
        return L.aggregate(per_token, terms.mask[sl], terms.scale[sl])

    def _anchor_logps(self, grpo_batch: GRPOBatch, old_logps: torch.Tensor) -> torch.Tensor:
        if self.cispo_config.anchor == 'old':
            return old_logps
        if grpo_batch.rollout_per_token_logps is None:
            raise RuntimeError(
                'CISPO_ANCHOR=rollout, but this batch carries no rollout log-probs (the inference engine '
                'returned none or their count did not match the completion tokens). Check that vLLM returns '
                'log-probs, or use CISPO_ANCHOR=old.'
            )
        return grpo_batch.rollout_per_token_logps

    def _fused_loss_applies(self, grpo_batch: GRPOBatch) -> bool:
        """The 3-matmul path needs a loss that is a per-token function of log π: no quantity that depends on
        the log-probs of other tokens (sequence weights, entropy quantile, off-policy sequence mask, SDAR)."""
        return (
            getattr(self, 'cispo_fused', False)
            and self.model.training
            and torch.is_grad_enabled()
            and grpo_batch.old_per_token_logps is not None
            and self.importance_sampling_level == 'token'
            and self.top_entropy_quantile >= 1.0
            and self.off_policy_sequence_mask_delta is None
            and not (self.sdar_loss_coef > 0 and grpo_batch.teacher_per_token_logps is not None)
            and not self.template.padding_free
        )

    def _fused_policy_loss(self, model, model_inputs, grpo_batch: GRPOBatch, terms: _Terms):
        """(loss, log-probs [B, T] detached, entropies or None) through `fused.fused_linear_logp_loss`."""
        logits_to_keep = grpo_batch.logits_to_keep
        input_ids = model_inputs['input_ids']
        head = _lm_head(self.accelerator.unwrap_model(model))
        hidden = self._hidden_states(model, model_inputs, head, logits_to_keep)  # [B, T, H]
        B, T, H = hidden.shape

        def coef_fn(chunk_logps, start, end):
            with torch.enable_grad():
                leaf = chunk_logps.detach().requires_grad_(True)
                value = self._policy_objective(leaf, slice(start, end), terms)
                (grad,) = torch.autograd.grad(value, leaf)
            return value.detach(), grad

        loss, logps, entropies = fused_linear_logp_loss(
            hidden.reshape(B * T, H),
            head.weight,
            head.bias,
            input_ids[:, -logits_to_keep:].reshape(B * T),
            coef_fn,
            temperature=self.temperature,
            chunk_size=self.cispo_config.fused_chunk_size,
            fp32_head=self.cispo_config.fp32_lm_head,
            compute_entropy=self.compute_entropy,
        )
        return loss, logps.view(B, T), (entropies.view(B, T) if entropies is not None else None)

    def _check_finite(self, logps, anchor_logps, advantages, grpo_batch: GRPOBatch, completion_mask):
        tensors = {'log-probs': logps, f'{self.cispo_config.anchor} log-probs': anchor_logps, 'advantages': advantages}
        if self.beta != 0.0 and not self.kl_in_reward:
            tensors['reference log-probs'] = grpo_batch.ref_per_token_logps
        problem = L.nonfinite_summary(tensors, completion_mask)
        if problem:
            step = getattr(getattr(self, 'state', None), 'global_step', '?')
            raise FloatingPointError(
                f'Non-finite values at global step {step} (rank {self.accelerator.process_index}, sequence indices '
                f'within this micro-batch): {problem}. The loss would be NaN; training stops before the optimizer '
                'step. Usual causes: an exploding learning rate or grad norm (lower --learning_rate, set '
                '--max_grad_norm), fp16 overflow (use bf16), or a reward function returning NaN/inf. '
                'CISPO_CHECK_FINITE=0 turns this check off.'
            )

    def _token_scale(self, grpo_batch: GRPOBatch, completion_mask: torch.Tensor):
        norm = self.cispo_config.norm
        world = self.accelerator.num_processes
        if norm == 'token':
            # Same normaliser as swift's built-in cispo: completion tokens of the generation batch, all ranks.
            # Rank losses are Σ/(N/P); DDP's gradient average over P ranks turns them into Σ_all/N.
            return world / grpo_batch.num_items_in_batch
        num_sequences = getattr(grpo_batch, 'cispo_num_sequences', None)
        if num_sequences is None:
            raise RuntimeError(f'CISPO_NORM={norm}: the batch lacks its group counts (internal error).')
        scale = L.token_scale(
            completion_mask,
            norm,
            num_tokens=float(grpo_batch.num_items_in_batch),
            num_sequences=num_sequences,
            group_tokens=grpo_batch.cispo_group_tokens,
            num_groups=grpo_batch.cispo_num_groups,
        )
        return scale * world

    def _entropy_mask_and_metrics(self, entropies: Optional[torch.Tensor], completion_mask: torch.Tensor):
        """swift's entropy logging and top-entropy token mask (arXiv 2506.01939), same semantics."""
        if not self.compute_entropy:
            return None, {}
        entropies = entropies.masked_fill(completion_mask == 0, float('nan'))
        metrics = {}
        if self.args.log_entropy:
            per_completion = self.accelerator.gather(torch.nanmean(entropies, dim=1))
            metrics = {
                'entropy_logs': per_completion.tolist(),
                'entropy_mean': per_completion.nanmean().item(),
                'entropy_max': nanmax(per_completion).item(),
                'entropy_min': nanmin(per_completion).item(),
            }
        entropy_mask = None
        if self.args.top_entropy_quantile < 1.0:
            threshold = torch.nanquantile(entropies.flatten().float(), 1 - self.top_entropy_quantile)
            metrics['entropy_threshold'] = threshold.item()
            entropy_mask = entropies >= threshold
        return entropy_mask, metrics

    def _rollout_correction(self, old_logps, grpo_batch: GRPOBatch, completion_mask):
        """swift's rollout (train/inference mismatch) diagnostics and IS weights, through swift's helpers."""
        wanted = self.rollout_importance_sampling_mode is not None or self.log_rollout_offpolicy_metrics
        has_rollout = grpo_batch.rollout_per_token_logps is not None
        if self.disable_rollout_importance_sampling or not (wanted and all(gather_object([has_rollout]))):
            return {}, None
        rollout_logps = grpo_batch.rollout_per_token_logps
        metrics = self._compute_rollout_offpolicy_metrics(old_logps, rollout_logps, completion_mask)
        rollout_log_ratio, weights = self._get_rollout_is_correction(old_logps, rollout_logps, completion_mask)
        if rollout_log_ratio is not None:
            metrics.update(self._compute_is_correction_metrics(rollout_log_ratio, weights, completion_mask))
        return metrics, weights

    def _gathered_stats(self, log_ratio, advantages, completion_mask) -> Dict[str, float]:
        """`loss.cispo_stats` summed (min/max reduced) over all ranks."""
        stats = L.cispo_stats(
            log_ratio, advantages, completion_mask, self.cispo_lower, self.cispo_upper, self.epsilon_low
        )
        keys = [k for k in stats if k not in ('ratio_min', 'ratio_max')]
        summed = self.accelerator.gather(torch.stack([stats[k] for k in keys]).unsqueeze(0)).sum(0)
        result = dict(zip(keys, summed.tolist()))
        extrema = self.accelerator.gather(torch.stack([stats['ratio_min'], -stats['ratio_max']]).unsqueeze(0))
        result['ratio_min'] = extrema[:, 0].min().item()
        result['ratio_max'] = -extrema[:, 1].min().item()
        return result

    def _gathered_token_mean(self, values: torch.Tensor, mask: torch.Tensor) -> float:
        """Mean of `values` [B, T] over the completion tokens of all ranks. swift's metrics average the per-rank
        means instead, which over-weights the tokens of a rank with fewer of them."""
        local = torch.stack([(values.detach() * mask).sum(), mask.sum()]).double().unsqueeze(0)  # [1, 2]
        total = self.accelerator.gather(local).sum(0)
        return (total[0] / total[1].clamp(min=1.0)).item()

    # ---- chunked path (--dynamic_num_samples) ---------------------------------------------------------------

    def _compute_loss_chunked(self, model, model_inputs, grpo_batch, origin_data=None):
        """swift averages chunk losses weighted by samples, which shrinks a Σ/N loss by about the number of
        chunks. CISPO's chunk losses are each Σ_chunk/N already, so the batch loss is their plain sum."""
        if not self.cispo_active:
            return super()._compute_loss_chunked(model, model_inputs, grpo_batch, origin_data)
        mode = 'train' if self.model.training else 'eval'
        chunk_size = self.args.per_device_train_batch_size if mode == 'train' else self.args.per_device_eval_batch_size
        batch_size = (
            grpo_batch.seq_lengths.shape[0] if self.template.padding_free else model_inputs['input_ids'].shape[0]
        )
        max_chunks = max((bs + chunk_size - 1) // chunk_size for bs in gather_object([batch_size]))
        new_chunk_size = (batch_size + max_chunks - 1) // max_chunks
        losses, all_metrics = [], []
        chunk_inputs, chunk_batch = {}, None
        for chunk_idx in range(max_chunks):
            start = chunk_idx * new_chunk_size
            end = min(start + new_chunk_size, batch_size)
            is_dummy = start >= batch_size
            if not is_dummy:
                chunk_inputs, chunk_batch = self.get_chunked_inputs(model_inputs, grpo_batch, start, end, origin_data)
                _copy_group_counts(grpo_batch, chunk_batch, start, end)
            # Every rank runs the same number of forwards; a dummy one repeats the last chunk with weight 0.
            chunk_loss, chunk_metrics = self._compute_loss_and_metrics(model, chunk_inputs, chunk_batch)
            losses.append(chunk_loss * 0.0 if is_dummy else chunk_loss)
            if not is_dummy:
                all_metrics.append((chunk_metrics, end - start))
        self._aggregate_and_update_metrics(all_metrics, mode)
        return torch.stack(losses).sum()

    # ---- metrics ----------------------------------------------------------------------------------------------

    def _update_metrics(self, metrics_data):
        sums = metrics_data.pop('cispo_sums', None)
        super()._update_metrics(metrics_data)
        if sums is not None:
            self._record_cispo_metrics(metrics_data['mode'], sums)

    def _aggregate_and_update_metrics(self, all_metrics_data, mode):
        if not self.cispo_active or not all_metrics_data:
            return super()._aggregate_and_update_metrics(all_metrics_data, mode)
        total: Dict[str, float] = {}
        for chunk_metrics, _ in all_metrics_data:
            for key, value in chunk_metrics.pop('cispo_sums').items():
                if key not in total:
                    total[key] = value
                elif key == 'ratio_min':
                    total[key] = min(total[key], value)
                elif key == 'ratio_max':
                    total[key] = max(total[key], value)
                else:
                    total[key] += value
        super()._aggregate_and_update_metrics(all_metrics_data, mode)
        self._record_cispo_metrics(mode, total)

    def _record_cispo_metrics(self, mode: str, sums: Dict[str, float]):
        if sums['tokens'] <= 0:
            return
        metrics = L.finalize_stats(sums)
        bucket = self._metrics[mode]
        # swift's key, for dashboards built on it: clipped tokens with Â > 0, over all completion tokens.
        bucket['cispo_clip_ratio'].append(metrics['clip_frac_pos'])
        extrema = self._cispo_extrema[mode]
        for key, value in metrics.items():
            if key == 'ratio_min':
                extrema[key] = min(extrema.get(key, value), value)
            elif key == 'ratio_max':
                extrema[key] = max(extrema.get(key, value), value)
            else:
                bucket[f'cispo/{key}'].append(value)

    def log(self, logs: Dict[str, float], start_time: Optional[float] = None) -> None:
        if getattr(self, 'cispo_active', False):
            mode = 'train' if self.model.training else 'eval'
            prefix = 'eval_' if mode == 'eval' else ''
            # Minimum and maximum over the logging window, not the mean of per-step extremes.
            for key, value in self._cispo_extrema[mode].items():
                logs[f'{prefix}cispo/{key}'] = value
            self._cispo_extrema[mode].clear()
        super().log(logs, start_time)


def _setting_hint(key: str, value) -> Optional[str]:
    """How to set a saved setting back: `CISPO_NORM=token`, `--beta 0.04`; None for derived ones."""
    if key in SETTING_FLAGS:
        return f'{SETTING_FLAGS[key]} {value}'
    if key in {f.name for f in dataclasses.fields(CISPOConfig)}:
        if value is None:
            return f'unset CISPO_{key.upper()}'
        return f'CISPO_{key.upper()}={int(value) if isinstance(value, bool) else value}'
    return None


def _copy_group_counts(source: GRPOBatch, target: GRPOBatch, start: int, end: int):
    if getattr(source, 'cispo_group_tokens', None) is None:
        return
    target.cispo_num_sequences = source.cispo_num_sequences
    target.cispo_num_groups = source.cispo_num_groups
    target.cispo_group_tokens = source.cispo_group_tokens[start:end]


@dataclasses.dataclass
class _Terms:
    """Per-token inputs of the policy objective, flattened to [B·T] (see `_policy_objective`)."""

    valid: torch.Tensor  # bool, real completion tokens
    mask: torch.Tensor  # bool, tokens in the loss (after the overlong filter / off-policy mask)
    advantages: torch.Tensor
    ref: Optional[torch.Tensor] = None  # reference log-probs when the KL term is on
    anchor: Optional[torch.Tensor] = None  # log π_old (or the rollout log-probs)
    log_ratio: Optional[torch.Tensor] = None  # precomputed (sequence-level) log-ratio, else from anchor
    entropy_mask: Optional[torch.Tensor] = None
    rollout_weights: Optional[torch.Tensor] = None
    scale: Any = None  # per-token normalisation factor s (tensor [B·T])


def _flat(x: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    """[B, T], [B, 1] or a scalar, broadcast to `like` [B, T] and flattened; None stays None."""
    if x is None:
        return None
    x = torch.as_tensor(x, device=like.device)
    return x.expand(like.shape).reshape(-1)


def _masked_log_ratio(logps: torch.Tensor, anchor: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    # Padding positions hold arbitrary values; a zero log-ratio there keeps NaN/inf out of weights and grads.
    return (logps - anchor).masked_fill(~valid, 0.0)


def _output_layer(model: torch.nn.Module) -> Optional[torch.nn.Module]:
    base = model.get_base_model() if is_peft_model(model) else model
    return base.get_output_embeddings() if hasattr(base, 'get_output_embeddings') else None


def _lm_head(model: torch.nn.Module) -> Optional[torch.nn.Linear]:
    """The model's output layer when it is a plain nn.Linear (the fused path needs its weight and bias)."""
    head = _output_layer(model)
    return head if type(head) is torch.nn.Linear else None


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


def _identity(hidden_states: torch.Tensor) -> torch.Tensor:
    return hidden_states


def _fp32_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    bias = None if self.bias is None else self.bias.float()
    return F.linear(hidden_states.float(), self.weight.float(), bias)


def _fp32_lm_head(model: torch.nn.Module) -> None:
    """MiniMax-M1's precision fix: the LM head computes its logits in float32 whatever the model's dtype."""
    head = _lm_head(model)
    if head is None:
        raise ValueError(
            f'CISPO_FP32_LM_HEAD=1 needs a plain torch.nn.Linear output layer; this model has '
            f'{type(_output_layer(model)).__name__} (e.g. a LoRA-wrapped lm_head). Unset CISPO_FP32_LM_HEAD or keep '
            'lm_head out of --target_modules.'
        )
    head.forward = types.MethodType(_fp32_forward, head)
