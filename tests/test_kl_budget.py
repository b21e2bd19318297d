"""cispo/approx_kl and CISPO_KL_BUDGET: the drift metric against an independent reference, the budget's decisions,
its settings checks, and end to end through `swift rlhf` that a skipped optimizer step leaves the weights alone."""

import json
import math
from pathlib import Path

import pytest
import torch

from cispo_swift import config as C
from cispo_swift import loss as L
from cispo_swift.metrics import KLBudget


def _reference_approx_kl(log_ratio, mask):
    """Mean over masked tokens of (r − 1) − log r, one token at a time in float64."""
    total, n = 0.0, 0
    for lr_row, m_row in zip(log_ratio.tolist(), mask.tolist()):
        for lr, m in zip(lr_row, m_row):
            if m:
                total += math.expm1(lr) - lr
                n += 1
    return total / n


@pytest.mark.parametrize('seed', range(5))
def test_approx_kl_matches_a_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    log_ratio = torch.randn(6, 9, generator=g) * 0.7
    mask = torch.rand(6, 9, generator=g) > 0.3
    log_ratio[~mask] = float('nan')  # padding is never read
    adv = torch.randn(6, 1, generator=g)
    stats = L.cispo_stats(log_ratio, adv, mask, None, 5.0, 0.2)
    metrics = L.finalize_stats({k: v.item() for k, v in stats.items()})
    assert metrics['approx_kl'] == pytest.approx(_reference_approx_kl(log_ratio, mask), rel=1e-12)
    assert metrics['approx_kl'] >= 0.0


def test_approx_kl_is_zero_on_policy_and_uses_the_token_ratio_at_sequence_level():
    mask = torch.ones(2, 3, dtype=torch.bool)
    zero = torch.zeros(2, 3)
    stats = L.cispo_stats(zero, torch.ones(2, 1), mask, None, 5.0, 0.2)
    assert stats['approx_kl_sum'].item() == 0.0
    token = torch.tensor([[0.5, -0.5, 0.0], [1.0, 0.0, 0.0]])
    seq = token.mean(-1, keepdim=True)  # a sequence-level ratio: one value per sequence
    stats = L.cispo_stats(seq, torch.ones(2, 1), mask, None, 5.0, 0.2, token_log_ratio=token)
    assert stats['approx_kl_sum'].item() == pytest.approx(_reference_approx_kl(token, mask) * 6, rel=1e-12)


def _sums(kl, tokens=10.0):
    return {'approx_kl_sum': kl * tokens, 'tokens': tokens}


def _steps(budget, events):
    """Drive the budget as the trainer does: 'new' = new completions, a number = a micro-batch's approx_kl followed
    by its optimizer step. Returns which steps ran and the logged metric."""
    metrics = {'train': {'cispo/kl_budget_skipped': []}}
    ran = []
    for event in events:
        if event == 'new':
            budget.new_batch()
            continue
        budget.observe(event if isinstance(event, dict) else _sums(event))
        ran.append(not budget.take_skip(metrics))
    return ran, metrics['train']['cispo/kl_budget_skipped']


def test_budget_skips_from_the_step_that_spends_it_until_new_completions():
    # on-policy, inside the budget, over it (skipped), back under but the batch is spent (skipped), new batch.
    ran, logged = _steps(KLBudget(0.05), ['new', 0.0, 0.04, 0.06, 0.01, 'new', 0.0])
    assert ran == [True, True, False, False, True]
    assert logged == [0.0, 0.0, 1.0, 1.0, 0.0]


def test_budget_treats_nan_drift_as_spent_and_ignores_empty_micro_batches():
    ran, logged = _steps(KLBudget(0.05), [{'approx_kl_sum': 0.0, 'tokens': 0.0}, float('nan')])
    assert ran == [True, False] and logged == [0.0, 1.0]


@pytest.mark.parametrize('raw', ['0', '-0.1', 'nan', 'inf', '-inf', 'abc'])
def test_bad_budget_is_refused(raw):
    with pytest.raises(ValueError, match='CISPO_KL_BUDGET'):
        C.CISPOConfig.from_env({'CISPO_KL_BUDGET': raw})


def test_budget_parses_and_unset_means_none():
    assert C.CISPOConfig.from_env({'CISPO_KL_BUDGET': ' 0.05 '}).kl_budget == 0.05
    assert C.CISPOConfig.from_env({}).kl_budget is None


class _Args:
    epsilon_high = 5.0
    epsilon = 0.2
    beta = 0.0
    delta = None
    temperature = 1.0
    top_entropy_quantile = 1.0
    rollout_importance_sampling_threshold = 2.0
    off_policy_sequence_mask_delta = None
    use_liger_kernel = False
    use_vllm = False
    importance_sampling_level = 'token'
    sequence_parallel_size = 1
    resume_from_checkpoint = None
    deepspeed = None
    num_iterations = 1
    steps_per_generation = 1
    gradient_accumulation_steps = 1


def test_budget_under_deepspeed_needs_a_zero_stage():
    args = _Args()
    args.deepspeed = 'zero2'
    C.check_run(args, C.CISPOConfig(kl_budget=0.05))  # skipped inside the ZeRO optimizer (test_deepspeed_gate.py)
    args.deepspeed = 'zero0'
    with pytest.raises(ValueError, match='CISPO_KL_BUDGET=0.05 with --deepspeed at ZeRO stage 0'):
        C.check_run(args, C.CISPOConfig(kl_budget=0.05))


@pytest.mark.parametrize(
    'iterations, per_generation, accumulation, warned',
    [(1, 1, 1, True), (1, 2, 2, True), (2, 1, 1, False), (1, 4, 1, False), (1, 4, 2, False)],
)
def test_budget_without_off_policy_steps_is_warned_about(iterations, per_generation, accumulation, warned):
    args = _Args()
    args.num_iterations, args.steps_per_generation, args.gradient_accumulation_steps = (
        iterations,
        per_generation,
        accumulation,
    )
    messages = C.ineffective_settings(args, C.CISPOConfig(kl_budget=0.05))
    assert any('CISPO_KL_BUDGET=0.05 has no effect' in m for m in messages) == warned


@pytest.mark.slow
def test_skipped_steps_leave_the_weights_alone_end_to_end(tiny, tmp_path):
    from swift_run import check_ok, logged_steps, run_swift

    plugin = str(Path(__file__).resolve().parent / 'weights_trace_plugin.py')
    out = tmp_path / 'run'
    flags = ['--tuner_type', 'full', '--num_iterations', '2', '--max_steps', '6', '--callbacks', 'cispo_test_weights']
    result = run_swift(tiny, out, *flags, extra_plugins=[plugin], env={'CISPO_KL_BUDGET': '1e-12'})
    check_ok(result)
    assert 'kl_budget=1e-12' in result.stdout + result.stderr
    rows = logged_steps(out)
    assert len(rows) == 6
    # Each generation batch: the on-policy step (approx_kl 0) is taken, the re-use after it has drifted: skipped.
    assert [r['cispo/kl_budget_skipped'] for r in rows] == [0.0, 1.0] * 3
    assert all(r['cispo/approx_kl'] == 0.0 for r in rows[0::2])
    assert all(r['cispo/approx_kl'] > 1e-12 for r in rows[1::2])
    checks = {r['step']: r['checksum'] for r in map(json.loads, (out / 'weights.jsonl').read_text().splitlines())}
    for step in range(1, 7):
        moved = checks[step] != checks[step - 1]
        assert moved == (step % 2 == 1), (step, checks)
