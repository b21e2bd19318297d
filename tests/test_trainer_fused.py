"""CISPO_FUSED_LOGPS inside the trainer: the same log-probs, entropies and parameter gradients as swift's path."""

import inspect
from types import SimpleNamespace

import pytest
import torch
from stubs import SingleProcessAccelerator, make_trainer, tiny_qwen2
from swift.rlhf_trainers import GRPOTrainer

from cispo_swift.config import CISPOConfig
from cispo_swift.fused_head import unsupported_reason
from cispo_swift.trainer import CISPOGRPOTrainer


class _Unwrap(SingleProcessAccelerator):
    def unwrap_model(self, model):
        return model


def _model(tied=False, lora=False):
    return tiny_qwen2(tied=tied, lora=lora)


def _trainer(model, chunk=5, temperature=0.7):
    trainer = make_trainer(CISPOConfig(fused_logps=True, fused_chunk_size=chunk))
    trainer.accelerator = _Unwrap()
    trainer.temperature = temperature
    base = model.get_base_model() if hasattr(model, 'get_base_model') else model
    trainer.model_kwarg_keys = inspect.signature(base.forward).parameters.keys()
    trainer.is_multimodal = False
    trainer.template = SimpleNamespace(padding_free=False, sequence_parallel_size=1)
    trainer.cispo_fused = True
    return trainer


def _run(fn, trainer, model, input_ids, keep, coef):
    model.zero_grad()
    inputs = {'input_ids': input_ids, 'attention_mask': torch.ones_like(input_ids)}
    logps, entropies = fn(trainer, model, inputs, keep, input_ids, compute_entropy=True)
    (logps * coef).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logps.detach(), entropies, grads


@pytest.mark.parametrize('tied, lora', [(False, False), (True, False), (False, True)], ids=['untied', 'tied', 'lora'])
@pytest.mark.parametrize('chunk', [1, 5, 64])
def test_fused_path_matches_swift_path(tied, lora, chunk):
    model = _model(tied, lora)
    trainer = _trainer(model, chunk)
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 97, (3, 12), generator=g)
    keep = 7
    coef = torch.randn(3, keep, generator=g)
    swift = _run(GRPOTrainer._get_logps_via_local_forward, trainer, model, input_ids, keep, coef)
    ours = _run(type(trainer)._get_logps_via_local_forward, trainer, model, input_ids, keep, coef)
    torch.testing.assert_close(ours[0], swift[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1], swift[1].detach(), rtol=1e-5, atol=1e-5)
    assert set(ours[2]) == set(swift[2]) and len(ours[2]) > 0
    for name, grad in swift[2].items():
        torch.testing.assert_close(ours[2][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # The head is restored after the call: the model's logits are logits again.
    assert model(input_ids=input_ids).logits.shape[-1] == 97


def test_fallback_reasons():
    trainer = _trainer(_model())
    trainer.model = _model()
    assert unsupported_reason(trainer) is None
    soft = _model()
    soft.config.final_logit_softcapping = 30.0
    trainer.model = soft
    assert 'final_logit_softcapping=30.0' in unsupported_reason(trainer)
    trainer.model = _model()
    trainer.model.lm_head = torch.nn.Sequential(trainer.model.lm_head)
    assert 'not a plain torch.nn.Linear' in unsupported_reason(trainer)
    trainer.is_multimodal = True
    assert 'multimodal' in unsupported_reason(trainer)


def _loss_batch(model, seed=0, B=4, L=12, T=7):
    from swift.rl_core.data import GRPOBatch

    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 97, (B, L), generator=g)
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits[:, -(T + 1) : -1].float()
        logps = torch.log_softmax(logits / 0.7, -1).gather(-1, input_ids[:, -T:].unsqueeze(-1)).squeeze(-1)
    lengths = torch.tensor([T, 3, 5, 1])
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    batch = GRPOBatch(
        completion_mask=mask,
        truncated_mask=torch.zeros(B, dtype=torch.bool),
        seq_lengths=lengths,
        old_per_token_logps=logps + 1.5 * torch.randn(B, T, generator=g),
        ref_per_token_logps=logps + 0.2 * torch.randn(B, T, generator=g),
        rollout_per_token_logps=logps + 0.7 * torch.randn(B, T, generator=g),
        advantages=torch.randn(B, 1, generator=g).expand(B, T).clone(),
        num_items_in_batch=mask.sum().float() * 2,
        logits_to_keep=T,
    )
    return {'input_ids': input_ids, 'attention_mask': torch.ones_like(input_ids)}, batch


@pytest.mark.parametrize(
    'cispo, args',
    [
        ({}, {}),
        ({}, {'beta': 0.04, 'log_entropy': True}),
        ({'mask': True, 'clip_mode': 'relative', 'eps_low': 0.3}, {'epsilon_high': 1.0}),
        ({'anchor': 'rollout'}, {'use_vllm': True, 'rollout_importance_sampling_mode': 'token_truncate'}),
        ({'fp32_lm_head': True}, {'gradient_accumulation_steps': 2}),
    ],
    ids=['default', 'kl-entropy-log', 'mask-relative', 'rollout', 'fp32-ga'],
)
def test_three_matmul_loss_equals_plain_loss(cispo, args):
    """The fused loss (gradient formed in the forward) against the plain path on the same model and batch."""
    results = []
    for fused in (False, True):
        model = _model(lora=True)
        trainer = _trainer(model, chunk=5)
        trainer.cispo_config = CISPOConfig(fused_logps=True, fused_chunk_size=5, **cispo)
        for key, value in args.items():
            setattr(trainer.args, key, value)
        trainer._prepare_algorithm_params()
        trainer.beta = trainer.args.beta
        trainer.compute_entropy = trainer.args.log_entropy
        trainer.cispo_fused = fused
        trainer.temperature = 0.7
        trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
        inputs, batch = _loss_batch(model)
        assert trainer._fused_loss_applies(batch) is fused
        loss, metrics = trainer._compute_loss_and_metrics(model, inputs, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads, metrics))
    (plain_loss, plain_grads, plain_metrics), (fused_loss, fused_grads, fused_metrics) = results
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert plain_grads.keys() == fused_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    for key, value in plain_metrics['cispo_sums'].items():
        assert fused_metrics['cispo_sums'][key] == pytest.approx(value, rel=1e-5), key
    if 'kl' in plain_metrics:
        assert fused_metrics['kl'] == pytest.approx(plain_metrics['kl'], rel=1e-5)
    if plain_metrics['entropy']:
        assert fused_metrics['entropy']['entropy_mean'] == pytest.approx(plain_metrics['entropy']['entropy_mean'])


