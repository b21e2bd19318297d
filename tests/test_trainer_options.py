"""CISPO options inside the trainer, against references written here (values and gradients)."""

import math
from types import SimpleNamespace

import pytest
import torch
from stubs import attach_logps, make_batch, make_trainer, our_loss, tiny_qwen2

from cispo_swift import guards
from cispo_swift.config import CISPOConfig
from cispo_swift.fused_head import fp32_lm_head
from cispo_swift.norm import attach_group_counts


def _logps(logits, ids):
    return torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def _reference(logps, anchor, adv, mask, n, cap=5.0, token_mask=None):
    """Loop reference for the token-normalised CISPO loss."""
    total = logps.new_zeros(())
    B, T = logps.shape
    for i in range(B):
        for t in range(T):
            if mask[i, t] and (token_mask is None or token_mask[i, t]):
                w = min(math.exp(float(logps[i, t].detach() - anchor[i, t])), cap)
                total = total - w * float(adv[i, t]) * logps[i, t]
    return total / n


def _run(cispo, seed=1, **args):
    logits, ids, batch, entropies = make_batch(seed, rollout=True)
    trainer = attach_logps(make_trainer(cispo, **args), logits, ids, entropies)
    loss, metrics = our_loss(trainer, batch)
    (grad,) = torch.autograd.grad(loss, logits)
    return loss, grad, logits, ids, batch, trainer


def test_rollout_anchor_uses_inference_logprobs():
    loss, grad, logits, ids, batch, _ = _run(CISPOConfig(anchor='rollout'), use_vllm=True)
    logps = _logps(logits, ids)
    ref = _reference(
        logps, batch.rollout_per_token_logps, batch.advantages, batch.completion_mask, batch.num_items_in_batch
    )
    (ref_grad,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-8)
    old_loss, *_ = _run(CISPOConfig(anchor='old'), use_vllm=True)
    assert not torch.allclose(loss, old_loss)


def test_rollout_anchor_on_policy_step_is_not_inert():
    """Fully on-policy (π_old = π_θ): the `old` anchor gives r ≡ 1, the rollout anchor still reweights."""

    def on_policy(anchor):
        logits, ids, batch, entropies = make_batch(2, rollout=True)
        with torch.no_grad():
            current = _logps(logits, ids)
        batch.old_per_token_logps = current.clone()
        batch.rollout_per_token_logps = current + 0.5 * torch.randn(
            current.shape, generator=torch.Generator().manual_seed(0)
        )
        trainer = attach_logps(make_trainer(CISPOConfig(anchor=anchor), use_vllm=True), logits, ids, entropies)
        _, metrics = our_loss(trainer, batch)
        return metrics['cispo_sums']

    old, rollout = on_policy('old'), on_policy('rollout')
    assert old['ratio_min'] == pytest.approx(1.0) and old['ratio_max'] == pytest.approx(1.0)
    assert rollout['ratio_max'] > 1.1 and rollout['ratio_min'] < 0.9


def test_rollout_anchor_without_rollout_logprobs_is_a_clear_error():
    logits, ids, batch, entropies = make_batch(1, rollout=False)
    trainer = attach_logps(make_trainer(CISPOConfig(anchor='rollout'), use_vllm=True), logits, ids, entropies)
    with pytest.raises(RuntimeError, match='CISPO_ANCHOR=rollout, but this batch carries no rollout log-probs'):
        our_loss(trainer, batch)


