"""loss.cispo_objective, the loss the trainer optimises, against a loop reference written here over every option
combination (clip convention and bounds, unified mask, entropy mask, KL, rollout weights, sequence-level ratio, the
three normalisations), values and gradients; and its behaviour at the numerical edges."""

import itertools
import math

import pytest
import torch

from cispo_swift import loss as L
from cispo_swift.fused import autograd_coef_fn, fused_linear_logp_loss

B, T = 6, 5
GROUPS = [0, 0, 1, 1, 1, 2]  # prompt group of each sequence


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logps = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    anchor = logps.detach() + 1.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T).clone()
    lengths = torch.tensor([5, 1, 3, 4, 2, 5])
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    mask[3, 1] = False  # a hole, as the overlong filter or an off-policy mask leaves
    ref = logps.detach() + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    entropy_mask = torch.rand(B, T, generator=g) < 0.7
    rollout = 0.5 + torch.rand(B, T, generator=g, dtype=torch.float64)
    return logps, anchor, adv, mask, ref, entropy_mask, rollout


def _reference(logps, anchor, adv, mask, ref, entropy_mask, rollout, opts):
    """Python loops over tokens; the weight and the normalisation computed from their definitions."""
    lower, upper = (None, opts['cap']) if opts['mode'] == 'absolute' else (opts['low'], 1.0 + opts['eps_high'])
    seq_lr = [
        sum(float(logps[i, t].detach() - anchor[i, t]) for t in range(T) if mask[i, t]) / max(1, int(mask[i].sum()))
        for i in range(B)
    ]
    n_tok = int(mask.sum())
    group_tok = {g: sum(int(mask[i].sum()) for i in range(B) if GROUPS[i] == g) for g in set(GROUPS)}
    total = logps.new_zeros(())
    for i, t in itertools.product(range(B), range(T)):
        if not mask[i, t]:
            continue
        log_r = seq_lr[i] if opts['sequence'] else float(logps[i, t].detach() - anchor[i, t])
        r = math.exp(log_r)
        w = min(r, upper) if lower is None else min(max(r, lower), upper)
        a = float(adv[i, t])
        dropped = opts['mask'] and ((a > 0 and r > 1 + 0.28) or (a < 0 and r < 1 - 0.2))
        term = 0.0 if dropped else -w * a * logps[i, t]
        if opts['entropy'] and not entropy_mask[i, t]:
            term = 0.0 * logps[i, t]
        if opts['beta']:
            d = float(ref[i, t]) - logps[i, t]
            term = term + opts['beta'] * (torch.exp(d) - d - 1)
        if opts['rollout']:
            term = term * float(rollout[i, t])
        if opts['norm'] == 'token':
            scale = 1.0 / n_tok
        elif opts['norm'] == 'sequence':
            scale = 1.0 / (int(mask[i].sum()) * B)
        else:
            scale = 1.0 / (group_tok[GROUPS[i]] * len(group_tok))
        total = total + term * scale
    return total


def _ours(logps, anchor, adv, mask, ref, entropy_mask, rollout, opts):
    lower, upper = L.clip_bounds(
        opts['cap'] if opts['mode'] == 'absolute' else opts['eps_high'], opts.get('eps_low'), opts['mode']
    )
    group_tokens = torch.tensor(
        [float(sum(mask[j].sum() for j in range(B) if GROUPS[j] == GROUPS[i])) for i in range(B)]
    )
    scale = L.token_scale(
        mask,
        opts['norm'],
        num_tokens=float(mask.sum()),
        num_sequences=B,
        group_tokens=group_tokens,
        num_groups=len(set(GROUPS)),
        dtype=torch.float64,
    )
    log_ratio = None
    if opts['sequence']:
        log_ratio = L.sequence_log_ratio(torch.where(mask, logps.detach() - anchor, 0.0), mask)
    tokens = L.TokenInputs.flatten(
        mask,
        advantages=adv,
        loss_mask=mask,
        scale=scale,
        anchor=None if opts['sequence'] else anchor,
        log_ratio=log_ratio,
        ref_logps=ref if opts['beta'] else None,
        entropy_mask=entropy_mask if opts['entropy'] else None,
        rollout_weights=rollout if opts['rollout'] else None,
    )
    objective = L.Objective(lower, upper, (0.2, 0.28) if opts['mask'] else None, opts['beta'])
    return L.cispo_objective(logps.reshape(-1), tokens, objective)


