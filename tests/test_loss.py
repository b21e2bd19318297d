"""cispo_swift.loss against references written here, values and gradients."""

import math

import pytest
import torch

from cispo_swift import loss as L


def reference_cispo(logps, old_logps, adv, mask, cap, lower=None):
    """Independent reference: loops over tokens, w = min(max(r, lower), cap) as a Python float (detached)."""
    B, T = logps.shape
    total = logps.new_zeros(())
    n = int(mask.sum())
    for i in range(B):
        for t in range(T):
            if not mask[i, t]:
                continue
            r = math.exp(float(logps[i, t].detach() - old_logps[i, t]))
            w = min(r, cap) if lower is None else min(max(r, lower), cap)
            total = total - w * float(adv[i, t]) * logps[i, t]
    return total / max(n, 1)


def _batch(seed=0, B=4, T=5, spread=2.0):
    g = torch.Generator().manual_seed(seed)
    logps = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    old = logps.detach() + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T)
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[0, 0] = True
    return logps, old, adv, mask


def _ours(logps, old, adv, mask, mode='absolute', eps_high=5.0, eps_low=None):
    lower, upper = L.clip_bounds(eps_high, eps_low, mode)
    w = L.importance_weight(logps - old, lower, upper)
    return L.aggregate(L.per_token_loss(logps, w, adv), mask, 1.0 / float(mask.sum()))


@pytest.mark.parametrize('seed', range(4))
def test_absolute_cap_matches_reference(seed):
    logps, old, adv, mask = _batch(seed)
    ours = _ours(logps, old, adv, mask)
    (g_ours,) = torch.autograd.grad(ours, logps)
    ref = reference_cispo(logps, old, adv, mask, cap=5.0)
    (g_ref,) = torch.autograd.grad(ref, logps)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-12)


def test_relative_bounds_match_reference():
    logps, old, adv, mask = _batch(7)
    ours = _ours(logps, old, adv, mask, mode='relative', eps_high=0.28, eps_low=0.2)
    ref = reference_cispo(logps, old, adv, mask, cap=1.28, lower=0.8)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_clipped_token_keeps_gradient_minus_cap_times_advantage_over_n():
    """The defining property: ∂L/∂log π_t = −clip(r_t)·Â_t/N, for tokens above the cap and below it."""
    logps = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-1.0 - math.log(10.0), -2.0 - math.log(0.5), -0.5]], dtype=torch.float64)  # r = 10, 0.5, 1
    adv = torch.tensor([[2.0, -1.5, 0.7]], dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    n = 3.0
    (grad,) = torch.autograd.grad(_ours(logps, old, adv, mask), logps)
    torch.testing.assert_close(grad[0, 0], torch.tensor(-5.0 * 2.0 / n, dtype=torch.float64))  # clipped: cap 5
    torch.testing.assert_close(grad[0, 1], torch.tensor(-0.5 * -1.5 / n, dtype=torch.float64))  # r below the cap
    torch.testing.assert_close(grad[0, 2], torch.tensor(-1.0 * 0.7 / n, dtype=torch.float64))


def test_weight_is_detached_and_finite_for_extreme_ratios():
    log_ratio = torch.tensor([-100.0, -1.0, 0.0, 1.0, 100.0], requires_grad=True)
    w = L.importance_weight(log_ratio, None, 5.0)
    assert not w.requires_grad
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w, torch.tensor([math.exp(-100.0), math.exp(-1.0), 1.0, math.exp(1.0), 5.0]))
    # Below the cap the value is exp(log r) bit for bit; at and above it exactly the cap.
    assert w[3].item() == torch.exp(torch.tensor(1.0)).item()
    assert L.importance_weight(torch.tensor([math.log(5.0) + 1e-3]), None, 5.0).item() == 5.0


def test_bf16_log_ratio_weight_is_computed_in_float32():
    w = L.importance_weight(torch.tensor([0.5, 3.0], dtype=torch.bfloat16), None, 5.0)
    assert w.dtype == torch.float32


def test_unified_mask_with_tight_eps_gives_ppo_gradient_set():
    """MiniMax-M1 eq. 6–7: with the mask's ε equal to PPO's, the tokens with non-zero gradient are PPO's."""
    logps, old, adv, mask = _batch(11, B=8, T=16, spread=0.5)
    eps = 0.2
    # PPO/GRPO clipped surrogate, token-mean.
    ratio = torch.exp(logps - old)
    ppo = -torch.min(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)
    (g_ppo,) = torch.autograd.grad((ppo * mask).sum() / mask.sum(), logps)
    log_ratio = logps - old
    m = L.unified_token_mask(log_ratio, adv, eps, eps)
    w = L.importance_weight(log_ratio, None, 5.0)
    cispo = L.aggregate(L.per_token_loss(logps, w, adv, m), mask, 1.0 / float(mask.sum()))
    (g_cispo,) = torch.autograd.grad(cispo, logps)
    ppo_set = (g_ppo != 0) & mask
    assert ppo_set.sum() < mask.sum(), 'the batch must have tokens PPO drops'
    assert torch.equal((g_cispo != 0) & mask, ppo_set)
    # Without the mask CISPO keeps every token.
    (g_plain,) = torch.autograd.grad(L.aggregate(L.per_token_loss(logps, w, adv), mask, 1.0 / float(mask.sum())), logps)
    assert torch.equal((g_plain != 0) & mask, mask & (adv != 0))