def test_unified_mask_in_trainer_matches_reference():
    cfg = CISPOConfig(mask=True, mask_eps_low=0.2, mask_eps_high=0.28)
    loss, grad, logits, ids, batch, _ = _run(cfg)
    logps = _logps(logits, ids)
    r = torch.exp(logps.detach() - batch.old_per_token_logps)
    adv = batch.advantages
    keep = ~(((adv > 0) & (r > 1.28)) | ((adv < 0) & (r < 0.8)))
    assert (~keep & batch.completion_mask).any()
    ref = _reference(
        logps, batch.old_per_token_logps, adv, batch.completion_mask, batch.num_items_in_batch, token_mask=keep
    )
    (ref_grad,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize('norm', ['sequence', 'prompt'])
def test_sequence_and_prompt_normalisation_over_micro_batches(norm):
    """Two micro-batches of one generation batch: the summed micro-batch losses (what gradient accumulation
    adds up) equal the normalised loss over the whole generation batch."""
    B = 6
    logits, ids, whole, entropies = make_batch(5, B=2 * B)
    prompt_ids = ['p0', 'p0', 'p1', 'p1', 'p2', 'p2', 'p3', 'p3', 'p4', 'p4', 'p0', 'p5']  # p0 spans both
    halves = [slice(0, B), slice(B, 2 * B)]
    batches = []
    for sl in halves:
        b = make_batch(5, B=2 * B)[2]
        for name in (
            'completion_mask',
            'truncated_mask',
            'seq_lengths',
            'old_per_token_logps',
            'ref_per_token_logps',
            'advantages',
        ):
            setattr(b, name, getattr(whole, name)[sl])
        b.num_items_in_batch = whole.completion_mask.sum().float()
        batches.append({'model_inputs': {'rows': torch.arange(2 * B)[sl]}, 'grpo_batch': b})
    samples = [SimpleNamespace(prompt_id=p) for p in prompt_ids]
    trainer = attach_logps(make_trainer(CISPOConfig(norm=norm)), logits, ids, entropies)
    trainer.split_by_mini_batches = lambda s: [s[:B], s[B:]]
    attach_group_counts(trainer, samples, batches)
    total = sum(trainer._compute_loss_and_metrics(None, mb['model_inputs'], mb['grpo_batch'])[0] for mb in batches)

    logps = _logps(logits, ids)
    mask = whole.completion_mask
    w = torch.exp(logps.detach() - whole.old_per_token_logps).clamp(max=5.0)
    per_token = -w * whole.advantages * logps * mask
    if norm == 'sequence':
        ref = sum(per_token[i].sum() / mask[i].sum() for i in range(2 * B)) / (2 * B)
    else:
        groups = sorted(set(prompt_ids))
        ref = sum(
            sum(per_token[i].sum() for i in range(2 * B) if prompt_ids[i] == g)
            / sum(mask[i].sum() for i in range(2 * B) if prompt_ids[i] == g)
            for g in groups
        ) / len(groups)
    torch.testing.assert_close(total, ref, rtol=1e-6, atol=1e-7)
    (g_total,) = torch.autograd.grad(total, logits)
    (g_ref,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(g_total, g_ref, rtol=1e-5, atol=1e-8)


def test_chunked_path_gives_the_unchunked_loss_and_gradient():
    """--dynamic_num_samples: swift averages chunk losses by samples; ours sums Σ_chunk/N, as unchunked."""
    B = 6
    logits, ids, batch, entropies = make_batch(1, B=B)
    inputs = {'input_ids': ids, 'rows': torch.arange(B)}
    trainer = attach_logps(make_trainer(per_device_train_batch_size=2), logits, ids, entropies)
    trainer.dynamic_num_samples = True
    trainer.is_multimodal = False
    whole, whole_metrics = trainer._compute_loss_and_metrics(None, inputs, batch)
    reference = make_trainer()
    reference._update_metrics(whole_metrics)
    (g_whole,) = torch.autograd.grad(whole, logits)
    chunked = trainer._compute_loss_chunked(None, inputs, batch)
    (g_chunked,) = torch.autograd.grad(chunked, logits)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_chunked, g_whole, rtol=1e-5, atol=1e-8)
    # The three chunks' metrics are combined into those of the whole batch.
    for key, values in reference._metrics['train'].items():
        if key.startswith('cispo'):
            assert trainer._metrics['train'][key] == pytest.approx(values), key
    assert trainer.cispo_recorder.extrema == reference.cispo_recorder.extrema


def test_fp32_lm_head_computes_logits_in_float32():
    model = tiny_qwen2(vocab=50, layers=1).to(torch.bfloat16)
    ids = torch.randint(0, 50, (2, 5))
    hidden = model.model(input_ids=ids).last_hidden_state
    assert model(input_ids=ids).logits.dtype == torch.bfloat16
    assert fp32_lm_head(model)
    logits = model(input_ids=ids).logits
    assert logits.dtype == torch.float32
    expected = hidden.float() @ model.lm_head.weight.float().T
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    logits.sum().backward()
    assert model.lm_head.weight.grad.dtype == torch.bfloat16


def test_fp32_lm_head_refuses_a_wrapped_head():
    class Wrapped(torch.nn.Module):
        def get_output_embeddings(self):
            return torch.nn.Sequential(torch.nn.Linear(2, 2))

    with pytest.raises(ValueError, match='needs a plain torch.nn.Linear output layer'):
        fp32_lm_head(Wrapped())


@pytest.mark.parametrize('where', ['logps', 'advantages', 'old'])
def test_non_finite_inputs_stop_with_counts_and_sequences(where):
    logits, ids, batch, entropies = make_batch(1)
    if where == 'logps':
        with torch.no_grad():
            logits[2, 0, ids[2, 0]] = float('nan')
    elif where == 'advantages':
        batch.advantages = batch.advantages.clone()
        batch.advantages[3, :] = float('inf')
    else:
        batch.old_per_token_logps[2, 0] = float('-inf')
    trainer = attach_logps(make_trainer(), logits, ids, entropies)
    with pytest.raises(FloatingPointError) as err:
        our_loss(trainer, batch)
    message = str(err.value)
    expected = {
        'logps': 'log-probs: 1 token(s) in sequence(s) [2]',
        'advantages': f'advantages: {int(batch.completion_mask[3].sum())} token(s) in sequence(s) [3]',
        'old': 'old log-probs: 1 token(s) in sequence(s) [2]',
    }[where]
    assert expected in message and 'before the optimizer step' in message


def test_non_finite_padding_is_ignored_and_check_can_be_disabled():
    logits, ids, batch, entropies = make_batch(1)
    pad = (~batch.completion_mask).nonzero()[0]
    batch.old_per_token_logps[pad[0], pad[1]] = float('nan')
    trainer = attach_logps(make_trainer(), logits, ids, entropies)
    loss, _ = our_loss(trainer, batch)
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    batch.advantages = batch.advantages.clone()
    batch.advantages[0, 0] = float('nan')
    trainer = attach_logps(make_trainer(CISPOConfig(check_finite=False)), logits, ids, entropies)
    loss, _ = our_loss(trainer, batch)
    assert torch.isnan(loss)


def test_no_cap_overflow_stops_with_the_step_and_the_cause():
    """--epsilon_high inf: a log-ratio above 88.7 makes the float32 weight inf, and the loss inf from finite inputs."""
    logits, ids, batch, entropies = make_batch(1)
    batch.old_per_token_logps = batch.old_per_token_logps.clone()
    batch.old_per_token_logps[0, 0] -= 120.0  # r = e^120 at one token in the loss
    batch.advantages = batch.advantages.clone().abs() + 0.5  # Â > 0 there, so the inf weight reaches the loss
    trainer = attach_logps(make_trainer(epsilon_high=float('inf')), logits, ids, entropies)
    with pytest.raises(FloatingPointError) as err:
        our_loss(trainer, batch)
    message = str(err.value)
    assert 'Non-finite loss' in message and 'global step' in message
    assert 'has no cap (--epsilon_high inf), and r overflowed float32' in message
    trainer = attach_logps(
        make_trainer(CISPOConfig(check_finite=False), epsilon_high=float('inf')), logits, ids, entropies
    )
    loss, _ = our_loss(trainer, batch)
    assert not torch.isfinite(loss)  # without the check the run would go on with it


def test_non_finite_gradient_stops_before_the_optimizer_step():
    class Optimizer:
        steps = 0

        def step(self):
            Optimizer.steps += 1

    trainer = make_trainer()
    param = torch.nn.Parameter(torch.ones(3))
    trainer.model = torch.nn.Module()
    trainer.model.p = param
    trainer.state = SimpleNamespace(global_step=7)
    trainer.optimizer = Optimizer()
    guards.gate_optimizer_step(trainer)
    param.grad = torch.ones(3)
    trainer.optimizer.step()
    assert Optimizer.steps == 1
    param.grad = torch.tensor([1.0, float('nan'), 0.0])
    with pytest.raises(FloatingPointError, match='Non-finite gradient at global step 7'):
        trainer.optimizer.step()
    assert Optimizer.steps == 1


# ---- numerics at the edges: metrics and sequence ratios in float32 under bf16, the overflow message ----------------


def _one_sequence(logps, anchor, advantages, **args):
    """A trainer and a one-sequence batch whose log-probs are `logps` [1, T] (a leaf, any dtype) and anchor `anchor`."""
    from swift.rl_core.data import GRPOBatch

    T = logps.shape[-1]
    batch = GRPOBatch(
        completion_mask=torch.ones(1, T, dtype=torch.bool),
        truncated_mask=torch.zeros(1, dtype=torch.bool),
        seq_lengths=torch.tensor([T]),
        old_per_token_logps=anchor,
        advantages=advantages,
        num_items_in_batch=torch.tensor(float(T)),
        logits_to_keep=T,
    )
    trainer = make_trainer(**args)
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logps, None)
    return trainer, batch


