"""The `cispo/*` metrics: per-rank sums from `loss.cispo_stats`, added over ranks before dividing, and kept in
swift's metric buckets (means over the logging window) with the ratio extremes as min/max over the window."""

from __future__ import annotations

from typing import Dict, Iterable

import torch

from cispo_swift import loss as L

EXTREMA = {'ratio_min': min, 'ratio_max': max}


def gather_sums(accelerator, stats: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """`loss.cispo_stats` of this rank, summed over all ranks (the extremes reduced by min/max)."""
    keys = [k for k in stats if k not in EXTREMA]
    local = torch.stack([stats[k] for k in keys] + [stats['ratio_min'], -stats['ratio_max']])
    gathered = accelerator.gather(local.unsqueeze(0))  # [ranks, keys + 2]: one gather, one host sync
    values = torch.cat([gathered[:, :-2].sum(0), gathered[:, -2:].min(0).values]).tolist()
    result = dict(zip(keys, values[:-2]))
    result['ratio_min'], result['ratio_max'] = values[-2], -values[-1]
    return result


def merge_sums(parts: Iterable[Dict[str, float]]) -> Dict[str, float]:
    """The sums of several chunks of one micro-batch as one (the extremes reduced by min/max)."""
    total: Dict[str, float] = {}
    for part in parts:
        for key, value in part.items():
            total[key] = EXTREMA.get(key, float.__add__)(total[key], value) if key in total else value
    return total


class Recorder:
    """Writes finalised metrics into swift's `_metrics[mode]` buckets; the extremes wait for `flush`."""

    def __init__(self):
        self.extrema = {'train': {}, 'eval': {}}

    def record(self, bucket, mode: str, sums: Dict[str, float]) -> None:
        if sums['tokens'] <= 0:
            return
        metrics = L.finalize_stats(sums)
        # swift's key, for dashboards built on it: clipped tokens with Â > 0, over all completion tokens.
        bucket['cispo_clip_ratio'].append(metrics['clip_frac_pos'])
        window = self.extrema[mode]
        for key, value in metrics.items():
            if key in EXTREMA:
                window[key] = EXTREMA[key](window.get(key, value), value)
            else:
                bucket[f'cispo/{key}'].append(value)

    def flush(self, logs: Dict[str, float], mode: str) -> None:
        """Minimum and maximum over the logging window, not the mean of per-step extremes."""
        prefix = 'eval_' if mode == 'eval' else ''
        for key, value in self.extrema[mode].items():
            logs[f'{prefix}cispo/{key}'] = value
        self.extrema[mode].clear()


class KLBudget:
    """CISPO_KL_BUDGET: skip the optimizer steps of a generation batch once the policy has drifted past the budget.

    `observe` sees the rank-summed stats of every training micro-batch (identical on all ranks, so every rank takes
    the same decision); once the mean approx_kl of one exceeds the budget, the batch is spent: the optimizer step it
    belongs to and every later one until `new_batch` (new completions) are skipped. The trainer asks `take_skip` at
    each optimizer step (it wraps the optimizer's `step`), so a skipped step leaves the weights and Adam's state as
    they were; `take_skip` records `cispo/kl_budget_skipped` (1 or 0 per optimizer step) in swift's metric bucket.
    """

    def __init__(self, budget: float):
        self.budget = budget
        self.spent = False
        self.skip_pending = False

    def new_batch(self) -> None:
        self.spent = False

    def observe(self, sums: Dict[str, float]) -> None:
        if sums['tokens'] > 0 and not sums['approx_kl_sum'] / sums['tokens'] <= self.budget:  # NaN spends it too
            self.spent = True
        if self.spent:
            self.skip_pending = True

    def take_skip(self, metrics: Dict[str, Dict]) -> bool:
        """Whether the optimizer step now due is skipped; `metrics` is swift's `_metrics` ({mode: bucket})."""
        skip, self.skip_pending = self.skip_pending, False
        metrics['train']['cispo/kl_budget_skipped'].append(float(skip))
        return skip
