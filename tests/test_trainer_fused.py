"""CISPO_FUSED_LOGPS inside the trainer: the same log-probs, entropies and parameter gradients as swift's path."""

import inspect
from types import SimpleNamespace

import pytest
import torch
from stubs import make_trainer
from swift.rlhf_trainers import GRPOTrainer
from transformers import Qwen2Config, Qwen2ForCausalLM

from cispo_swift.config import CISPOConfig


class _Unwrap:
    num_processes = 1
    process_index = 0
    is_main_process = True

    def unwrap_model(self, model):
        return model


def _model(tied=False, lora=False):
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    model = Qwen2ForCausalLM(cfg)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=['q_proj', 'v_proj'], init_lora_weights=False))
    return model


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
    assert trainer._fused_unsupported_reason() is None
    soft = _model()
    soft.config.final_logit_softcapping = 30.0
    trainer.model = soft
    assert 'final_logit_softcapping=30.0' in trainer._fused_unsupported_reason()
    trainer.model = _model()
    trainer.model.lm_head = torch.nn.Sequential(trainer.model.lm_head)
    assert 'not a plain torch.nn.Linear' in trainer._fused_unsupported_reason()
    trainer.is_multimodal = True
    assert 'multimodal' in trainer._fused_unsupported_reason()