def test_the_clip_metrics_count_a_bf16_token_the_loss_clips():
    """bf16 log-probs and anchor whose float32 ratio is 5.019 (clipped at the cap 5 in the loss): in bf16 the
    difference rounds to log 4.9997, which the metrics once counted as not clipped."""
    logps = torch.tensor([[-0.99609375, -1.0]], dtype=torch.bfloat16).requires_grad_(True)
    anchor = torch.tensor([[-2.609375, -1.0]], dtype=torch.bfloat16)
    trainer, batch = _one_sequence(logps, anchor, torch.tensor([[1.0, 1.0]]), epsilon_high=5.0)
    _, metrics = our_loss(trainer, batch)
    sums = metrics['cispo_sums']
    assert sums['ratio_max'] == pytest.approx(math.exp(-0.99609375 + 2.609375), rel=1e-6)  # 5.0193
    assert sums['clipped'] == 1.0 and sums['clipped_pos'] == 1.0


def test_the_sequence_ratio_is_formed_in_float32_under_bf16():
    """--importance_sampling_level sequence: the same log-probs given in bf16 and in float32 (equal values) give the
    same loss; the sequence log-ratio subtracted and summed in bf16 was 3.9e-4 off."""
    g = torch.Generator().manual_seed(2)
    values = (-6.0 * torch.rand(1, 64, generator=g) - 0.01).to(torch.bfloat16)  # log-probs of several magnitudes
    anchor = (values.float() + 0.3 * torch.randn(1, 64, generator=g)).to(torch.bfloat16)
    losses = []
    for dtype in (torch.bfloat16, torch.float32):
        leaf = values.to(dtype).requires_grad_(True)
        trainer, batch = _one_sequence(leaf, anchor.to(dtype), torch.ones(1, 64), importance_sampling_level='sequence')
        losses.append(float(our_loss(trainer, batch)[0]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)  # in bf16 arithmetic: 8.4e-5 apart


def test_an_overflowing_product_without_a_cap_names_the_missing_cap():
    """No cap, log r = 80 (r = 5.5e34, finite in float32), Â = 1000, log π = −10: r · Â · log π passes the float32
    range, the loss is inf from finite inputs. The error names the missing cap, not fp16 or the learning rate."""
    logps = torch.tensor([[-10.0, -1.0]]).requires_grad_(True)
    anchor = torch.tensor([[-90.0, -1.0]])
    trainer, batch = _one_sequence(logps, anchor, torch.tensor([[1000.0, 1000.0]]), epsilon_high=math.inf)
    with pytest.raises(FloatingPointError) as err:
        our_loss(trainer, batch)
    message = str(err.value)
    assert 'no cap (--epsilon_high inf)' in message and 'r · Â · log π' in message and '--epsilon_high 5.0' in message
    assert 'fp16' not in message
