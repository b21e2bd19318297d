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
    summed = accelerator.gather(torch.stack([stats[k] for k in keys]).unsqueeze(0)).sum(0)
    result = dict(zip(keys, summed.tolist()))
    extrema = accelerator.gather(torch.stack([stats['ratio_min'], -stats['ratio_max']]).unsqueeze(0))
    result['ratio_min'] = extrema[:, 0].min().item()
    result['ratio_max'] = -extrema[:, 1].min().item()
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