def test_three_matmul_path_is_skipped_where_the_loss_is_not_per_token():
    model = _model()
    trainer = _trainer(model)
    _, batch = _loss_batch(model)
    assert trainer._fused_loss_applies(batch)
    for attr, value in [
        ('importance_sampling_level', 'sequence'),
        ('top_entropy_quantile', 0.5),
        ('off_policy_sequence_mask_delta', 0.1),
    ]:
        saved = getattr(trainer, attr)
        setattr(trainer, attr, value)
        assert not trainer._fused_loss_applies(batch), attr
        setattr(trainer, attr, saved)
    with torch.no_grad():
        assert not trainer._fused_loss_applies(batch)


def test_fused_path_follows_autocast_like_swifts_lm_head():
    """swift's --fp16/--bf16 run the model under autocast, so its lm_head gives low-precision logits even with
    float32 weights; the fused head must compute its matmuls in the same dtype (CISPO_FP32_LM_HEAD opts out)."""
    model = _model()
    g = torch.Generator().manual_seed(2)
    input_ids = torch.randint(0, 97, (3, 12), generator=g)
    coef = torch.randn(3, 7, generator=g)
    results = {}
    for name, fn in (
        ('swift', GRPOTrainer._get_logps_via_local_forward),
        ('ours', CISPOGRPOTrainer._get_logps_via_local_forward),
    ):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            results[name] = _run(fn, _trainer(model), model, input_ids, 7, coef)
    plain = _run(CISPOGRPOTrainer._get_logps_via_local_forward, _trainer(model), model, input_ids, 7, coef)[0]
    swift, ours = results['swift'][0].float(), results['ours'][0]
    # Both from bf16 matmuls: ours differs from the float32 head's result, and from swift's only by the rounding of
    # swift's log-probs, which it returns in bf16 (ours stay float32).
    assert (ours - plain).abs().max() > 1e-5
    torch.testing.assert_close(ours, swift, rtol=2**-7, atol=0)