CLIPS = [
    {'mode': 'absolute', 'cap': 5.0},
    {'mode': 'absolute', 'cap': 1.5},
    {'mode': 'relative', 'eps_high': 0.28, 'eps_low': 0.2, 'low': 0.8},
]
COMBOS = [
    dict(clip, norm=norm, mask=mask, beta=beta, rollout=rollout, entropy=entropy, sequence=sequence)
    for clip, norm, (mask, beta, rollout, entropy, sequence) in itertools.product(
        CLIPS,
        L.NORM_MODES,
        [
            (False, 0.0, False, False, False),
            (True, 0.0, False, False, False),
            (False, 0.04, False, False, False),
            (False, 0.0, True, False, False),
            (False, 0.0, False, True, False),
            (False, 0.0, False, False, True),
            (True, 0.04, True, True, False),
            (True, 0.04, True, False, True),
        ],
    )
]


def _name(o):
    parts = [o['mode'], str(o.get('cap', o.get('eps_high'))), o['norm']]
    parts += [k for k in ('mask', 'rollout', 'entropy', 'sequence') if o[k]] + (['kl'] if o['beta'] else [])
    return '-'.join(parts)


@pytest.mark.parametrize('opts', COMBOS, ids=_name)
def test_objective_equals_loop_reference(opts):
    batch = _batch(seed=len(_name(opts)))
    ours = _ours(*batch, opts)
    (g_ours,) = torch.autograd.grad(ours, batch[0])
    ref = _reference(*batch, opts)
    (g_ref,) = torch.autograd.grad(ref, batch[0])
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-12)
    assert g_ours.abs().sum() > 0


def test_the_batch_clips_and_masks_tokens():
    """The reference comparison above is only meaningful if weights are capped and the mask drops tokens."""
    logps, anchor, adv, mask, *_ = _batch()
    r = torch.exp(logps.detach() - anchor)[mask]
    assert (r > 5).any() and (r < 0.8).any()
    dropped = ~L.unified_token_mask(logps.detach() - anchor, adv, 0.2, 0.28) & mask
    assert dropped.any() and (mask & ~dropped).any()


# ---- numerical edges -------------------------------------------------------------------------------------------


def _flat_tokens(mask, adv, anchor, **extra):
    scale = torch.full(mask.shape, 1.0 / max(int(mask.sum()), 1), dtype=torch.float64)
    return L.TokenInputs.flatten(mask, advantages=adv, loss_mask=mask, scale=scale, anchor=anchor, **extra)


@pytest.mark.parametrize('bad', [float('nan'), float('inf'), -float('inf')])
@pytest.mark.parametrize('where', ['advantages', 'anchor', 'ref', 'rollout', 'scale'])
def test_non_finite_values_at_masked_positions_reach_no_gradient(bad, where):
    logps, anchor, adv, mask, ref, _, rollout = _batch(1)
    pad = ~mask
    clean_tokens = _flat_tokens(mask, adv, anchor, ref_logps=ref, rollout_weights=rollout)
    target = {'advantages': adv, 'anchor': anchor, 'ref': ref, 'rollout': rollout}.get(where)
    if where == 'scale':
        scale = clean_tokens.scale.clone().view(B, T)
        scale[pad] = bad
        dirty_tokens = L.TokenInputs(**{**clean_tokens.__dict__, 'scale': scale.reshape(-1)})
    else:
        dirty = target.clone()
        dirty[pad] = bad
        kwargs = {'advantages': adv, 'anchor': anchor, 'ref': ref, 'rollout': rollout, where: dirty}
        dirty_tokens = _flat_tokens(
            mask, kwargs['advantages'], kwargs['anchor'], ref_logps=kwargs['ref'], rollout_weights=kwargs['rollout']
        )
    objective = L.Objective(None, 5.0, (0.2, 0.28), 0.04)
    clean = L.cispo_objective(logps.reshape(-1), clean_tokens, objective)
    (g_clean,) = torch.autograd.grad(clean, logps)
    loss = L.cispo_objective(logps.reshape(-1), dirty_tokens, objective)
    (grad,) = torch.autograd.grad(loss, logps)
    assert torch.isfinite(grad).all() and torch.equal(grad, g_clean) and torch.equal(loss, clean)


