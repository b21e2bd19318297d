"""swift's GRPOTrainer with `--loss_type cispo` computed by `loss.cispo_objective`: an adapter.

Only `--loss_type cispo` takes this path; every other loss type reaches swift's code untouched. For a CISPO
micro-batch the trainer gathers swift's tensors (log-probs from swift's own forward or the fused head, advantages,
masks, anchors), hands them to the pure objective in `loss.py`, and logs the `cispo/*` metrics. Around it:
`config` (options and start-up checks), `mirror` (the blocks of swift's loss method it re-enters), `fused_head`
(CISPO_FUSED_LOGPS, CISPO_FP32_LM_HEAD), `resume` (settings saved with checkpoints), `metrics`, `step_gate` (which
micro-batches and optimizer steps run).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
from swift.rl_core.data import GRPOBatch
from swift.rlhf_trainers import GRPOTrainer
from swift.utils import get_logger
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from cispo_swift import config as C
from cispo_swift import fused_head, guards, mirror, norm, resume, step_gate
from cispo_swift import loss as L
from cispo_swift import metrics as M
from cispo_swift.empty_completions import narrow_completion_frame

logger = get_logger()


class CISPOGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose `--loss_type cispo` loss is exact, safe by default and observable (metrics `cispo/*`)."""

    cispo_active = False  # set in _prepare_algorithm_params, which swift's __init__ calls first
    cispo_fused = False
    cispo_budget: Optional[M.KLBudget] = None

    # ---- set-up ---------------------------------------------------------------------------------------------

    def _prepare_algorithm_params(self):
        # Runs at the top of GRPOTrainer.__init__, before models are wrapped: the place to refuse bad settings.
        super()._prepare_algorithm_params()
        self.cispo_active = self.loss_type == 'cispo'
        if not self.cispo_active:
            C.check_loss_type(self.loss_type)
            C.warn_unused_options(self.loss_type)
            return
        self.cispo_config: C.CISPOConfig = C.current_config()
        self.cispo_resolved = C.check_run(self.args, self.cispo_config)
        self.epsilon_high = self.cispo_resolved.eps_high  # swift's attribute, for its own code that reads it
        cfg, beta = self.cispo_config, self.args.beta  # swift's self.beta is args.beta, set after this method
        self.cispo_objective = L.Objective(
            lower=self.cispo_resolved.lower,
            upper=self.cispo_resolved.upper,
            mask_eps=(cfg.mask_eps_low, cfg.mask_eps_high) if cfg.mask else None,
            beta=beta if beta != 0.0 and not self.kl_in_reward else 0.0,  # swift's condition for the KL term
        )
        self.cispo_recorder = M.Recorder()
        if cfg.kl_budget is not None:
            self.cispo_budget = M.KLBudget(cfg.kl_budget)
        C.check_launch(self.args)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._check_resume()
        if not self.cispo_active:
            return
        cfg, model = self.cispo_config, self.accelerator.unwrap_model(self.model)
        if cfg.fp32_lm_head and not fused_head.fp32_lm_head(model) and not (self.args.bf16 or self.args.fp16):
            C.warn_once('CISPO_FP32_LM_HEAD=1 has no effect: the LM head is float32 already and no autocast runs.')
        if cfg.fused_logps:
            reason = fused_head.unsupported_reason(self)
            self.cispo_fused = reason is None
            if reason:
                C.warn_once(f"CISPO_FUSED_LOGPS=1 has no effect, swift's log-prob path runs: {reason}.")
        logger.info(self._cispo_summary())
        if self.accelerator.is_main_process:
            resume.write_settings(self.args.output_dir, self.cispo_effective_settings())

    def cispo_effective_settings(self) -> Dict[str, Any]:
        """Everything that determines the CISPO loss: the options plus the swift flags that enter it."""
        return C.effective_settings(self.args, self.cispo_config, self.cispo_resolved)

    def _cispo_summary(self) -> str:
        line = C.summary_line(self.cispo_effective_settings(), fused_active=self.cispo_fused)
        note = self.cispo_resolved.default_note
        return f'{line}. {note}' if note else line

    # ---- checkpoints ------------------------------------------------------------------------------------------

    def _save_checkpoint(self, *args, **kwargs):
        result = super()._save_checkpoint(*args, **kwargs)
        if self.cispo_active and self.args.should_save:
            # Beside the weights, so that a resume can be checked against the settings they were trained with.
            checkpoint = os.path.join(self.args.output_dir, f'{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}')
            resume.write_settings(checkpoint, self.cispo_effective_settings())
        return result

    def _check_resume(self):
        checkpoint = self.args.resume_from_checkpoint
        saved = resume.saved_settings(checkpoint)
        if not self.cispo_active:
            # Not a CISPO run: swift's behaviour is unchanged; the log says the loss changes from the checkpoint's.
            if saved is not None:
                logger.warning(
                    f'cispo-swift: {checkpoint} was trained with --loss_type cispo; this run resumes it with '
                    f'--loss_type {self.loss_type}, so the loss changes here (--loss_type cispo resumes as trained).'
                )
            return
        resume.check_checkpoint_path(checkpoint)
        if not isinstance(checkpoint, str):
            return
        every = self.args.steps_per_generation * self.template.sequence_parallel_size * self.num_iterations
        resume.warn_if_mid_generation(checkpoint, every, self.args.gradient_accumulation_steps, logger.warning)
        if saved is None:
            logger.warning(
                f'{checkpoint} has no {resume.CONFIG_FILE} (not saved by cispo-swift): the CISPO settings of this '
                'resumed run cannot be checked against those it was trained with.'
            )
            return
        current = self.cispo_effective_settings()
        resume.compare_settings(checkpoint, saved, current, self.cispo_config.allow_config_change, logger)

    # ---- log-probs and normalisation metadata -----------------------------------------------------------------

    def _get_per_token_logps_and_entropies(self, model, model_inputs, grpo_batch, *args, **kwargs):
        # swift 4.6.0 widens the completion window of a batch holding an empty completion (EOS sampled first) to the
        # whole sequence and crashes; narrow it back first (empty_completions.py). Other loss types: swift's code.
        # The fused loss path needs π_old, computed through here first, so it only ever sees narrowed batches.
        if self.cispo_active and not self.template.padding_free and 'input_ids' in model_inputs:
            narrow_completion_frame(grpo_batch, model_inputs['input_ids'].shape[-1])
        return super()._get_per_token_logps_and_entropies(model, model_inputs, grpo_batch, *args, **kwargs)

    def _get_logps_via_local_forward(self, model, model_inputs, logits_to_keep, input_ids, compute_entropy=False):
        if not self.cispo_fused:
            return super()._get_logps_via_local_forward(model, model_inputs, logits_to_keep, input_ids, compute_entropy)
        return fused_head.token_logps(self, model, model_inputs, logits_to_keep, input_ids, compute_entropy)

    def _prepare_batch_inputs(self, samples):
        batches = super()._prepare_batch_inputs(samples)
        if self.cispo_active and self.cispo_config.norm != 'token':
            norm.attach_group_counts(self, samples, batches)
        return batches

    # ---- the KL budget (CISPO_KL_BUDGET) ----------------------------------------------------------------------

    def _generate_and_score_completions(self, inputs):
        # A new generation batch: its completions come from the current policy, so the budget starts again.
        if self.cispo_budget is not None and self.model.training:
            self.cispo_budget.new_batch()
        return super()._generate_and_score_completions(inputs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.cispo_active:
            step_gate.gate_steps(self)
            if step_gate.reuses_spent_batch(self):
                return step_gate.skip_micro_batch(self)
        return super().training_step(model, inputs, num_items_in_batch)

    # ---- the loss ---------------------------------------------------------------------------------------------

    def _compute_loss_and_metrics(self, model, model_inputs: Dict[str, Any], grpo_batch: GRPOBatch):
        if not self.cispo_active:
            return super()._compute_loss_and_metrics(model, model_inputs, grpo_batch)
        mode = 'train' if self.model.training else 'eval'
        step = self._policy_step(model, model_inputs, grpo_batch)
        if self.cispo_config.check_finite:  # before backward and the optimizer step
            self._check_finite(step, grpo_batch)
        loss = mirror.auxiliary_losses(self, step.loss, step.logps, step.mask, grpo_batch, mode)
        if self.cispo_config.check_finite and not bool(torch.isfinite(loss.detach()).all()):
            raise guards.nonfinite_loss_error(
                loss, step.token_log_ratio, step.mask, self.cispo_resolved.upper, self.cispo_objective.beta,
                self.state.global_step, self.accelerator.process_index,
                step.tokens.advantages.view_as(step.mask), step.logps.detach(),
            )  # fmt: skip
        # The weight's log r: the token's own, or GSPO's sequence ratio where the objective was given one.
        log_ratio = step.token_log_ratio if step.tokens.log_ratio is None else step.tokens.log_ratio.view_as(step.mask)
        kl = None if self.cispo_objective.beta == 0.0 else L.k3_kl(grpo_batch.ref_per_token_logps, step.logps.detach())
        stats = L.cispo_stats(
            log_ratio,
            grpo_batch.advantages,
            step.mask,
            *self._bounds,
            self.epsilon_low,
            kl,
            token_log_ratio=step.token_log_ratio,
        )
        sums = M.gather_sums(self.accelerator, stats)
        if self.cispo_budget is not None and mode == 'train':
            self.cispo_budget.observe(sums)
            if self.cispo_budget.skip_pending and self.accelerator.num_processes == 1 and not self.is_deepspeed_enabled:
                # This step is skipped: its backward would be wasted. (Under DDP, ZeRO or FSDP the backward runs: the
                # forward has already armed the wrapper's gradient reduction, which expects it.)
                loss = loss.detach().requires_grad_()
        metrics_data = {
            'mode': mode,
            'entropy': step.entropy_metrics,
            'completion_mask': step.mask,
            'completion_token_count': step.mask.sum().clamp(min=1.0),
            'cispo_sums': sums,
        }
        if kl is not None:
            metrics_data['kl'] = mirror.kl_metric(self, kl, step.mask)
        if step.rollout_metrics:
            metrics_data['rollout_correction'] = step.rollout_metrics
        return loss, metrics_data

    @property
    def _bounds(self):
        return self.cispo_resolved.lower, self.cispo_resolved.upper

    def _policy_step(self, model, model_inputs, grpo_batch: GRPOBatch) -> _Step:
        """Log-probs and the policy loss of one micro-batch. The one place where the fused and the plain path differ:
        the fused one (a loss per token of log π) evaluates the objective chunk by chunk inside the LM head; the
        plain one takes swift's log-probs and may need them first (sequence weights, entropy or off-policy masks)."""
        valid, mask = grpo_batch.completion_mask, mirror.loss_mask(self, grpo_batch)
        old = grpo_batch.old_per_token_logps
        if self._fused_loss_applies(grpo_batch):
            tokens, rollout_metrics = self._token_inputs(grpo_batch, old, mask, mask)
            loss, logps, entropies = fused_head.objective_with_logps(
                self, model, model_inputs, grpo_batch, tokens, self.cispo_objective
            )
            _, entropy_metrics = mirror.entropy_mask_and_metrics(self, entropies, valid)
            log_ratio = L.token_log_ratio(logps, tokens.anchor.view_as(mask))
            return _Step(loss, logps, mask, tokens, log_ratio, entropy_metrics, rollout_metrics)
        logps, entropies = self._get_per_token_logps_and_entropies(
            model, model_inputs, grpo_batch, compute_entropy=self.compute_entropy
        )
        entropy_mask, entropy_metrics = mirror.entropy_mask_and_metrics(self, entropies, valid)
        old = logps.detach() if old is None else old
        loss_mask = mirror.off_policy_mask(self, logps, old, mask, grpo_batch)
        tokens, rollout_metrics = self._token_inputs(grpo_batch, old, mask, loss_mask, entropy_mask)
        token_log_ratio = L.token_log_ratio(logps, tokens.anchor.view_as(mask))
        seq_log_ratio = mirror.sequence_log_ratio(self, torch.where(mask, token_log_ratio, 0.0), mask)
        if seq_log_ratio is not None:
            tokens.log_ratio = seq_log_ratio.expand_as(mask).reshape(-1)
        loss = L.cispo_objective(logps.reshape(-1), tokens, self.cispo_objective)
        return _Step(loss, logps, loss_mask, tokens, token_log_ratio, entropy_metrics, rollout_metrics)

    def _token_inputs(self, grpo_batch, old_logps, mask, loss_mask, entropy_mask=None):
        """The objective's per-token inputs [B·T] and swift's rollout-correction metrics. `mask` (after the overlong
        filter) is what swift's rollout correction sees; `loss_mask` adds the off-policy sequence mask."""
        rollout_metrics, rollout_weights = mirror.rollout_correction(self, old_logps, grpo_batch, mask)
        tokens = L.TokenInputs.flatten(
            loss_mask,
            advantages=grpo_batch.advantages,
            loss_mask=loss_mask,
            scale=norm.token_scale(self, grpo_batch, loss_mask),
            anchor=self._anchor_logps(grpo_batch, old_logps),
            ref_logps=grpo_batch.ref_per_token_logps if self.cispo_objective.beta != 0.0 else None,
            entropy_mask=entropy_mask,
            rollout_weights=rollout_weights,
        )
        return tokens, rollout_metrics

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
            self.cispo_fused
            and self.model.training
            and torch.is_grad_enabled()
            and grpo_batch.old_per_token_logps is not None
            and self.importance_sampling_level == 'token'
            and self.top_entropy_quantile >= 1.0
            and self.off_policy_sequence_mask_delta is None
            and not (self.sdar_loss_coef > 0 and grpo_batch.teacher_per_token_logps is not None)
            and not self.template.padding_free
        )

    def _check_finite(self, step: _Step, grpo_batch: GRPOBatch):
        """Every tensor that reaches the loss or its gradient, on the tokens that enter the loss."""
        t = step.tokens
        tensors = {
            'log-probs': step.logps,
            f'{self.cispo_config.anchor} log-probs': t.anchor if t.log_ratio is None else t.log_ratio,
            'advantages': t.advantages,
            'reference log-probs': t.ref_logps,
            'rollout importance weights': t.rollout_weights,
            'normalisation scale': t.scale,
        }
        tensors = {name: None if x is None else x.reshape(step.mask.shape) for name, x in tensors.items()}
        problem = L.nonfinite_summary(tensors, step.mask)
        if problem:
            raise FloatingPointError(
                f'Non-finite values at global step {self.state.global_step} (rank {self.accelerator.process_index}, '
                f'sequence indices within this micro-batch): {problem}. The loss would be NaN; training stops before '
                'the optimizer step. Usual causes: an exploding learning rate or grad norm (lower --learning_rate, '
                'set --max_grad_norm), fp16 overflow (use bf16), a temperature that is not a finite number > 0, or a '
                'reward function returning inf (NaN rewards are not a cause: swift sums them as 0, its "not '
                'applicable"). '
                'CISPO_CHECK_FINITE=0 turns this check off.'
            )

    def _compute_loss_chunked(self, model, model_inputs, grpo_batch, origin_data=None):
        if not self.cispo_active:
            return super()._compute_loss_chunked(model, model_inputs, grpo_batch, origin_data)
        loss, all_metrics = mirror.chunked_loss(
            self, model, model_inputs, grpo_batch, origin_data, norm.copy_group_counts
        )
        self._aggregate_and_update_metrics(all_metrics, 'train' if self.model.training else 'eval')
        return loss

    # ---- metrics ----------------------------------------------------------------------------------------------

    def _update_metrics(self, metrics_data):
        sums = metrics_data.pop('cispo_sums', None)
        super()._update_metrics(metrics_data)
        if sums is not None:
            mode = metrics_data['mode']
            self.cispo_recorder.record(self._metrics[mode], mode, sums)

    def _aggregate_and_update_metrics(self, all_metrics_data, mode):
        if not self.cispo_active or not all_metrics_data:
            return super()._aggregate_and_update_metrics(all_metrics_data, mode)
        sums = M.merge_sums([chunk_metrics.pop('cispo_sums') for chunk_metrics, _ in all_metrics_data])
        super()._aggregate_and_update_metrics(all_metrics_data, mode)
        self.cispo_recorder.record(self._metrics[mode], mode, sums)

    def log(self, logs: Dict[str, float], start_time: Optional[float] = None) -> None:
        if self.cispo_active:
            self.cispo_recorder.flush(logs, 'train' if self.model.training else 'eval')
        super().log(logs, start_time)


@dataclass
class _Step:
    """One micro-batch's policy loss and what the metrics and checks read: log-probs [B, T], the loss mask [B, T],
    the objective's inputs [B·T], the token log-ratio log r [B, T] (detached), swift's entropy and rollout-correction
    metrics."""

    loss: torch.Tensor
    logps: torch.Tensor
    mask: torch.Tensor
    tokens: L.TokenInputs
    token_log_ratio: torch.Tensor
    entropy_metrics: Dict
    rollout_metrics: Dict