def test_unified_mask_with_wide_eps_is_plain_cispo():
    logps, old, adv, _ = _batch(3)
    assert L.unified_token_mask(logps - old, adv, 1.0, 1e9).all()


def _reference_normalised(loss_mat, mask, mode, groups):
    """Loop reference for the three normalisations over one whole batch."""
    B = loss_mat.shape[0]
    if mode == 'token':
        return (loss_mat * mask).sum() / mask.sum()
    if mode == 'sequence':
        return sum((loss_mat[i] * mask[i]).sum() / mask[i].sum().clamp(min=1) for i in range(B)) / B
    total = 0.0
    for g in sorted(set(groups)):
        idx = [i for i in range(B) if groups[i] == g]
        total = total + sum((loss_mat[i] * mask[i]).sum() for i in idx) / sum(mask[i].sum() for i in idx)
    return total / len(set(groups))


@pytest.mark.parametrize('mode', L.NORM_MODES)
def test_two_pretend_ranks_average_to_the_global_objective(mode):
    """Split one batch over two ranks with uneven token counts: the mean of the rank losses (what DDP's gradient
    average sees) equals the global normalised loss, values and gradients."""
    g = torch.Generator().manual_seed(5)
    B, T = 8, 6
    loss_leaf = torch.randn(B, T, generator=g, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([6, 1, 3, 5, 2, 6, 4, 1])
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    groups = [0, 0, 1, 1, 2, 2, 3, 3]
    global_ref = _reference_normalised(loss_leaf, mask, mode, groups)
    group_tokens = torch.tensor([float(sum(lengths[j] for j in range(B) if groups[j] == groups[i])) for i in range(B)])
    ranks = [slice(0, 3), slice(3, 8)]  # uneven: 3 and 5 sequences, groups split across ranks
    rank_losses = []
    for sl in ranks:
        scale = L.token_scale(
            mask[sl],
            mode,
            num_tokens=float(mask.sum()),
            num_sequences=float(B),
            group_tokens=group_tokens[sl],
            num_groups=4.0,
            dtype=torch.float64,
        )
        rank_losses.append(L.aggregate(loss_leaf[sl], mask[sl], scale * 2))  # P = 2 ranks: s carries P
    averaged = sum(rank_losses) / 2
    torch.testing.assert_close(averaged, global_ref, rtol=1e-12, atol=1e-12)
    (g_avg,) = torch.autograd.grad(averaged, loss_leaf)
    (g_ref,) = torch.autograd.grad(global_ref, loss_leaf)
    torch.testing.assert_close(g_avg, g_ref, rtol=1e-12, atol=1e-12)


def test_empty_mask_gives_zero_loss_not_nan():
    logps = torch.zeros(2, 3, requires_grad=True)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    w = L.importance_weight(torch.zeros(2, 3), None, 5.0)
    for mode in L.NORM_MODES:
        scale = L.token_scale(mask, mode, num_tokens=0, num_sequences=0, group_tokens=torch.zeros(2), num_groups=0)
        out = L.aggregate(L.per_token_loss(logps, w, torch.ones(2, 3)), mask, scale)
        assert out.item() == 0.0
        (grad,) = torch.autograd.grad(out, logps)
        assert torch.equal(grad, torch.zeros(2, 3))


def test_stats_match_counts():
    log_ratio = torch.log(torch.tensor([[10.0, 0.5, 1.3, 0.7], [6.0, 1.0, 0.1, 2.0]]))
    adv = torch.tensor([[1.0], [-1.0]]).expand(2, 4)
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    s = L.cispo_stats(log_ratio, adv, mask, None, 5.0, 0.2)
    assert s['tokens'].item() == 7
    assert s['clipped'].item() == 2  # 10 and 6 (the masked 0.7 never counts)
    assert s['clipped_pos'].item() == 1 and s['clipped_neg'].item() == 1
    # PPO zero-gradient: Â>0 & r>1.2 → 10, 1.3; Â<0 & r<0.8 → 0.1.
    assert s['ppo_zero_grad'].item() == 3
    assert s['ratio_min'].item() == pytest.approx(0.1) and s['ratio_max'].item() == pytest.approx(10.0)
    assert s['weight_sum'].item() == pytest.approx(5 + 0.5 + 1.3 + 5 + 1 + 0.1 + 2)
    m = L.finalize_stats({k: v.item() for k, v in s.items()})
    assert m['clip_frac'] == pytest.approx(2 / 7) and m['ppo_zero_grad_frac'] == pytest.approx(3 / 7)


def test_k3_kl_matches_formula():
    ref = torch.tensor([-1.0, -2.0, -30.0])
    cur = torch.tensor([-1.5, -1.0, -1.0])
    d = ref - cur
    expected = (torch.exp(d.clamp(-20, 20)) - d.clamp(-20, 20) - 1).clamp(-10, 10)
    torch.testing.assert_close(L.k3_kl(ref, cur), expected)
