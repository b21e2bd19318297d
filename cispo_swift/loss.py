"""CISPO maths, in plain torch (no swift import).

MiniMax-M1 (arXiv 2506.13585, §3.1), objective to maximise:

    J(θ) = 1/Σ|o_i| · Σ_i Σ_t  sg(r̂_{i,t}) · Â_{i,t} · log π_θ(o_{i,t})          (eq. 4)
    r = π_θ / π_old,  r̂ = clip(r, ...)  (two conventions, see `importance_weight`)

The weight is detached, so every token keeps a gradient through log π; PPO/GRPO instead zero the gradient of a
token whose ratio left the trust region. Nothing here reduces except `aggregate`; `cispo_objective` composes the
pieces into the loss the trainer optimises (the plain and the fused log-prob paths both call it).

Shapes: B = sequences in the micro-batch, T = completion positions (right-padded), mask [B, T] marks real
completion tokens. Sequence-level weights have shape [B, 1] and broadcast over T. `TokenInputs` holds the same
per-token quantities flattened to [N] = [B·T].
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

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
    Raises:
        ValueError: `upper` not > 0 or NaN, `lower` negative or NaN, or `lower` > `upper`.
    """
    _check_bounds(lower, upper)
    log_ratio = at_least_float32(log_ratio.detach())  # sg(.)
    if upper is not None:
        log_ratio = log_ratio.clamp(max=math.log(upper) + 1.0)
    weight = torch.exp(log_ratio)
    if upper is not None or lower is not None:
        weight = weight.clamp(min=lower, max=upper)
    return weight


def _check_bounds(lower: Optional[float], upper: Optional[float]) -> None:
    if upper is not None and not upper > 0:  # NaN fails too
        raise ValueError(
            f'upper={upper}: the cap of the CISPO weight must be a positive number (inf for no cap); the weight is '
            'min(r, upper) with r = π_θ/π_old > 0. Pass e.g. upper=5.0, or None for an open side.'
        )
    if lower is not None and not 0 <= lower <= (math.inf if upper is None else upper):
        raise ValueError(
            f'lower={lower}: the lower bound of the CISPO weight must lie in [0, upper={upper}] (None: no lower bound).'
        )


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
        token_mask: optional unified mask M (eq. 6), [B, T] bool; dropped tokens are selected away (0), not
            multiplied, in the weight and in the loss, so a non-finite weight there (an uncapped r past float32)
            reaches neither the loss nor the gradient (0 · inf in backward would be NaN).
    """
    if token_mask is not None:
        weight = torch.where(token_mask, weight, 0.0)
    loss = -weight * advantages * logps
    if token_mask is not None:
        loss = torch.where(token_mask, loss, 0.0)
    return loss


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32 when its dtype is narrower (bf16, fp16); float32 and float64 pass unchanged. Differentiable."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def token_log_ratio(logps: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """log r = log π_θ − log π_anchor per token, detached, in float32 at least whatever the model's dtype: in bf16 the
    difference of two log-probs near −10 keeps only 2-3 significant digits, and misses the cap."""
    return at_least_float32(logps.detach()) - at_least_float32(anchor)


def k3_kl(ref_logps: torch.Tensor, logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π_θ || π_ref) = exp(x) − x − 1 with x = ref − θ, with swift's bounds. [B, T].

    Computed in float32 at least (the gradient flows back to `logps` in its own dtype), as expm1(x) − x: near x = 0,
    where the KL is about x²/2, exp(x) − 1 would cancel to float32 rounding (as `cispo_stats`' approx_kl does)."""
    ref_logps, logps = at_least_float32(ref_logps), at_least_float32(logps)
    log_ratio = torch.clamp(ref_logps - logps, min=-_KL_LOG_RATIO_BOUND, max=_KL_LOG_RATIO_BOUND)
    return torch.clamp(torch.expm1(log_ratio) - log_ratio, min=-_KL_VALUE_BOUND, max=_KL_VALUE_BOUND)


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


