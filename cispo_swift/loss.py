"""CISPO maths, in plain torch (no swift import).

MiniMax-M1 (arXiv 2506.13585, §3.1), objective to maximise:

    J(θ) = 1/Σ|o_i| · Σ_i Σ_t  sg(r̂_{i,t}) · Â_{i,t} · log π_θ(o_{i,t})          (eq. 4)
    r = π_θ / π_old,  r̂ = clip(r, ...)  (two conventions, see `importance_weight`)

The weight is detached, so every token keeps a gradient through log π; PPO/GRPO instead zero the gradient of a
token whose ratio left the trust region. Nothing here reduces except `aggregate`.

Shapes: B = sequences in the micro-batch, T = completion positions (right-padded), mask [B, T] marks real
completion tokens. Sequence-level weights have shape [B, 1] and broadcast over T.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch

CLIP_MODES = ('absolute', 'relative')
NORM_MODES = ('token', 'sequence', 'prompt')

# k3 KL estimator bounds, as swift/TRL use them (keeps exp() finite).
_KL_LOG_RATIO_BOUND = 20.0
_KL_VALUE_BOUND = 10.0


def clip_bounds(eps_high: float, eps_low: Optional[float] = None, mode: str = 'absolute'):
    """The (lower, upper) bounds of the weight, `None` for an open side.

    absolute: w = min(r, eps_high); eps_high is the cap itself (swift, TRL, ScaleRL's ε_max).
    relative: w = clip(r, 1 - eps_low, 1 + eps_high) (MiniMax-M1 eq. 5); eps_low None means no lower bound.
    """
    if mode == 'absolute':
        return (None, float(eps_high))
    if mode == 'relative':
        return (None if eps_low is None else 1.0 - float(eps_low), 1.0 + float(eps_high))
    raise ValueError(f'clip mode {mode!r} is not one of {CLIP_MODES}')


def importance_weight(log_ratio: torch.Tensor, lower: Optional[float], upper: Optional[float]) -> torch.Tensor:
    """sg(clip(r, lower, upper)) with r = exp(log_ratio).

    Args:
        log_ratio: log π_θ − log π_old, [B, T] (token level) or [B, 1] (sequence level).
        lower, upper: bounds from `clip_bounds`; None leaves that side open.
    Returns:
        Detached weights, same shape, at least float32. exp() never sees a log-ratio far above log(upper), so an
        extreme ratio gives exactly `upper`, never inf; below the cap the value is exp(log_ratio) bit for bit.
    """
    log_ratio = log_ratio.detach()  # sg(.)
    if log_ratio.dtype not in (torch.float32, torch.float64):
        log_ratio = log_ratio.float()
    if upper is not None:
        log_ratio = log_ratio.clamp(max=math.log(upper) + 1.0)
    weight = torch.exp(log_ratio)
    if upper is not None or lower is not None:
        weight = weight.clamp(min=lower, max=upper)
    return weight


def sequence_log_ratio(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO's sequence-level log ratio: the mean token log ratio of each sequence, [B, T] -> [B, 1]."""
    mask = mask.to(log_ratio.dtype)
    return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)


def unified_token_mask(
    log_ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float
) -> torch.Tensor:
    """MiniMax-M1 eq. 7: M = 0 where (Â > 0 and r > 1 + eps_high) or (Â < 0 and r < 1 − eps_low), else 1.

    With small eps this drops exactly the tokens PPO's clipped objective gives no gradient (eq. 6 recovers
    PPO's trust region); with large eps it is plain CISPO. Returns a bool tensor broadcast to [B, T].
    """
    ratio = torch.exp(log_ratio.detach().double())
    drop = ((advantages > 0) & (ratio > 1.0 + eps_high)) | ((advantages < 0) & (ratio < 1.0 - eps_low))
    return ~drop


