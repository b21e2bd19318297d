"""cispo-swift under swift's Megatron CLI: `megatron rlhf --rlhf_type grpo --loss_type cispo --external_plugins ...`.

swift's Megatron GRPO trainer (`swift/megatron/trainers/grpo_trainer.py::MegatronGRPOTrainer`, ms-swift 4.6.0) is
picked by name (`swift/megatron/pipelines/train/rlhf.py`), not through TrainerFactory, and computes its loss in
`loss_func(self, output_tensor, data)`. Its CISPO is `clamp(r, max=epsilon_high).detach() * A * logp` with
`epsilon_high` falling back to `--epsilon` (0.2): without a cap given, every weight is capped at 0.2.

The plugin file, loaded while swift parses `MegatronRLHFArguments` (registry.load_plugin):

- `check_args`: refuses the CISPO_* options not implemented under Megatron (`IMPLEMENTED` lists the others), runs
  the same start-up checks as for `swift rlhf` (`config.check_run`), and sets the resolved cap on the parsed
  arguments (`args.epsilon_high`), so swift's own Megatron loss uses it;
- `install`, for the run `check_args` passed: once swift has filled in its defaults and started torch.distributed,
  logs the settings and writes `cispo_config.json` to the output directory; patches
  `MegatronGRPOTrainer.loss_func` for `--loss_type cispo`.

The patched loss (`loss_func`) gets `output_tensor` = log π [B, T] of the micro-batch and `data['grpo_batch']`
(old/ref log-probs, per-token advantages, masks, `num_items_in_batch`), with tensor, pipeline and context
parallelism and packing already undone by swift's `forward_step`. It calls swift's loss_func for its loss, metrics
and logging; with a lower bound (CISPO_CLIP_MODE=relative with CISPO_EPS_LOW) or CISPO_MASK=1 it returns
`loss.cispo_objective`'s loss instead (swift's formula has neither), normalised as swift normalises its CISPO.
It adds the `cispo/*` metrics and, with CISPO_CHECK_FINITE, checks the loss's inputs and the loss.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict, Optional

import torch

from cispo_swift import config as C
from cispo_swift import loss as L

# The CISPO_* options implemented under Megatron; every other one is refused there when set.
IMPLEMENTED = ('clip_mode', 'eps_low', 'mask', 'mask_eps_low', 'mask_eps_high', 'check_finite')
# The ms-swift release whose Megatron code the patch was written against and tested with; other 4.6.x are accepted.
TESTED_SWIFT = '4.6.0'

# swift flags whose part of swift's loss `loss_func` does not reproduce when it computes its own loss (lower
# bound, unified mask): (flag, test that it is active, the value that works).
_NOT_MIRRORED = (
    ('importance_sampling_level', lambda v: v != 'token', 'token'),
    ('top_entropy_quantile', lambda v: v < 1.0, '1.0'),
    ('rollout_importance_sampling_mode', lambda v: v is not None, 'unset'),
    ('off_policy_sequence_mask_delta', lambda v: v is not None, 'unset'),
)


def is_megatron_args(args) -> bool:
    """Whether `args` are the arguments of swift's Megatron CLI (MegatronRLHFArguments and its relatives)."""
    return any(cls.__module__.startswith('swift.megatron.') for cls in type(args).__mro__)


def own_loss(cfg: C.CISPOConfig) -> bool:
    """Whether the loss differs from swift's CISPO with the resolved cap: a lower bound (relative mode with
    CISPO_EPS_LOW) or the unified mask. Without them the relative mode is swift's min(r, 1 + ε_high)."""
    return (cfg.clip_mode == 'relative' and cfg.eps_low is not None) or cfg.mask


