"""cispo_swift.fused against a plain-torch reference written here: full logits -> log_softmax -> gather.

Truth is computed in float64 from the same (possibly bf16-rounded) inputs. Tolerances per dtype:
- float32: rtol 1e-5 / atol 1e-6 on values and gradients.
- bf16 with fp32_head: log-probs at float32 precision (the matmul really is float32); gradients come back
  in bf16, so 2 bf16 ulps (2^-7) relative to the largest entry.
- bf16 without fp32_head: the logits themselves are rounded to bf16 (|z| ≈ 5 -> ≈ 0.02 absolute), so 1e-2
  (log-probs) and 3e-2 (gradients) relative to the largest entry; we also check that the error is no worse
  than plain bf16 autograd on the same inputs (what swift runs).
"""

import pytest
import torch

import cispo_swift.fused as fused_mod
from cispo_swift import loss as L
from cispo_swift.fused import autograd_coef_fn, chunked_token_logps, fused_linear_logp_loss

N, H, V = 37, 32, 211
EPS_HIGH = 1.5  # absolute cap on the IS ratio (swift's convention), low enough that some tokens clip


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    # Tiny tensors: OpenMP synchronisation dominates, and stalls badly on a loaded machine. Restored after.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------- reference (independent of fused.py)
def ref_logprobs_all(hidden, weight, bias, temperature):
    logits = hidden @ weight.T  # [N, V]
    if bias is not None:
        logits = logits + bias
    return torch.log_softmax(logits / temperature, dim=-1)


def ref_token_logps(hidden, weight, bias, target, temperature):
    return ref_logprobs_all(hidden, weight, bias, temperature).gather(-1, target.unsqueeze(-1)).squeeze(-1)


def ref_entropy(hidden, weight, bias, temperature):
    logp = ref_logprobs_all(hidden, weight, bias, temperature)
    return -(logp.exp() * logp).sum(-1)


def ref_cispo_terms(logps, old_logps, advantages, mask, normalizer):
    # ℓ_t = -sg(min(r_t, ε_high)) · Â_t · log π_t · m_t / normalizer   (ε_high: absolute cap)
    w = torch.exp(logps - old_logps).clamp(max=EPS_HIGH).detach()  # sg(.)
    return -(w * advantages * logps) * mask / normalizer


def ref_cispo_loss(logps, old_logps, advantages, mask, normalizer):
    return ref_cispo_terms(logps, old_logps, advantages, mask, normalizer).sum()


def make_cispo_coef_fn(old_logps, advantages, mask, *, epsilon_high, normalizer):
    """The fused path's coef_fn for the CISPO objective the trainer uses (loss.cispo_objective), flat tokens."""
    tokens = L.TokenInputs(
        advantages=advantages,
        loss_mask=mask.bool(),
        scale=torch.full_like(advantages, 1.0) / normalizer,
        anchor=old_logps,
    )
    objective = L.Objective(lower=None, upper=epsilon_high)
    return autograd_coef_fn(lambda logps, start, end: L.cispo_objective(logps, tokens[start:end], objective))


# ---------------------------------------------------------------- data and helpers
def make_inputs(dtype, with_bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 3 / H**0.5).to(dtype)  # logits of O(3): a peaked softmax
    bias = torch.randn(V, generator=g).to(dtype) if with_bias else None
    target = torch.randint(0, V, (N,), generator=g)
    with torch.no_grad():
        lp = ref_token_logps(hidden.double(), weight.double(), None if bias is None else bias.double(), target, 1.0)
    old_logps = (lp + 0.5 * torch.randn(N, generator=g, dtype=torch.float64)).float()  # ratios on both sides of 1
    advantages = torch.randn(N, generator=g)
    mask = (torch.rand(N, generator=g) > 0.3).float()
    mask[:3] = 0  # masked tokens, including the whole first chunk for chunk sizes ≤ 3
    return hidden, weight, bias, target, old_logps, advantages, mask