def per_token_loss(
    logps: torch.Tensor, weight: torch.Tensor, advantages: torch.Tensor, token_mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """ℓ = −M · sg(w) · Â · log π, [B, T]. No reduction.

    Args:
        logps: log π_θ of the sampled tokens, [B, T], carries the gradient.
        weight: detached CISPO weight from `importance_weight`, [B, T] or [B, 1].
        advantages: Â, [B, T] (swift expands per-sequence advantages to tokens) or [B, 1].
        token_mask: optional unified mask M (eq. 6), [B, T] bool.
    """
    loss = -weight * advantages * logps
    if token_mask is not None:
        loss = loss * token_mask
    return loss


def k3_kl(ref_logps: torch.Tensor, logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π_θ || π_ref) = exp(ref − θ) − (ref − θ) − 1, with swift's bounds. [B, T]."""
    log_ratio = torch.clamp(ref_logps - logps, min=-_KL_LOG_RATIO_BOUND, max=_KL_LOG_RATIO_BOUND)
    return torch.clamp(torch.exp(log_ratio) - log_ratio - 1, min=-_KL_VALUE_BOUND, max=_KL_VALUE_BOUND)


def token_scale(
    mask: torch.Tensor,
    mode: str,
    *,
    num_tokens: float,
    num_sequences: Optional[float] = None,
    group_tokens: Optional[torch.Tensor] = None,
    num_groups: Optional[float] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The factor s_{i,t} that `aggregate` applies to each token, [B, 1] or scalar.

    token:    s = 1 / N_tok                          (MiniMax-M1 eq. 4, DAPO: all tokens weigh the same)
    sequence: s = 1 / (|o_i| · N_seq)                (GRPO paper: mean of per-sequence means)
    prompt:   s = 1 / (Σ_{g∈G(i)} |o_g| · N_groups)  (ScaleRL prompt-level averaging)

    N_tok, N_seq and N_groups count the whole generation batch on all ranks; `group_tokens` [B] is the token
    count of the prompt group each sequence belongs to, also counted globally.
    """
    if mode == 'token':
        return torch.tensor(1.0 / max(float(num_tokens), 1.0), dtype=dtype, device=mask.device)
    if mode == 'sequence':
        seq_tokens = mask.to(dtype).sum(-1, keepdim=True).clamp(min=1.0)
        return 1.0 / (seq_tokens * max(float(num_sequences), 1.0))
    if mode == 'prompt':
        return 1.0 / (group_tokens.to(dtype).clamp(min=1.0).unsqueeze(-1) * max(float(num_groups), 1.0))
    raise ValueError(f'normalisation {mode!r} is not one of {NORM_MODES}')


def aggregate(loss_mat: torch.Tensor, mask: torch.Tensor, scale, world_size: int = 1) -> torch.Tensor:
    """Σ_{i,t} ℓ_{i,t} · m_{i,t} · s_{i,t} · world_size: this rank's share of the global objective.

    DDP averages gradients over ranks, hence the factor world_size: the ranks' results then average to the
    global sum. An empty mask gives an exact zero (with a graph), never NaN.
    """
    return torch.where(mask.bool(), loss_mat * scale, 0.0).sum() * world_size


def cispo_stats(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    lower: Optional[float],
    upper: Optional[float],
    ppo_epsilon: float,
) -> Dict[str, torch.Tensor]:
    """Per-rank sums for the diagnostics, to be added across ranks before dividing (exact global means).

    Returns float64 scalars: `tokens`; `clipped`, `clipped_pos`, `clipped_neg` (weight differs from r; split by
    the sign of Â); `ppo_zero_grad` (Â > 0 and r > 1 + ε, or Â < 0 and r < 1 − ε: tokens GRPO/PPO with the same ε
    give zero gradient and CISPO keeps); `ratio_sum`, `weight_sum`; and `ratio_min`, `ratio_max` (±inf when the
    rank has no token). Ratios are computed in float64, so up to exp(709) they are reported exactly.
    """
    log_ratio = log_ratio.detach().double().expand_as(mask)
    advantages = advantages.detach().expand_as(mask)
    mask = mask.bool()
    ratio = torch.exp(log_ratio)
    clipped = torch.zeros_like(mask)
    if upper is not None:
        clipped = clipped | (ratio > upper)
    if lower is not None:
        clipped = clipped | (ratio < lower)
    clipped = clipped & mask
    pos, neg = advantages > 0, advantages < 0
    zero_grad = ((pos & (ratio > 1.0 + ppo_epsilon)) | (neg & (ratio < 1.0 - ppo_epsilon))) & mask
    weight = ratio.clamp(min=lower, max=upper) if (lower is not None or upper is not None) else ratio
    inf = torch.tensor(float('inf'), dtype=torch.float64, device=ratio.device)
    return {
        'tokens': mask.sum().double(),
        'clipped': clipped.sum().double(),
        'clipped_pos': (clipped & pos).sum().double(),
        'clipped_neg': (clipped & neg).sum().double(),
        'ppo_zero_grad': zero_grad.sum().double(),
        'ratio_sum': torch.where(mask, ratio, 0.0).sum(),
        'weight_sum': torch.where(mask, weight, 0.0).sum(),
        'ratio_min': torch.where(mask, ratio, inf).min() if mask.numel() else inf,
        'ratio_max': torch.where(mask, ratio, -inf).max() if mask.numel() else -inf,
    }


def nonfinite_summary(tensors: Dict[str, Optional[torch.Tensor]], mask: torch.Tensor) -> Optional[str]:
    """Describe NaN/inf among the completion tokens of each [B, T] (or [B, 1]) tensor; None when all are finite.

    Padding positions are ignored: swift fills them with arbitrary values.
    """
    parts = []
    for name, x in tensors.items():
        if x is None:
            continue
        bad = ~torch.isfinite(x.detach()).expand_as(mask) & mask.bool()
        count = int(bad.sum())
        if count:
            rows = bad.any(-1).nonzero().flatten().tolist()
            parts.append(f'{name}: {count} token(s) in sequence(s) {rows}')
    return '; '.join(parts) or None


def finalize_stats(sums: Dict[str, float]) -> Dict[str, float]:
    """Turn globally summed `cispo_stats` into the logged metrics (fractions of all completion tokens)."""
    n = sums['tokens']
    if n <= 0:
        nan = float('nan')
        return {k: nan for k in METRIC_KEYS}
    return {
        'clip_frac': sums['clipped'] / n,
        'clip_frac_pos': sums['clipped_pos'] / n,
        'clip_frac_neg': sums['clipped_neg'] / n,
        'ppo_zero_grad_frac': sums['ppo_zero_grad'] / n,
        'ratio_mean': sums['ratio_sum'] / n,
        'ratio_min': sums['ratio_min'],
        'ratio_max': sums['ratio_max'],
        'weight_mean': sums['weight_sum'] / n,
    }


METRIC_KEYS = (
    'clip_frac',
    'clip_frac_pos',
    'clip_frac_neg',
    'ppo_zero_grad_frac',
    'ratio_mean',
    'ratio_min',
    'ratio_max',
    'weight_mean',
)