def check_args(args, cfg: C.CISPOConfig) -> C.Resolved:
    """The start-up checks of a `megatron rlhf --loss_type cispo` run, on the arguments swift is parsing (ValueError:
    what, why, what to do). Sets the resolved weight cap as `args.epsilon_high`, logs it, and records the run for
    `install`."""
    global _run
    from cispo_swift.compat import installed_swift_version

    found = installed_swift_version()
    if found is None or not found.startswith(TESTED_SWIFT.rsplit('.', 1)[0] + '.'):
        raise ValueError(
            f'cispo-swift under Megatron (megatron rlhf) supports ms-swift 4.6 (tested with {TESTED_SWIFT}): it '
            f'patches its Megatron GRPO loss, but ms-swift {found} is installed. Install ms-swift=={TESTED_SWIFT}, or '
            'train with swift rlhf.'
        )
    default = C.CISPOConfig()
    unsupported = [
        f'CISPO_{f.name.upper()}={_show(getattr(cfg, f.name))}'
        for f in dataclasses.fields(cfg)
        if f.name not in IMPLEMENTED and getattr(cfg, f.name) != getattr(default, f.name)
    ]
    if unsupported:
        implemented = ', '.join(f'CISPO_{name.upper()}' for name in IMPLEMENTED)
        raise ValueError(
            f'{", ".join(unsupported)}: not implemented under Megatron (megatron rlhf), so the run would not do what '
            f'it says. Unset {"it" if len(unsupported) == 1 else "them"} for Megatron, or train with swift rlhf '
            f'(single process, DDP, DeepSpeed, FSDP2), where every option works. Implemented under Megatron: '
            f'{implemented}; see docs/megatron.md.'
        )
    if getattr(args, 'skip_megatron_init', False):
        raise ValueError(
            'megatron rlhf --use_ray with cispo-swift: the Ray pipeline uses its own GRPO trainer '
            '(swift/ray/megatron), which the plugin does not patch. Run megatron rlhf without --use_ray, or leave the '
            'plugin out.'
        )
    if own_loss(cfg):
        for flag, active, works in _NOT_MIRRORED:
            value = getattr(args, flag, None)
            if value is not None and active(value):
                raise ValueError(
                    f'--{flag} {value} with {_own_loss_options(cfg)} under Megatron: these options make cispo-swift '
                    f"compute the loss itself, and that computation does not include what --{flag} does in swift's "
                    f"Megatron loss. Use --{flag} {works}, or leave CISPO_EPS_LOW and CISPO_MASK unset (swift's "
                    'own loss with the cap then runs, with every swift option).'
                )
    resolved = C.check_run(args, cfg)
    # swift's Megatron loss reads the cap here (MegatronGRPOTrainer._init_grpo_params: epsilon_high, falling back to
    # --epsilon). It is the absolute cap min(r, ε_high) there, so in relative mode it gets the upper bound 1 + ε_high.
    args.epsilon_high = resolved.upper
    from swift.utils import get_logger

    get_logger().info(f'cispo-swift (Megatron): {resolved.default_note or f"CISPO weight cap {resolved.upper}"}.')
    _run = _Run(cfg, resolved, args)
    return resolved


def _show(value) -> str:
    return str(int(value)) if isinstance(value, bool) else 'unset' if value is None else str(value)


def _own_loss_options(cfg: C.CISPOConfig) -> str:
    given = [f'CISPO_CLIP_MODE=relative, CISPO_EPS_LOW={cfg.eps_low}'] if cfg.eps_low is not None else []
    given += ['CISPO_MASK=1'] if cfg.mask else []
    return ', '.join(given)


# ---- after argument parsing ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Run:
    """A run `check_args` passed: what the patched loss needs (the plugin file runs in the trainer's process)."""

    config: C.CISPOConfig
    resolved: C.Resolved
    args: Any


_run: Optional[_Run] = None


def install(args) -> None:
    """For the `--loss_type cispo` run `check_args` passed on `args`: patch swift's Megatron GRPO loss, and write
    the settings once swift's arguments are complete. Nothing for other runs (other loss types keep swift's loss)."""
    if _run is None or _run.args is not args:
        return
    patch_loss_func()
    _after_distributed_init(args, lambda: _settings_ready(args, _run.config, _run.resolved))


def _after_distributed_init(args, then: Callable[[], None]) -> None:
    """Run `then` right after `args._init_distributed()`, the last step of swift's Megatron argument set-up
    (`MegatronArguments.__post_init__`, ms-swift 4.6.0): the defaults (--beta, the versioned --output_dir) are
    filled in and torch.distributed is up, so the rank is known. The wrapper is an attribute of this instance only
    and removes itself before it runs (swift writes the instance's attributes to args.json)."""
    original = args._init_distributed

    def init_distributed():
        del args.__dict__['_init_distributed']
        original()
        then()

    args.__dict__['_init_distributed'] = init_distributed


