"""Everything that differs between the ms-swift versions cispo-swift supports, in one place.

Supported: ms-swift >=4.5.3,<4.7 (tested: 4.5.3 and 4.6.0). Between 4.5.3 and 4.6.0 the GRPO loss path differs in
two ways that reach the CISPO loss (file/line refer to the installed wheels):

- Gradient accumulation. transformers' `Trainer.training_step` divides every micro-batch loss by the number of
  accumulation steps (GA). swift's `num_items_in_batch` already counts the tokens of the whole generation batch,
  so that division shrinks a Σ/N loss by GA. 4.6.0 multiplies it back for cispo/dapo/fipo
  (`GRPOTrainer._undo_gradient_accumulation_scaling`, rlhf_trainers/grpo_trainer.py L1132/L1228); 4.5.3 does
  not (L1140-1143), so its built-in `--loss_type cispo` trains with a gradient GA times too small. We apply
  4.6.0's rule on both.
- Rollout-correction metrics. 4.5.3's `_compute_rollout_offpolicy_metrics` / `_compute_is_correction_metrics`
  return floats already averaged over ranks (gather_for_metrics inside, L2420-2600); 4.6.0's return per-rank
  tensors, gathered by the loss (L1184-1192) and averaged as tensors in `log` (L1865-1872), which would fail on
  floats.

Everything else the trainer uses (GRPOBatch with per-token advantages [B, T], `num_items_in_batch`, the helper
methods and their signatures, `compute_sdar_loss`, `compute_chord_loss`, the plugin loader) is the same in both.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

# Keep in step with `dependencies` in pyproject.toml (tests/test_compat.py checks it).
SUPPORTED_SWIFT = '>=4.5.3,<4.7'


class UnsupportedSwiftVersion(ImportError):
    """The installed ms-swift is outside `SUPPORTED_SWIFT`."""


def installed_swift_version() -> Optional[str]:
    """The installed ms-swift's version, None if it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version('ms-swift')
    except PackageNotFoundError:
        pass
    try:  # a source checkout on sys.path has no distribution metadata
        from swift.version import __version__
    except ImportError:
        return None
    return __version__


def check_swift_version(found: Optional[str] = None) -> str:
    """Raise `UnsupportedSwiftVersion` unless ms-swift `found` (default: the installed one) is supported."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    found = installed_swift_version() if found is None else found
    fix = f"Install a supported one: pip install 'ms-swift{SUPPORTED_SWIFT}'."
    if found is None:
        raise UnsupportedSwiftVersion(f'cispo-swift needs ms-swift{SUPPORTED_SWIFT}, which is not installed. {fix}')
    try:
        supported = SpecifierSet(SUPPORTED_SWIFT).contains(Version(found), prereleases=True)
    except InvalidVersion:
        supported = False
    if not supported:
        raise UnsupportedSwiftVersion(
            f'cispo-swift supports ms-swift{SUPPORTED_SWIFT}, but ms-swift {found} is installed: its GRPO trainer '
            f'internals, which the CISPO loss hooks into, are untested there. {fix}'
        )
    return found


def swift_undoes_ga_scaling() -> bool:
    """Whether swift's own GRPOTrainer compensates the Trainer's division by GA for cispo (ms-swift ≥ 4.6)."""
    from swift.rlhf_trainers import GRPOTrainer

    return hasattr(GRPOTrainer, '_undo_gradient_accumulation_scaling')


def undo_gradient_accumulation_scaling(trainer, loss: torch.Tensor) -> torch.Tensor:
    """loss · GA, so that after the Trainer's division by GA the gradient of a window is Σ_window / N.

    `loss` must be the Σ/N policy loss alone; micro-batch-mean auxiliary losses (SDAR, CHORD) are added after.
    """
    native = getattr(trainer, '_undo_gradient_accumulation_scaling', None)
    if native is not None:  # ms-swift ≥ 4.6
        return native(loss)
    # ms-swift 4.5: the same rule as 4.6.0's (the Trainer divides exactly under these conditions).
    if trainer.model.training and not trainer.model_accepts_loss_kwargs and trainer.compute_loss_func is None:
        steps = getattr(trainer, 'current_gradient_accumulation_steps', trainer.args.gradient_accumulation_steps)
        loss = loss * steps
    return loss


def gather_rollout_metrics(trainer, metrics: Dict[str, object]) -> Dict[str, object]:
    """swift's rollout-correction metrics, averaged over ranks, in the form this swift's `log` expects.

    ms-swift ≥ 4.6 hands back per-rank tensors: gather one row per rank here (keeping gather_for_metrics'
    remainder handling), mean over ranks, max/min for the log-PPL extremes. ms-swift 4.5 hands back floats it has
    gathered already: pass them through.
    """
    if not all(isinstance(value, torch.Tensor) for value in metrics.values()):
        return metrics
    values = torch.stack(list(metrics.values())).detach().unsqueeze(0)
    gathered = trainer.accelerator.gather_for_metrics(values)
    result = dict(zip(metrics, gathered.nanmean(0).unbind()))
    for key, reduce in (('log_ppl_diff_max', torch.max), ('log_ppl_diff_min', torch.min)):
        if key in metrics:
            result[key] = reduce(gathered[:, list(metrics).index(key)])
    return result
