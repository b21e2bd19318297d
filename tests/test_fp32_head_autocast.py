"""CISPO_FP32_LM_HEAD under the autocast swift trains with.

With --torch_dtype bfloat16, swift sets bf16=True and accelerate wraps the model's forward in bf16 autocast
(`Accelerator.prepare_model`, outputs converted to float32). Autocast runs F.linear in bf16 whatever its inputs, so
the FP32 head must turn it off to compute anything in float32 (found measuring the vLLM train/inference mismatch,
docs/vllm_cpu.md).
"""

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from transformers import AutoModelForCausalLM

from cispo_swift.fused_head import fp32_lm_head


def _logits_and_hidden(model_dir, fp32_head: bool, ids):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    if fp32_head:
        fp32_lm_head(model)
    weight = model.lm_head.weight.detach().float()
    model = Accelerator(mixed_precision='bf16', cpu=True).prepare_model(model)  # as swift's trainer runs it
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    return out.logits, out.hidden_states[-1], weight


def test_fp32_head_computes_in_float32_under_bf16_autocast(tiny):
    torch.manual_seed(0)
    ids = torch.randint(0, 500, (2, 24))
    logits, hidden, weight = _logits_and_hidden(tiny['model'], True, ids)
    assert logits.dtype == torch.float32
    # The last hidden state is the head's input (bf16 values); the head must be its float32 product with W.
    fp32_product = F.linear(hidden.float(), weight)
    bf16_product = F.linear(hidden.bfloat16(), weight.bfloat16()).float()
    fp32_error = (logits - fp32_product).abs().max().item()
    bf16_error = (logits - bf16_product).abs().max().item()
    assert fp32_error < 1e-5
    assert bf16_error > 100 * max(fp32_error, 1e-8)  # the two are far apart: the check can tell them apart

    plain, _, _ = _logits_and_hidden(tiny['model'], False, ids)
    assert (plain - logits).abs().max().item() > 100 * max(fp32_error, 1e-8)


@pytest.mark.parametrize('autocast', [False, True])
def test_fp32_head_gradient_reaches_the_bf16_weight(tiny, autocast):
    model = AutoModelForCausalLM.from_pretrained(tiny['model'], dtype=torch.bfloat16)
    fp32_lm_head(model)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=torch.randint(0, 500, (1, 8))).logits
    assert logits.dtype == torch.float32
    logits.logsumexp(-1).sum().backward()
    grad = model.lm_head.weight.grad
    assert grad is not None and grad.dtype == torch.bfloat16 and grad.abs().sum() > 0
