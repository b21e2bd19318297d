"""Our `--loss_type cispo` against the installed swift's built-in one (4.5.3 or 4.6) on the same batch: loss,
gradients and metrics."""

import pytest
import torch
from stubs import attach_logps, make_batch, make_trainer, our_loss, swift_loss

from cispo_swift import compat
from cispo_swift.config import CISPOConfig


def _both(seed=0, cispo=None, batch_edit=None, rollout=False, **args):
    results = []
    for fn in (swift_loss, our_loss):
        logits, ids, batch, entropies = make_batch(seed, rollout=rollout)
        if batch_edit:
            batch_edit(batch)
        trainer = attach_logps(make_trainer(cispo, **args), logits, ids, entropies)
        loss, metrics = fn(trainer, batch)
        loss.backward()
        results.append((loss.detach(), logits.grad.clone(), metrics, trainer))
    return results


def _assert_same(swift_result, ours):
    torch.testing.assert_close(ours[0], swift_result[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours[1], swift_result[1], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_default_settings_match_swift(seed):
    swift_result, ours = _both(seed)
    assert ours[1].abs().sum() > 0
    _assert_same(swift_result, ours)


def test_batch_has_clipped_tokens_and_gradient_accumulation_scaling():
    swift_result, ours = _both(1, gradient_accumulation_steps=4)
    if compat.swift_undoes_ga_scaling():
        _assert_same(swift_result, ours)
    else:
        # ms-swift 4.5 leaves the Trainer's division by GA on a loss already normalised by the whole window's
        # tokens: its gradient is GA times too small. Ours multiplies back, as ms-swift 4.6 does.
        _assert_same((4 * swift_result[0], 4 * swift_result[1]), ours)
    # Whatever the swift version: the loss handed to the Trainer (which divides it by GA) is GA · Σ/N.
    _, ours_ga1 = _both(1, gradient_accumulation_steps=1)
    _assert_same((4 * ours_ga1[0], 4 * ours_ga1[1]), ours)
    # The batch exercises the cap: some tokens have r > 5.
    _, _, batch, _ = make_batch(1)
    logits, ids, _, _ = make_batch(1)
    logps = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    r = torch.exp(logps - batch.old_per_token_logps)[batch.completion_mask]
    assert (r > 5).any() and (r < 5).any()


@pytest.mark.parametrize(
    'args',
    [
        {'beta': 0.04},
        {'top_entropy_quantile': 0.5},
        {'log_entropy': True},
        {'overlong_filter': True},
        {'importance_sampling_level': 'sequence'},
        {'importance_sampling_level': 'sequence_token'},
        {'off_policy_sequence_mask_delta': 0.1},
        {'epsilon_high': 2.0, 'epsilon': 0.3},
    ],
    ids=lambda a: ','.join(f'{k}={v}' for k, v in a.items()),
)
def test_swift_features_match_swift(args):
    def truncate(batch):
        batch.truncated_mask[1] = True

    edit = truncate if args.get('overlong_filter') else None
    swift_result, ours = _both(3, batch_edit=edit, **args)
    _assert_same(swift_result, ours)


@pytest.mark.parametrize('mode', ['token_truncate', 'token_mask', 'sequence_truncate', 'sequence_mask'])
def test_rollout_importance_sampling_matches_swift(mode):
    swift_result, ours = _both(
        4, rollout=True, rollout_importance_sampling_mode=mode, rollout_importance_sampling_threshold=1.05
    )
    _assert_same(swift_result, ours)
    assert set(swift_result[2]['rollout_correction']) == set(ours[2]['rollout_correction'])
    for key, value in swift_result[2]['rollout_correction'].items():
        torch.testing.assert_close(ours[2]['rollout_correction'][key], value)


def test_swift_clip_metric_key_kept_with_same_value():
    swift_result, ours = _both(1)
    trainer = ours[3]
    trainer._update_metrics(ours[2])
    expected = swift_result[2]['clipping']['cispo_clip_ratio']
    assert expected > 0
    assert trainer._metrics['train']['cispo_clip_ratio'] == [pytest.approx(expected, rel=1e-6)]


def test_metrics_count_clipping_on_both_advantage_signs():
    _, ours = _both(1)
    trainer = ours[3]
    trainer._update_metrics(ours[2])
    m = trainer._metrics['train']
    logits, ids, batch, _ = make_batch(1)
    with torch.no_grad():
        logps = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    mask = batch.completion_mask
    r = torch.exp((logps - batch.old_per_token_logps).double())
    adv = batch.advantages
    n = mask.sum().item()
    clipped = (r > 5.0) & mask
    assert m['cispo/clip_frac'] == [pytest.approx(clipped.sum().item() / n)]
    assert m['cispo/clip_frac_pos'] == [pytest.approx((clipped & (adv > 0)).sum().item() / n)]
    assert m['cispo/clip_frac_neg'] == [pytest.approx((clipped & (adv < 0)).sum().item() / n)]
    assert (clipped & (adv < 0)).any(), 'the batch should clip negative-advantage tokens too'
    zero = (((adv > 0) & (r > 1.2)) | ((adv < 0) & (r < 0.8))) & mask
    assert m['cispo/ppo_zero_grad_frac'] == [pytest.approx(zero.sum().item() / n)]
    assert m['cispo/ratio_mean'] == [pytest.approx(r[mask].mean().item())]
    assert m['cispo/weight_mean'] == [pytest.approx(r.clamp(max=5.0)[mask].mean().item())]
    assert trainer.cispo_recorder.extrema['train'] == {
        'ratio_min': pytest.approx(r[mask].min().item()),
        'ratio_max': pytest.approx(r[mask].max().item()),
    }


def test_relative_convention_differs_from_absolute():
    """`relative` with ε_high 4 and no lower bound equals the absolute cap 5; with a lower bound it differs."""
    _, absolute = _both(1)
    _, relative = _both(1, cispo=CISPOConfig(clip_mode='relative'), epsilon_high=4.0)
    torch.testing.assert_close(relative[0], absolute[0], rtol=1e-6, atol=1e-7)
    _, lower = _both(1, cispo=CISPOConfig(clip_mode='relative', eps_low=0.2), epsilon_high=4.0)
    assert not torch.allclose(lower[0], absolute[0])


def test_sdar_auxiliary_loss_matches_swift():
    """SDAR's teacher-distillation term is added after the GA compensation, as swift adds it."""

    def with_teacher(batch):
        g = torch.Generator().manual_seed(9)
        batch.teacher_per_token_logps = batch.old_per_token_logps + 0.5 * torch.randn(
            batch.advantages.shape, generator=g
        )

    # GA 2 checks the order (SDAR after the GA compensation) where swift compensates (4.6); 4.5 does not (see above).
    ga = 2 if compat.swift_undoes_ga_scaling() else 1
    swift_result, ours = _both(2, batch_edit=with_teacher, sdar_loss_coef=0.5, gradient_accumulation_steps=ga)
    _assert_same(swift_result, ours)
    assert ours[3]._metrics['train']['sdar/coef'] == [0.5]
    plain = _both(2, gradient_accumulation_steps=ga)[1]
    assert not torch.allclose(plain[0], ours[0])  # the term is there


def test_chord_loss_is_applied_where_swift_applies_it(monkeypatch):
    """CHORD's SFT mix (swift's compute_chord_loss) receives the same GRPO loss from both and its result is returned;
    a stand-in for it records the input (the real one needs an SFT data iterator)."""
    import swift.rlhf_trainers.grpo_trainer as swift_module

    import cispo_swift.mirror as mirror_module

    seen = []

    def chord(trainer, grpo_loss):
        seen.append(grpo_loss.detach().clone())
        return 0.5 * grpo_loss + 1.0

    monkeypatch.setattr(swift_module, 'compute_chord_loss', chord)
    monkeypatch.setattr(mirror_module, 'compute_chord_loss', chord)
    results = []
    for fn in (swift_loss, our_loss):
        logits, ids, batch, entropies = make_batch(3)
        trainer = attach_logps(make_trainer(), logits, ids, entropies)
        trainer.chord_sft_iterator = iter(())
        loss, _ = fn(trainer, batch)
        loss.backward()
        results.append((loss.detach(), logits.grad.clone()))
    torch.testing.assert_close(seen[1], seen[0], rtol=1e-6, atol=1e-7)
    _assert_same(*results)