def aggregate(loss_mat: torch.Tensor, mask: torch.Tensor, scale) -> torch.Tensor:
    """Σ_{i,t} ℓ_{i,t} · m_{i,t} · s_{i,t}: the one reduction. An empty mask gives an exact zero (with a graph).

    Data parallel: DDP averages gradients over P ranks, so each rank's scale carries a factor P (the trainer's
    `s = P / N` for token normalisation); the ranks' results then average to the global Σ · s.
    """
    return torch.where(mask.bool(), loss_mat * scale, 0.0).sum()


@dataclass(frozen=True)
class Objective:
    """The options of `cispo_objective`, resolved from CISPO_* and swift's flags (see `config.resolve`).

    lower, upper: bounds of the weight from `clip_bounds` (None: open side; upper may be inf).
    mask_eps: (ε_low, ε_high) of the unified mask (MiniMax-M1 eq. 6–7), None when the mask is off.
    beta: coefficient of the k3 KL penalty towards π_ref, 0 for none.
    """

    lower: Optional[float]
    upper: Optional[float]
    mask_eps: Optional[Tuple[float, float]] = None
    beta: float = 0.0


@dataclass
class TokenInputs:
    """Per-token inputs of `cispo_objective`, each [N] (the B·T tokens of a micro-batch, flattened) or None.

    Exactly one of `anchor` and `log_ratio` is given. `tokens[a:b]` slices every tensor (the fused path evaluates
    the objective one chunk of tokens at a time).
    """

    advantages: torch.Tensor  # Â
    loss_mask: torch.Tensor  # bool: the tokens that enter the loss
    scale: torch.Tensor  # normalisation factor s_t (see `token_scale`), times the number of ranks
    anchor: Optional[torch.Tensor] = None  # denominator of r: log π_old, or the inference engine's log-probs
    log_ratio: Optional[torch.Tensor] = None  # a precomputed log r (GSPO's sequence-level ratio, per token)
    ref_logps: Optional[torch.Tensor] = None  # log π_ref, needed when Objective.beta != 0
    entropy_mask: Optional[torch.Tensor] = None  # bool: the top-entropy tokens (arXiv 2506.01939)
    rollout_weights: Optional[torch.Tensor] = None  # rollout importance-sampling correction weights

    @classmethod
    def flatten(cls, like: torch.Tensor, **tensors) -> TokenInputs:
        """From [B, T], [B, 1] or scalar tensors (or None), broadcast to `like` [B, T] and flattened to [B·T]."""
        flat = {
            name: None if x is None else torch.as_tensor(x, device=like.device).expand(like.shape).reshape(-1)
            for name, x in tensors.items()
        }
        return cls(**flat)

    def __getitem__(self, index: slice) -> TokenInputs:
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return dataclasses.replace(self, **{name: x[index] for name, x in given.items() if x is not None})


def cispo_objective(logps: torch.Tensor, tokens: TokenInputs, objective: Objective) -> torch.Tensor:
    """Σ_t s_t · ℓ_t over the tokens of `tokens.loss_mask`: this rank's share of the CISPO loss.

        ℓ = (−M · sg(clip(r)) · Â · log π · [entropy mask] + β · KL(π_θ‖π_ref)) · [rollout IS weight]

    (MiniMax-M1 eq. 4, with the unified mask M of eq. 6–7; the entropy mask, KL and rollout weight as swift 4.6.0
    composes them for its built-in cispo.) Args: `logps` [N], log π_θ of the sampled tokens, carries the gradient;
    `tokens` [N] each. Every input is selected by the loss mask before it enters a product, so NaN/inf at a
    masked-out position (padding, filtered completions) reaches neither the loss nor any gradient.
    """
    keep = tokens.loss_mask
    if tokens.log_ratio is None:
        log_ratio = token_log_ratio(logps, tokens.anchor)
    else:
        log_ratio = at_least_float32(tokens.log_ratio)
    log_ratio = torch.where(keep, log_ratio, 0.0)
    advantages = torch.where(keep, tokens.advantages, 0.0)
    weight = importance_weight(log_ratio, objective.lower, objective.upper)  # sg(clip(r))
    token_mask = None  # tokens the policy term keeps: the unified mask and the entropy mask, both selected
    if objective.mask_eps is not None:
        token_mask = unified_token_mask(log_ratio, advantages, *objective.mask_eps)
    if tokens.entropy_mask is not None:
        entropy_mask = tokens.entropy_mask.bool()
        token_mask = entropy_mask if token_mask is None else token_mask & entropy_mask
    loss = per_token_loss(logps, weight, advantages, token_mask)
    if objective.beta != 0.0:
        ref = torch.where(keep, tokens.ref_logps, logps.detach())  # KL 0 with a finite gradient where masked
        loss = loss + objective.beta * k3_kl(ref, logps)
    if tokens.rollout_weights is not None:
        loss = loss * torch.where(keep, tokens.rollout_weights, 0.0)
    return aggregate(loss, keep, torch.where(keep, tokens.scale, 0.0))


