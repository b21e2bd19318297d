"""Property-based tests of cispo_swift.loss: extreme ratios, dtypes, degenerate masks and advantages."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cispo_swift import loss as L

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16}
# The reference runs in float64 on the same (rounded) inputs. The loss accumulates in float32 whatever the input
# dtype (the weight is float32); the gradient w.r.t. bf16 log-probs is itself bf16, i.e. rounded to 2^-9 relative.
TOL_LOSS = dict(rtol=1e-5, atol=1e-6)
TOL_GRAD = {'float32': dict(rtol=1e-5, atol=1e-6), 'bfloat16': dict(rtol=4e-3, atol=1e-6)}


@st.composite
def batches(draw):
    B = draw(st.integers(1, 4))
    T = draw(st.integers(1, 6))
    floats = st.floats(-100.0, 100.0, allow_nan=False, width=32)
    log_ratio = draw(st.lists(floats, min_size=B * T, max_size=B * T))
    logps = draw(st.lists(st.floats(-30.0, 0.0, width=32), min_size=B * T, max_size=B * T))
    adv_kind = draw(st.sampled_from(['random', 'zero']))
    adv = [0.0] * B if adv_kind == 'zero' else draw(st.lists(st.floats(-5, 5, width=32), min_size=B, max_size=B))
    mask_kind = draw(st.sampled_from(['random', 'zero', 'ones', 'first_token_only']))
    if mask_kind == 'random':
        mask = draw(st.lists(st.booleans(), min_size=B * T, max_size=B * T))
    else:
        mask = [mask_kind == 'ones' or (mask_kind == 'first_token_only' and i % T == 0) for i in range(B * T)]
    cap = draw(st.sampled_from([1.0, 2.0, 5.0, 8.0]))
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    return B, T, log_ratio, logps, adv, mask, cap, dtype


def _reference(logps64, log_ratio64, adv64, mask, cap):
    """float64 loop reference: Σ −min(exp(lr), cap)·Â·logp over masked tokens / N (0 when N = 0)."""
    n = int(mask.sum())
    total = logps64.new_zeros(())
    for i in range(logps64.shape[0]):
        for t in range(logps64.shape[1]):
            if mask[i, t]:
                lr = float(log_ratio64[i, t])
                w = cap if lr >= math.log(cap) else math.exp(lr)
                total = total - w * float(adv64[i, 0]) * logps64[i, t]
    return total / max(n, 1)


@settings(max_examples=150, deadline=None)
@given(batches())
def test_loss_and_gradient_finite_and_equal_reference(batch):
    B, T, log_ratio, logps, adv, mask, cap, dtype_name = batch
    dtype = DTYPES[dtype_name]
    logps_t = torch.tensor(logps).view(B, T).to(dtype).requires_grad_(True)
    log_ratio_t = torch.tensor(log_ratio).view(B, T).to(dtype)
    adv_t = torch.tensor(adv).view(B, 1).to(dtype)
    mask_t = torch.tensor(mask).view(B, T)
    n = float(mask_t.sum())

    w = L.importance_weight(log_ratio_t, None, cap)
    loss = L.aggregate(L.per_token_loss(logps_t, w, adv_t), mask_t, 1.0 / max(n, 1.0))
    (grad,) = torch.autograd.grad(loss, logps_t)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert torch.all((w >= 0) & (w <= cap))

    logps64 = logps_t.detach().double().requires_grad_(True)
    ref = _reference(logps64, log_ratio_t.double(), adv_t.double(), mask_t, cap)
    (ref_grad,) = torch.autograd.grad(ref, logps64) if ref.requires_grad else (torch.zeros_like(logps64),)
    torch.testing.assert_close(loss.double(), ref.detach(), **TOL_LOSS)
    torch.testing.assert_close(grad.double(), ref_grad, **TOL_GRAD[dtype_name])
    if n == 0 or not any(adv):
        assert loss.item() == 0.0


@settings(max_examples=100, deadline=None)
@given(batches())
def test_stats_are_finite_fractions(batch):
    B, T, log_ratio, _, adv, mask, cap, _ = batch
    mask_t = torch.tensor(mask).view(B, T)
    stats = L.cispo_stats(torch.tensor(log_ratio).view(B, T), torch.tensor(adv).view(B, 1), mask_t, None, cap, 0.2)
    metrics = L.finalize_stats({k: v.item() for k, v in stats.items()})
    if mask_t.any():
        for key in ('clip_frac', 'clip_frac_pos', 'clip_frac_neg', 'ppo_zero_grad_frac'):
            assert 0.0 <= metrics[key] <= 1.0
        assert metrics['clip_frac_pos'] + metrics['clip_frac_neg'] <= metrics['clip_frac'] + 1e-12
        assert 0.0 <= metrics['weight_mean'] <= cap
        assert metrics['ratio_min'] <= metrics['ratio_mean'] * (1 + 1e-9) <= metrics['ratio_max'] * (1 + 1e-9)
    else:
        assert all(math.isnan(v) for v in metrics.values())


def test_empty_batch_gives_zero_loss():
    logps = torch.zeros(0, 0, requires_grad=True)
    mask = torch.zeros(0, 0, dtype=torch.bool)
    w = L.importance_weight(torch.zeros(0, 0), None, 5.0)
    loss = L.aggregate(L.per_token_loss(logps, w, torch.zeros(0, 1)), mask, 1.0)
    assert loss.item() == 0.0 and not torch.isnan(loss)
    stats = L.cispo_stats(torch.zeros(0, 0), torch.zeros(0, 1), mask, None, 5.0, 0.2)
    assert stats['tokens'].item() == 0