def test_non_finite_padding_reaches_no_gradient_through_the_fused_head():
    """The audit's case: NaN advantages at padding made every LM-head gradient NaN in the fused path."""
    g = torch.Generator().manual_seed(0)
    N, H, V = 12, 8, 17
    hidden = torch.randn(N, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    target = torch.randint(0, V, (N,), generator=g)
    mask = torch.arange(N) < 9
    adv = torch.randn(N, generator=g)
    adv[~mask] = float('nan')
    anchor = torch.randn(N, generator=g) - 3
    anchor[~mask] = float('-inf')
    tokens = L.TokenInputs(advantages=adv, loss_mask=mask, scale=torch.full((N,), 1 / 9), anchor=anchor)
    objective = L.Objective(None, 5.0)
    coef_fn = autograd_coef_fn(lambda lp, s, e: L.cispo_objective(lp, tokens[s:e], objective))
    loss = fused_linear_logp_loss(hidden, weight, None, target, coef_fn, chunk_size=5)[0]
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()
    assert weight.grad.abs().sum() > 0


@pytest.mark.parametrize('norm', L.NORM_MODES)
def test_zero_completion_tokens_give_zero_loss_and_zero_gradients(norm):
    """A generation batch whose completions are all empty: num_items 0, every mask False."""
    logps = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    scale = L.token_scale(
        mask, norm, num_tokens=0, num_sequences=3, group_tokens=torch.zeros(3), num_groups=1, dtype=torch.float64
    )
    tokens = L.TokenInputs.flatten(
        mask, advantages=torch.ones(3, 1), loss_mask=mask, scale=scale, anchor=logps.detach(), ref_logps=logps.detach()
    )
    loss = L.cispo_objective(logps.reshape(-1), tokens, L.Objective(None, 5.0, (0.2, 0.2), 0.04))
    (grad,) = torch.autograd.grad(loss, logps)
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize(
    'lower, upper, message',
    [
        (None, 0.0, 'upper=0.0: the cap of the CISPO weight must be a positive number'),
        (None, -1.0, 'upper=-1.0'),
        (None, float('nan'), 'upper=nan'),
        (-0.1, 5.0, 'lower=-0.1: the lower bound of the CISPO weight must lie in [0, upper=5.0]'),
        (float('nan'), 5.0, 'lower=nan'),
        (2.0, 1.5, 'lower=2.0'),
    ],
)
def test_importance_weight_refuses_impossible_bounds(lower, upper, message):
    with pytest.raises(ValueError) as err:
        L.importance_weight(torch.zeros(3), lower, upper)
    assert message in str(err.value)


def test_infinite_cap_is_no_cap():
    log_ratio = torch.tensor([-3.0, 0.0, 50.0])
    torch.testing.assert_close(L.importance_weight(log_ratio, None, math.inf), torch.exp(log_ratio))


def test_bf16_log_ratio_and_kl_are_formed_in_float32_against_a_float64_reference():
    """bf16 log-probs near −10 keep 2-3 significant digits, so a log-ratio or a KL formed in bf16 loses the small
    differences between them. Inputs are bf16 values (exact in float64); the loss and each token's gradient are
    compared with the same formula in float64, where the KL and policy terms nearly cancel for some tokens."""
    g = torch.Generator().manual_seed(3)
    n, beta = 64, 0.5
    logps64 = (-10.0 + torch.randn(n, generator=g, dtype=torch.float64)).to(torch.bfloat16).double()
    anchor64 = (logps64 + 0.02 * torch.randn(n, generator=g, dtype=torch.float64)).to(torch.bfloat16).double()
    ref64 = (logps64 + 0.05 * torch.randn(n, generator=g, dtype=torch.float64)).to(torch.bfloat16).double()
    # Advantages that make the policy term cancel the KL term's gradient up to a few percent on every other token.
    kl_grad = beta * (1.0 - torch.exp(ref64 - logps64))
    weight = torch.exp(logps64 - anchor64).clamp(max=5.0)
    adv64 = torch.where(torch.arange(n) % 2 == 0, kl_grad / weight * 1.03, torch.randn(n, generator=g).double())
    mask = torch.ones(n, dtype=torch.bool)
    tokens = L.TokenInputs(
        loss_mask=mask, advantages=adv64.float(), scale=torch.full((n,), 1.0 / n), anchor=anchor64.bfloat16(),
        ref_logps=ref64.bfloat16(),
    )  # fmt: skip
    logps = logps64.bfloat16().requires_grad_()
    loss = L.cispo_objective(logps, tokens, L.Objective(None, 5.0, None, beta))
    loss.backward()
    # float64 reference: ℓ = −w·Â·log π + β·(exp(ref − log π) − (ref − log π) − 1), mean over tokens.
    x = logps64.clone().requires_grad_()
    adv = adv64.float().double()
    ref_loss = (-weight * adv * x + beta * (torch.exp(ref64 - x) - (ref64 - x) - 1)).mean()
    ref_loss.backward()
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-4)
    ours, want = logps.grad.double(), x.grad
    scale = want.abs().max()
    # bf16 stores the gradient itself with 8 bits of mantissa: 0.4% of each element, nothing more.
    assert torch.allclose(ours, want, rtol=8e-3, atol=1e-4 * float(scale)), (ours - want).abs().max()