def effective_settings(args, cfg: C.CISPOConfig, resolved: C.Resolved) -> Dict[str, Any]:
    """`config.effective_settings` of a Megatron run: the engine named, since some options mean less there."""
    return {**C.effective_settings(args, cfg, resolved), 'engine': 'megatron'}


def _settings_ready(args, cfg: C.CISPOConfig, resolved: C.Resolved) -> None:
    from swift.utils import get_logger

    from cispo_swift import resume

    settings = effective_settings(args, cfg, resolved)
    note = f'. {resolved.default_note}' if resolved.default_note else ''
    get_logger().info(f'{C.summary_line(settings)} [Megatron]{note}')
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        resume.write_settings(args.output_dir, settings)


# ---- the loss -----------------------------------------------------------------------------------------------------


def patch_loss_func() -> None:
    """Route `MegatronGRPOTrainer.loss_func` through `loss_func` below (once; other loss types reach swift's)."""
    from swift.megatron.trainers.grpo_trainer import MegatronGRPOTrainer

    current = MegatronGRPOTrainer.loss_func
    if getattr(current, '_cispo_original', None) is not None:
        return

    def patched(self, output_tensor, data):
        if self.loss_type != 'cispo':
            return current(self, output_tensor, data)
        return loss_func(self, output_tensor, data, current)

    patched._cispo_original = current
    MegatronGRPOTrainer.loss_func = patched


def loss_func(trainer, output_tensor: torch.Tensor, data: Dict[str, Any], swift_loss_func, run=None):
    """The CISPO loss of one micro-batch under Megatron: (loss, reporting metrics), as swift's loss_func returns.

    `output_tensor`: log π of the completion tokens [B, T]; `data['grpo_batch']`: swift's GRPOBatch of the
    micro-batch (advantages, old_per_token_logps, ref_per_token_logps [B, T], completion_mask [B, T] bool,
    truncated_mask [B], num_items_in_batch: completion tokens of the optimizer step over all data-parallel ranks).
    """
    run = run or _run
    cfg, resolved = run.config, run.resolved
    batch = data['grpo_batch']
    mask = loss_mask(trainer, batch)
    logps, old = output_tensor, batch.old_per_token_logps
    use_kl = trainer.beta != 0.0 and batch.ref_per_token_logps is not None and not trainer.kl_in_reward
    if cfg.check_finite:
        _check_inputs(logps, old, batch, use_kl, mask)
    loss, metrics = swift_loss_func(trainer, output_tensor, data)  # its metrics and logging, whatever the loss
    if own_loss(cfg):
        loss = objective_loss(trainer, logps, batch, mask, resolved, cfg, use_kl)
        metrics['loss'] = _dp_mean(loss.detach())
    token_log_ratio = logps.detach() - old
    if cfg.check_finite and not bool(torch.isfinite(loss.detach()).all()):
        from cispo_swift.guards import nonfinite_loss_error

        raise nonfinite_loss_error(
            loss, token_log_ratio, mask, resolved.upper, trainer.beta if use_kl else 0.0, _iteration(trainer), _rank()
        )
    log_ratio = token_log_ratio
    if trainer.importance_sampling_level != 'token':  # swift's weight uses the sequence's mean log ratio
        log_ratio = L.sequence_log_ratio(torch.where(mask, token_log_ratio, 0.0), mask)
    kl = L.k3_kl(batch.ref_per_token_logps, logps.detach()) if use_kl else None
    stats = L.cispo_stats(
        log_ratio, batch.advantages, mask, resolved.lower, resolved.upper, trainer.epsilon_low, kl, token_log_ratio
    )
    metrics.update(metric_pairs(stats, device=loss.device))
    return loss, metrics