def leaves(tensors, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


def grads(tensors):
    return [None if t is None else t.grad for t in tensors]


def assert_close(actual, expected, dtype, kind, fp32_head=False, scale=None):
    """kind: 'value' (log-probs, entropies, loss) or 'grad'; expected is the float64 truth.

    scale: magnitude the error is measured against (default: the largest |expected|). For a loss, a sum of
    terms of both signs, pass Σ|terms|: each term carries its own rounding, and they cancel in the sum.
    """
    actual, expected = actual.double(), expected.double()
    if dtype == torch.float32 and scale is None:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
        return
    if dtype == torch.float32:
        tol = 1e-6
    elif fp32_head:
        tol = 1e-5 if kind == 'value' else 2**-7
    else:
        tol = 1e-2 if kind == 'value' else 3e-2
    scale = expected.abs().max().item() if scale is None else scale
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale)


CASES = [
    pytest.param(torch.float32, False, id='fp32'),
    pytest.param(torch.bfloat16, False, id='bf16'),
    pytest.param(torch.bfloat16, True, id='bf16-fp32head'),
]
CHUNKS = [1, 5, N, 64]  # 1, one that does not divide N, = N, > N


# ---------------------------------------------------------------- chunked_token_logps
@pytest.mark.parametrize('dtype,fp32_head', CASES)
@pytest.mark.parametrize('chunk_size', CHUNKS)
@pytest.mark.parametrize('temperature', [1.0, 0.7])
@pytest.mark.parametrize('with_bias', [False, True])
def test_chunked_logps_values_and_grads(dtype, fp32_head, chunk_size, temperature, with_bias):
    hidden, weight, bias, target, old_logps, adv, mask = make_inputs(dtype, with_bias)
    normalizer = mask.sum()

    ref_in = leaves([hidden, weight, bias], torch.float64)
    ref_lp = ref_token_logps(*ref_in, target, temperature)
    ref_cispo_loss(ref_lp, old_logps.double(), adv.double(), mask.double(), normalizer).backward()

    ins = leaves([hidden, weight, bias])
    lp, ent = chunked_token_logps(*ins, target, temperature=temperature, chunk_size=chunk_size, fp32_head=fp32_head)
    assert ent is None and lp.dtype == torch.float32 and lp.shape == (N,)
    loss = ref_cispo_loss(lp, old_logps, adv, mask, normalizer)
    loss.backward()

    assert_close(lp, ref_lp, dtype, 'value', fp32_head)
    for got, want, inp in zip(grads(ins), grads(ref_in), ins):
        if inp is None:
            continue
        assert got.dtype == inp.dtype
        assert_close(got, want, dtype, 'grad', fp32_head)
    assert torch.all(ins[0].grad[mask == 0] == 0)  # masked tokens: no gradient into their hidden rows


@pytest.mark.parametrize('dtype,fp32_head', CASES)
@pytest.mark.parametrize('temperature', [1.0, 0.7])
def test_entropy_matches_reference_and_is_detached(dtype, fp32_head, temperature):
    hidden, weight, bias, target, *_ = make_inputs(dtype, True)
    ref_ent = ref_entropy(hidden.double(), weight.double(), bias.double(), temperature)
    ins = leaves([hidden, weight, bias])
    lp, ent = chunked_token_logps(
        *ins, target, temperature=temperature, chunk_size=5, fp32_head=fp32_head, compute_entropy=True
    )
    assert_close(ent, ref_ent, dtype, 'value', fp32_head)
    assert not ent.requires_grad and lp.requires_grad
    loss, lp2, ent2 = fused_linear_logp_loss(
        *ins,
        target,
        lambda lp, s, e: (lp.sum(), torch.ones_like(lp)),
        temperature=temperature,
        chunk_size=5,
        fp32_head=fp32_head,
        compute_entropy=True,
    )
    assert_close(ent2, ref_ent, dtype, 'value', fp32_head)
    assert not ent2.requires_grad and not lp2.requires_grad