def cispo_stats(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    lower: Optional[float],
    upper: Optional[float],
    ppo_epsilon: float,
    kl: Optional[torch.Tensor] = None,
    token_log_ratio: Optional[torch.Tensor] = None,
) -> Dict[str, torch.Tensor]:
    """Per-rank sums for the diagnostics, to be added across ranks before dividing (exact global means).

    Returns float64 scalars: `tokens`; `clipped`, `clipped_pos`, `clipped_neg` (weight differs from r; split by
    the sign of Â); `ppo_zero_grad` (Â > 0 and r > 1 + ε, or Â < 0 and r < 1 − ε: tokens GRPO/PPO with the same ε
    give zero gradient and CISPO keeps); `ratio_sum`, `weight_sum`; `kl_sum` when a per-token `kl` [B, T] is given;
    and `ratio_min`, `ratio_max` (±inf when the rank has no token). Ratios are computed in float64, so up to
    exp(709) they are reported exactly. Values at masked-out positions are never read.

    `approx_kl_sum`: the k3 estimate (r − 1) − log r of KL(π_anchor || π_θ) per token, summed: the drift of the
    policy from the one that sampled (PPO implementations log its mean as approx_kl). It uses the per-token
    `token_log_ratio` [B, T] when given (a sequence-level `log_ratio` is one value per sequence), else `log_ratio`.
    """
    mask = mask.bool()
    token_lr = log_ratio if token_log_ratio is None else token_log_ratio
    token_lr = torch.where(mask, token_lr.detach().double().expand_as(mask), 0.0)
    log_ratio = torch.where(mask, log_ratio.detach().double().expand_as(mask), 0.0)
    advantages = torch.where(mask, advantages.detach().expand_as(mask), 0.0)
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
    extra = {} if kl is None else {'kl_sum': torch.where(mask, kl.detach().double(), 0.0).sum()}
    return {
        **extra,
        'tokens': mask.sum().double(),
        'clipped': clipped.sum().double(),
        'clipped_pos': (clipped & pos).sum().double(),
        'clipped_neg': (clipped & neg).sum().double(),
        'ppo_zero_grad': zero_grad.sum().double(),
        'approx_kl_sum': torch.where(mask, torch.expm1(token_lr) - token_lr, 0.0).sum(),
        'ratio_sum': torch.where(mask, ratio, 0.0).sum(),
        'weight_sum': torch.where(mask, weight, 0.0).sum(),
        'ratio_min': torch.where(mask, ratio, inf).min() if mask.numel() else inf,
        'ratio_max': torch.where(mask, ratio, -inf).max() if mask.numel() else -inf,
    }


def nonfinite_summary(tensors: Dict[str, Optional[torch.Tensor]], mask: torch.Tensor) -> Optional[str]:
    """Describe NaN/inf among the completion tokens of each [B, T] (or [B, 1]) tensor; None when all are finite.

    Padding positions are ignored: swift fills them with arbitrary values. One host sync when all are finite.
    """
    given = {name: x for name, x in tensors.items() if x is not None}
    bad = {name: ~torch.isfinite(x.detach()).expand_as(mask) & mask.bool() for name, x in given.items()}
    if not bad or not torch.stack([b.any() for b in bad.values()]).any():
        return None
    parts = []
    for name, b in bad.items():
        count = int(b.sum())
        if count:
            rows = b.any(-1).nonzero().flatten().tolist()
            parts.append(f'{name}: {count} token(s) in sequence(s) {rows}')
    return '; '.join(parts)


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
        'approx_kl': sums['approx_kl_sum'] / n,
        **({'kl': sums['kl_sum'] / n} if 'kl_sum' in sums else {}),
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
    'approx_kl',
)