def loss_mask(trainer, batch) -> torch.Tensor:
    """The tokens in swift's Megatron loss: completion tokens, less truncated completions with --overlong_filter
    (as `MegatronGRPOTrainer.loss_func` filters them, ms-swift 4.6.0). [B, T] bool."""
    mask = batch.completion_mask.bool()
    if trainer.args.overlong_filter and batch.truncated_mask.any():
        mask = mask & ~batch.truncated_mask.unsqueeze(-1)
    return mask


def objective_loss(trainer, logps, batch, mask, resolved: C.Resolved, cfg: C.CISPOConfig, use_kl: bool):
    """`loss.cispo_objective` on one micro-batch, normalised as swift's Megatron CISPO: the token sum over the
    optimizer step's completion tokens per data-parallel rank, times the number of micro-batches (Megatron divides
    each micro-batch's loss by it). `logps` [B, T] carries the gradient."""
    from megatron.core import mpu

    normalizer = (batch.num_items_in_batch / mpu.get_data_parallel_world_size()).clamp(min=1.0)
    objective = L.Objective(
        lower=resolved.lower,
        upper=resolved.upper,
        mask_eps=(cfg.mask_eps_low, cfg.mask_eps_high) if cfg.mask else None,
        beta=trainer.beta if use_kl else 0.0,
    )
    tokens = L.TokenInputs.flatten(
        mask,
        advantages=batch.advantages,
        loss_mask=mask,
        scale=trainer.args.num_microbatches / normalizer,
        anchor=batch.old_per_token_logps,
        ref_logps=batch.ref_per_token_logps if use_kl else None,
    )
    return L.cispo_objective(logps.reshape(-1), tokens, objective)


# The `cispo/*` metrics as (numerator, denominator) pairs: swift's Megatron trainer adds such pairs over micro-batches
# and logging steps and logs their ratio (`BaseMegatronTrainer._aggregated_metrics`), an exact mean over all tokens.
_PAIRS = {
    'clip_frac': 'clipped',
    'clip_frac_pos': 'clipped_pos',
    'clip_frac_neg': 'clipped_neg',
    'ppo_zero_grad_frac': 'ppo_zero_grad',
    'ratio_mean': 'ratio_sum',
    'weight_mean': 'weight_sum',
    'approx_kl': 'approx_kl_sum',
    'kl': 'kl_sum',
}


def metric_pairs(stats: Dict[str, torch.Tensor], device) -> Dict[str, torch.Tensor]:
    """`loss.cispo_stats` of this rank, summed over the data-parallel ranks, as `cispo/<name>`: [sum, tokens]."""
    from megatron.core import mpu

    names = [name for name, key in _PAIRS.items() if key in stats]
    sums = torch.stack([stats[_PAIRS[name]] for name in names] + [stats['tokens']]).to(device)
    torch.distributed.all_reduce(sums, group=mpu.get_data_parallel_group())
    sums = sums.float()
    return {f'cispo/{name}': torch.stack([sums[i], sums[-1]]) for i, name in enumerate(names)}


def _dp_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean over data-parallel ranks, as swift's `_all_reduce_metric` reports its loss (SUM then divide: gloo
    has no AVG)."""
    from megatron.core import mpu

    value = value.clone()
    torch.distributed.all_reduce(value, group=mpu.get_data_parallel_group())
    return value / mpu.get_data_parallel_world_size()


def _check_inputs(logps, old, batch, use_kl: bool, mask) -> None:
    tensors = {
        'log-probs': logps,
        'old log-probs': old,
        'advantages': batch.advantages,
        'reference log-probs': batch.ref_per_token_logps if use_kl else None,
    }
    problem = L.nonfinite_summary(tensors, mask)
    if problem:
        raise FloatingPointError(
            f'Non-finite values (rank {_rank()}, sequence indices within this micro-batch): {problem}. The loss would '
            'be NaN; training stops before the backward pass. Usual causes: an exploding learning rate or grad norm '
            '(lower --lr, keep --clip_grad), fp16 overflow (use bf16), a temperature that is not a finite number > 0. '
            'CISPO_CHECK_FINITE=0 turns this check off.'
        )


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else int(os.environ.get('RANK', '0'))


def _iteration(trainer) -> Any:
    state = getattr(trainer, 'state', None)
    return getattr(state, 'iteration', '?')