def test_bf16_error_no_worse_than_plain_bf16_autograd():
    # What swift runs on bf16: bf16 logits, bf16 log_softmax, autograd. Ours: bf16 matmuls, float32 softmax.
    hidden, weight, bias, target, old_logps, adv, mask = make_inputs(torch.bfloat16, True)
    gl = torch.randn(N, generator=torch.Generator().manual_seed(1))

    def run(fn, dtype):
        ins = leaves([hidden, weight, bias], dtype)
        lp = fn(ins)
        (lp * gl.to(lp.dtype)).sum().backward()
        return [lp.detach().double()] + [g.double() for g in grads(ins)]

    truth = run(lambda i: ref_token_logps(*i, target, 0.7), torch.float64)
    plain = run(lambda i: ref_token_logps(*i, target, 0.7), None)
    ours = run(lambda i: chunked_token_logps(*i, target, temperature=0.7, chunk_size=8)[0], None)
    for p, o, t in zip(plain, ours, truth):
        err_plain, err_ours = (p - t).abs().max().item(), (o - t).abs().max().item()
        assert err_ours <= 1.5 * err_plain, (err_ours, err_plain)


# ---------------------------------------------------------------- fused_linear_logp_loss
@pytest.mark.parametrize('dtype,fp32_head', CASES)
@pytest.mark.parametrize('chunk_size', CHUNKS)
@pytest.mark.parametrize('temperature', [1.0, 0.7])
@pytest.mark.parametrize('with_bias', [False, True])
def test_fused_loss_values_and_grads(dtype, fp32_head, chunk_size, temperature, with_bias):
    hidden, weight, bias, target, old_logps, adv, mask = make_inputs(dtype, with_bias)
    normalizer = mask.sum().item()

    ref_in = leaves([hidden, weight, bias], torch.float64)
    ref_lp = ref_token_logps(*ref_in, target, temperature)
    ref_loss = ref_cispo_loss(ref_lp, old_logps.double(), adv.double(), mask.double(), normalizer)
    ref_loss.backward()

    ins = leaves([hidden, weight, bias])
    coef_fn = make_cispo_coef_fn(old_logps, adv, mask, epsilon_high=EPS_HIGH, normalizer=normalizer)
    loss, lp, ent = fused_linear_logp_loss(
        *ins, target, coef_fn, temperature=temperature, chunk_size=chunk_size, fp32_head=fp32_head
    )
    assert ent is None and loss.dim() == 0 and not lp.requires_grad
    loss.backward()

    assert_close(lp, ref_lp, dtype, 'value', fp32_head)
    loss_scale = ref_cispo_terms(ref_lp, old_logps.double(), adv.double(), mask.double(), normalizer).abs().sum()
    assert_close(loss, ref_loss, dtype, 'value', fp32_head, scale=loss_scale.item())
    for got, want, inp in zip(grads(ins), grads(ref_in), ins):
        if inp is None:
            continue
        assert got.dtype == inp.dtype
        assert_close(got, want, dtype, 'grad', fp32_head)
    assert torch.all(ins[0].grad[mask == 0] == 0)


@pytest.mark.parametrize('fused', [False, True])
def test_bf16_grad_weight_accumulated_in_vocab_blocks(monkeypatch, fused):
    # bf16 grad_W is summed over chunks in float32 one vocab block at a time; make V = 211 span 5 blocks.
    monkeypatch.setattr(fused_mod._Workspace, 'VOCAB_BLOCK', 50)
    hidden, weight, bias, target, old_logps, adv, mask = make_inputs(torch.bfloat16, True)
    normalizer = mask.sum().item()
    ref_in = leaves([hidden, weight, bias], torch.float64)
    ref_cispo_loss(
        ref_token_logps(*ref_in, target, 0.7), old_logps.double(), adv.double(), mask.double(), normalizer
    ).backward()
    ins = leaves([hidden, weight, bias])
    if fused:
        coef_fn = make_cispo_coef_fn(old_logps, adv, mask, epsilon_high=EPS_HIGH, normalizer=normalizer)
        loss = fused_linear_logp_loss(*ins, target, coef_fn, temperature=0.7, chunk_size=5)[0]
    else:
        lp = chunked_token_logps(*ins, target, temperature=0.7, chunk_size=5)[0]
        loss = ref_cispo_loss(lp, old_logps, adv, mask, normalizer)
    loss.backward()
    for got, want in zip(grads(ins), grads(ref_in)):
        assert_close(got, want, torch.bfloat16, 'grad')