# ---- selection before products, precision near 0 -----------------------------------------------------------------


@pytest.mark.parametrize('dropped_by', ['unified mask', 'entropy mask'])
def test_a_dropped_token_whose_ratio_overflows_gives_no_nan_gradient_on_either_path(dropped_by):
    """No cap (--epsilon_high inf): a token with log r = 100 has r = inf in float32. When the unified mask (Â > 0,
    r > 1 + ε) or the entropy mask drops it, its gradient is 0 and the loss and every other gradient are finite;
    0 · inf in backward would make them NaN. Reference: the kept tokens' −r·Â·s, written out."""
    logps = torch.tensor([-1.0, -2.0, -0.5])
    log_ratio = torch.tensor([100.0, 0.1, -0.1])  # r = inf, 1.105, 0.905: the mask keeps the last two
    advantages = torch.tensor([1.0, 1.0, -1.0])
    tokens = L.TokenInputs(
        advantages=advantages,
        loss_mask=torch.ones(3, dtype=torch.bool),
        scale=torch.full((3,), 0.25),
        anchor=logps - log_ratio,
        entropy_mask=torch.tensor([False, True, True]) if dropped_by == 'entropy mask' else None,
    )
    objective = L.Objective(lower=None, upper=math.inf, mask_eps=(0.2, 0.2) if dropped_by == 'unified mask' else None)
    expected_grad = torch.tensor([0.0, -math.exp(0.1) * 0.25, math.exp(-0.1) * 0.25])
    expected_loss = float((expected_grad * logps).sum())

    leaf = logps.clone().requires_grad_(True)
    loss = L.cispo_objective(leaf, tokens, objective)
    (grad,) = torch.autograd.grad(loss, leaf)
    fused_loss, fused_grad = autograd_coef_fn(lambda lp, a, b: L.cispo_objective(lp, tokens[a:b], objective))(
        logps, 0, 3
    )
    for value, gradient in ((loss, grad), (fused_loss, fused_grad)):
        assert float(value) == pytest.approx(expected_loss, rel=1e-6)
        torch.testing.assert_close(gradient, expected_grad, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize('x', [1e-4, -1e-4, 3e-3, -2e-6])
def test_k3_kl_keeps_its_precision_near_zero(x):
    """KL ≈ x²/2 near x = ref − log π = 0: exp(x) − x − 1 loses it to float32 rounding of exp(x); expm1 keeps it.
    Reference: math.expm1 in float64."""
    ref = torch.tensor([-1.0 + x], dtype=torch.float32)
    logps = torch.tensor([-1.0], dtype=torch.float32)
    exact_x = float(ref.double() - logps.double())
    expected = math.expm1(exact_x) - exact_x
    # float32 rounds expm1(x) ≈ x to one unit in its last place, |x| · 2^-23; exp(x) − 1 is off by up to 2^-24 itself.
    assert abs(float(L.k3_kl(ref, logps)) - expected) <= abs(exact_x) * 2**-23