def test_cispo_coef_fn_clipped_token_keeps_gradient():
    # A token whose ratio exceeds the cap still gets ∂L/∂log π = -ε_high · Â / N, not 0 as in PPO/GRPO.
    old = torch.tensor([0.0, 0.0, 0.0])
    logp = torch.log(torch.tensor([3.0, 0.5, 3.0]))  # ratios 3 (clipped), 0.5, 3 (clipped, masked)
    adv, mask = torch.tensor([2.0, -1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    coef_fn = make_cispo_coef_fn(old, adv, mask, epsilon_high=EPS_HIGH, normalizer=4.0)
    loss, dlogp = coef_fn(logp, 0, 3)
    torch.testing.assert_close(dlogp, torch.tensor([-EPS_HIGH * 2.0 / 4, 0.5 * 1.0 / 4, 0.0]))
    torch.testing.assert_close(loss, (dlogp * logp).sum())


def test_fused_grad_output_scaling_and_no_grad():
    hidden, weight, bias, target, old_logps, adv, mask = make_inputs(torch.float32, True)
    coef_fn = make_cispo_coef_fn(old_logps, adv, mask, epsilon_high=EPS_HIGH, normalizer=mask.sum().item())
    ref_in = leaves([hidden, weight, bias], torch.float64)
    ref_loss = ref_cispo_loss(
        ref_token_logps(*ref_in, target, 1.0), old_logps.double(), adv.double(), mask.double(), mask.sum().item()
    )
    (ref_loss * -2.5).backward()

    ins = leaves([hidden, weight, bias])
    loss, _, _ = fused_linear_logp_loss(*ins, target, coef_fn, chunk_size=8)
    (loss * -2.5).backward()  # grad_output ≠ 1, as with gradient-accumulation scaling
    for got, want in zip(grads(ins), grads(ref_in)):
        assert_close(got, want, torch.float32, 'grad')
    with pytest.raises(RuntimeError, match='backward called twice'):
        loss.backward()

    with torch.no_grad():
        loss_ng, lp_ng, _ = fused_linear_logp_loss(*ins, target, coef_fn, chunk_size=8)
    assert not loss_ng.requires_grad
    loss_scale = (
        ref_cispo_terms(
            ref_in_lp := ref_token_logps(*ref_in, target, 1.0),
            old_logps.double(),
            adv.double(),
            mask.double(),
            mask.sum().item(),
        )
        .abs()
        .sum()
    )
    assert_close(loss_ng, ref_loss, torch.float32, 'value', scale=loss_scale.item())
    assert_close(lp_ng, ref_in_lp, torch.float32, 'value')


# ---------------------------------------------------------------- edge cases and integration shapes
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_empty_input(dtype):
    hidden, weight, bias, *_ = leaves(make_inputs(dtype, True)[:3])
    h0, t0 = hidden[:0], torch.zeros(0, dtype=torch.long)
    lp, ent = chunked_token_logps(h0, weight, bias, t0, compute_entropy=True)
    assert lp.shape == (0,) and ent.shape == (0,)
    lp.sum().backward()
    assert torch.all(weight.grad == 0) and torch.all(bias.grad == 0)
    weight.grad = bias.grad = None

    loss, lp, _ = fused_linear_logp_loss(h0, weight, bias, t0, lambda *a: 1 / 0)  # coef_fn is never called
    assert loss.item() == 0 and lp.shape == (0,)
    loss.backward()
    assert torch.all(weight.grad == 0) and hidden.grad.shape == hidden.shape


@pytest.mark.parametrize('fused', [False, True])
def test_tied_embedding_gets_both_gradients(fused):
    # LM head tied to the input embedding: autograd must add the head's gradient to the embedding's.
    torch.manual_seed(0)
    emb = torch.nn.Embedding(V, H)
    proj = torch.nn.Linear(H, H)
    ids = torch.randint(0, V, (N + 1,))
    old_logps, adv, mask = torch.randn(N) - 5, torch.randn(N), torch.ones(N)

    def run(use_fused):
        emb.zero_grad(set_to_none=True)
        hidden = torch.tanh(proj(emb(ids[:-1])))  # [N, H]
        if use_fused:
            coef_fn = make_cispo_coef_fn(old_logps, adv, mask, epsilon_high=EPS_HIGH, normalizer=N)
            if fused:
                loss = fused_linear_logp_loss(hidden, emb.weight, None, ids[1:], coef_fn, chunk_size=6)[0]
            else:
                lp = chunked_token_logps(hidden, emb.weight, None, ids[1:], chunk_size=6)[0]
                loss = ref_cispo_loss(lp, old_logps, adv, mask, N)
        else:
            loss = ref_cispo_loss(ref_token_logps(hidden, emb.weight, None, ids[1:], 1.0), old_logps, adv, mask, N)
        loss.backward()
        return emb.weight.grad.clone()

    want, got = run(False), run(True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # both paths into the tied weight matter: the embedding rows used as inputs and the head
    assert want[ids[:-1]].abs().sum() > 0


@pytest.mark.parametrize('fused', [False, True])
def test_lora_model_frozen_head(fused):
    # HF Qwen2 + peft LoRA: the head is frozen (and tied); gradients reach the LoRA weights through hidden.
    transformers = pytest.importorskip('transformers')
    peft = pytest.importorskip('peft')
    cfg = transformers.Qwen2Config(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = peft.get_peft_model(
        transformers.Qwen2ForCausalLM(cfg),
        peft.LoraConfig(r=4, target_modules=['q_proj', 'v_proj'], init_lora_weights=False),
    )
    head = model.get_output_embeddings()
    assert not head.weight.requires_grad
    ids = torch.randint(0, V, (2, 10))
    old_logps, adv = torch.randn(2, 9) - 5, torch.randn(2, 9)
    mask = torch.ones(2, 9)
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def lora_grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {n: p.grad.clone() for n, p in lora.items()}

    out = model(input_ids=ids, output_hidden_states=True)
    ref_lp = torch.log_softmax(out.logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    want = lora_grads(ref_cispo_loss(ref_lp, old_logps, adv, mask, mask.sum()))

    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][:, :-1].reshape(-1, H)
    flat = [x.reshape(-1) for x in (old_logps, adv, mask)]
    if fused:
        coef_fn = make_cispo_coef_fn(*flat, epsilon_high=EPS_HIGH, normalizer=mask.sum().item())
        loss = fused_linear_logp_loss(hidden, head.weight, head.bias, ids[:, 1:].reshape(-1), coef_fn, chunk_size=7)[0]
    else:
        lp = chunked_token_logps(hidden, head.weight, head.bias, ids[:, 1:].reshape(-1), chunk_size=7)[0]
        loss = ref_cispo_loss(lp, *flat, mask.sum())
    got = lora_grads(loss)
    assert head.weight.grad is None
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_bad_shapes_raise_clear_errors():
    hidden, weight, bias, target, *_ = make_inputs(torch.float32, True)
    with pytest.raises(ValueError, match=r'hidden must be \[N, H\]'):
        chunked_token_logps(hidden[None], weight, bias, target)
    with pytest.raises(ValueError, match='target must be int64'):
        chunked_token_logps(hidden, weight, bias, target.int())
    with pytest.raises(ValueError, match='chunk_size'):
        chunked_token_logps(hidden, weight, bias, target, chunk_size=0)
    with pytest.raises(ValueError, match='coef_fn must return'):
        fused_linear_logp_loss(hidden, weight, bias, target, lambda lp, s, e: (lp, lp))
