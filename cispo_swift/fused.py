"""Memory-efficient log-probs through the LM head, chunked over tokens. Pure torch, no swift import.

swift's GRPO path materialises the full logits [B, T, V] (V = 151,936 for Qwen2.5), divides them by the
temperature in place and calls trl's ``selective_log_softmax``; autograd then keeps [N, V] for the
backward as well. Here the logits exist only for ``chunk_size`` tokens at a time:

- ``chunked_token_logps``: a drop-in for "logits -> log-softmax -> gather" that works with any downstream
  loss. Forward keeps the per-token log-prob only; backward recomputes each chunk's logits.
  Four matmuls over [N, H] x [H, V]: forward, recompute, grad_hidden, grad_weight.
- ``fused_linear_logp_loss``: for losses that are a per-token function of log π whose derivative is known
  once log π is known (CISPO: the clipped weight is sg(.), a constant). The gradients are formed inside the
  forward chunk loop and only scaled in backward. Three matmuls: forward, grad_hidden, grad_weight.
  ``autograd_coef_fn`` turns such a loss, written for one chunk of tokens, into the ``coef_fn`` it takes.

With a frozen LM head (LoRA; weight.requires_grad False) the grad_weight matmul is skipped in both.

Maths, per token t with hidden h_t [H], LM head W [V, H], bias b [V], temperature τ, target y_t:

    z_t = (W h_t + b) / τ                        # [V]
    log π(y_t) = z_t[y_t] - logsumexp(z_t)
    H_t = logsumexp(z_t) - Σ_v softmax(z_t)_v z_t,v             # entropy, in nats
    ∂ log π(y_t) / ∂(W h_t + b) = (onehot(y_t) - softmax(z_t)) / τ

With g_t = ∂L/∂ log π(y_t) and G = [g_t (onehot(y_t) - softmax(z_t)) / τ]_t  ([N, V], one chunk at a time):
∂L/∂hidden = G W, ∂L/∂W = Gᵀ hidden, ∂L/∂b = Σ_t G_t.

Precision: the softmax statistics are taken in float32 (float64 for float64 inputs); the returned
log-probs, entropies and loss are float32 for bf16/fp16/fp32 inputs (swift returns bf16 log-probs for bf16
logits). The matmuls run in the input dtype (in the autocast dtype under autocast, as the model's lm_head
would), or in float32 when ``fp32_head=True`` (MiniMax-M1, arXiv 2506.13585, Fig. 3: an FP32 LM head raised the
train/inference probability correlation from ≈0.987 to ≈0.997). With bf16 inputs, ``fp32_head`` makes a float32
copy of W (V·H·4 bytes) for the duration of the forward (and again in the backward of ``chunked_token_logps``).
grad_weight and grad_bias are accumulated over chunks in float32 and returned in the parameter's dtype.

Entropy is returned detached (marked non-differentiable): swift 4.6.0 only uses entropies for metrics and
for the top-entropy token mask (``entropies >= threshold``), never inside a differentiated loss.
"""

from typing import Callable, Optional, Tuple

import torch

__all__ = ['autograd_coef_fn', 'chunked_token_logps', 'fused_linear_logp_loss']

# 512 tokens: [512, V] float32 is 297 MiB for Qwen2.5's V = 151,936. Measured with scripts/bench_logps.py (shared
# 2-core CPU): at the largest size swift's path fits, peak memory 0.06x swift (fp32, 8192 tokens) and 0.12x (bf16,
# 16384 tokens); 1024 was within noise in time but 0.16x in bf16; 256 paid more per-chunk overhead.
DEFAULT_CHUNK_SIZE = 512

# coef_fn(logps_chunk [n] float32 detached, start, end) -> (loss_chunk scalar, dloss_dlogp_chunk [n])
CoefFn = Callable[[torch.Tensor, int, int], Tuple[torch.Tensor, torch.Tensor]]


def _check_inputs(hidden, weight, bias, target, temperature, chunk_size):
    if hidden.dim() != 2:
        raise ValueError(
            f'hidden must be [N, H], got shape {tuple(hidden.shape)}; flatten it with hidden.reshape(-1, H)'
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f'weight must be the LM head [V, H] with H = {hidden.shape[1]}, got shape {tuple(weight.shape)}'
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f'bias must be [V] = [{weight.shape[0]}] or None, got shape {tuple(bias.shape)}')
    if target.shape != hidden.shape[:1] or target.dtype != torch.long:
        raise ValueError(f'target must be int64 [N] = [{hidden.shape[0]}], got {target.dtype} {tuple(target.shape)}')
    if not temperature > 0:
        raise ValueError(f'temperature must be > 0, got {temperature}')
    if int(chunk_size) < 1:
        raise ValueError(f'chunk_size must be a positive int, got {chunk_size}')


def _compute_dtype(hidden, weight, fp32_head):
    # dtype of the matmuls; float64 stays float64 (gradcheck), fp32_head lifts bf16/fp16 to float32. Under autocast
    # (swift's --fp16/--bf16 mixed precision) the model's own lm_head would run in the autocast dtype: so do we.
    cdt = torch.promote_types(hidden.dtype, weight.dtype)
    if fp32_head:
        return torch.promote_types(cdt, torch.float32)
    device = hidden.device.type
    if cdt != torch.float64 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return cdt


def _stat_dtype(cdt):
    # dtype of the softmax statistics, the returned log-probs/entropies and the grad_W/grad_b accumulators
    return torch.promote_types(cdt, torch.float32)


def _head(weight, bias, cdt):
    # One cast per call (a copy only when the dtype changes, e.g. fp32_head with a bf16 head).
    w = weight.to(cdt)
    b = None if bias is None else bias.to(cdt)
    return w, b


class _Workspace:
    """Buffers reused by every chunk of one call: fresh [n, V] allocations cost page faults each time.

    z [C, V] in the matmul dtype (logits, then G cast back for the grad matmuls); f [C, V] float32 for the
    softmax statistics (the same buffer as z when the matmul dtype is float32 or wider); for a grad_W accumulated
    in a wider dtype than the matmuls, a [VB, H] block pair that keeps the upcast in cache.
    """

    VOCAB_BLOCK = 16384

    def __init__(self, rows, w, stat_dtype, widen_grad_w):
        vocab, hid = w.shape
        self.z = w.new_empty(rows, vocab)
        self.f = self.z if self.z.dtype == stat_dtype else w.new_empty(rows, vocab, dtype=stat_dtype)
        if widen_grad_w:
            self.blk = w.new_empty(min(self.VOCAB_BLOCK, vocab), hid)
            self.blk_wide = w.new_empty(min(self.VOCAB_BLOCK, vocab), hid, dtype=stat_dtype)


def _chunk_softmax(h_c, w, b, t_c, temperature, want_entropy, ws):
    """Logits of one chunk and their softmax statistics, in float32 (float64 for float64 inputs).

    h_c [n, H], w [V, H], b [V] | None, t_c [n] -> (e [n, V], s [n], logp [n], entropy [n] | None), where
    e = exp(z - max z) with z = (h_c wᵀ + b) / τ, s = Σ_v e (so softmax = e / s); e is a view of ws.f that the
    caller may overwrite until the next chunk.
    """
    n = h_c.shape[0]
    z = ws.z[:n]
    if b is None:
        torch.mm(h_c, w.T, out=z)
    else:
        torch.addmm(b, h_c, w.T, out=z)
    if ws.f is not ws.z:  # bf16/fp16 logits: statistics in float32
        z = ws.f[:n].copy_(z)
    if temperature != 1.0:
        z.div_(temperature)  # same op as swift's logits.div_(temperature)
    m = z.amax(dim=1, keepdim=True)
    z.sub_(m)
    z_t = z.gather(1, t_c.unsqueeze(1)).squeeze(1)  # z[y] - max z
    e = z.exp_()
    s = e.sum(dim=1)
    log_s = s.log()
    logp = z_t - log_s  # z[y] - logsumexp(z)
    entropy = None
    if want_entropy:
        # H = -Σ p log p with p = e/s, log p = log e - log s  =>  H = Σ entr(e) / s + log s  (entr(x) = -x log x)
        entropy = torch.special.entr(e).sum(dim=1) / s + log_s
    return e, s, logp, entropy


def _grad_logits_(e, s, t_c, coef):
    """Turn e (from _chunk_softmax) in place into G = coef (onehot(y) - softmax) [n, V]; coef = g / τ [n]."""
    e.mul_((-coef / s).unsqueeze(1))
    e.scatter_add_(1, t_c.unsqueeze(1), coef.unsqueeze(1))
    return e


def _accumulate_grads(g, h_c, w, grad_hidden, grad_w, grad_b, start, end, ws):
    """G [n, V] float32 -> grad_hidden[start:end] = G w; grad_w += Gᵀ h_c; grad_b += Σ G (each if not None)."""
    if grad_b is not None:
        grad_b.add_(g.sum(dim=0))
    n = g.shape[0]
    if ws.f is not ws.z:
        g = ws.z[:n].copy_(g)  # G in the matmul dtype (what autograd would feed the matmuls)
    if grad_hidden is not None:
        grad_hidden[start:end] = torch.mm(g, w)
    if grad_w is None:
        return
    if grad_w.dtype == g.dtype:
        grad_w.addmm_(g.T, h_c)
        return
    # bf16 matmul per vocab block, summed over chunks in float32; blocks keep the upcast in cache
    vb = ws.blk.shape[0]
    for v0 in range(0, grad_w.shape[0], vb):
        v1 = min(v0 + vb, grad_w.shape[0])
        blk = torch.mm(g[:, v0:v1].T, h_c, out=ws.blk[: v1 - v0])
        grad_w[v0:v1].add_(ws.blk_wide[: v1 - v0].copy_(blk))


class _ChunkedTokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, temperature, chunk_size, fp32_head, compute_entropy):
        n_tok = hidden.shape[0]
        cdt = _compute_dtype(hidden, weight, fp32_head)
        w, b = _head(weight, bias, cdt)
        ws = _Workspace(min(chunk_size, n_tok), w, _stat_dtype(cdt), widen_grad_w=False)
        logps = hidden.new_empty(n_tok, dtype=_stat_dtype(cdt))
        entropy = hidden.new_empty(n_tok, dtype=_stat_dtype(cdt)) if compute_entropy else None
        for start in range(0, n_tok, chunk_size):
            end = min(start + chunk_size, n_tok)
            logp, ent = _chunk_softmax(
                hidden[start:end].to(cdt), w, b, target[start:end], temperature, compute_entropy, ws
            )[2:]
            logps[start:end] = logp
            if entropy is not None:
                entropy[start:end] = ent
        del w, b, ws
        ctx.save_for_backward(hidden, weight, bias, target)
        ctx.temperature, ctx.chunk_size, ctx.cdt = temperature, chunk_size, cdt
        if entropy is not None:
            ctx.mark_non_differentiable(entropy)
        return logps, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logps, grad_entropy):
        hidden, weight, bias, target = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if grad_logps is None or not (need_h or need_w or need_b):
            return (None,) * 8
        n_tok = hidden.shape[0]
        cdt = ctx.cdt  # the forward's (backward runs outside autocast)
        w, b = _head(weight, bias, cdt)
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=_stat_dtype(cdt), device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=_stat_dtype(cdt), device=bias.device) if need_b else None
        grad_logps = grad_logps.to(_stat_dtype(cdt))
        ws = _Workspace(
            min(ctx.chunk_size, n_tok), w, _stat_dtype(cdt), widen_grad_w=need_w and w.dtype != grad_w.dtype
        )
        for start in range(0, n_tok, ctx.chunk_size):
            end = min(start + ctx.chunk_size, n_tok)
            h_c, t_c = hidden[start:end].to(cdt), target[start:end]
            e, s, _, _ = _chunk_softmax(h_c, w, b, t_c, ctx.temperature, False, ws)
            g = _grad_logits_(e, s, t_c, grad_logps[start:end] / ctx.temperature)
            _accumulate_grads(g, h_c, w, grad_hidden, grad_w, grad_b, start, end, ws)
        del ws
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return (grad_hidden, grad_w, grad_b) + (None,) * 5  # target, temperature, chunk_size, fp32_head, entropy


def chunked_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    target: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    fp32_head: bool = False,
    compute_entropy: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-token log π(target) through the LM head without holding the [N, V] logits of all tokens.

    Equivalent to ``log_softmax((hidden @ weight.T + bias) / temperature, -1).gather(-1, target)``, and to
    swift's ``logits.div_(temperature)`` + trl ``selective_log_softmax``, for any downstream loss. Forward
    keeps only the inputs; backward recomputes each chunk's logits (4 matmuls in all).

    Args:
        hidden: [N, H] last hidden states (the rows whose next token is ``target``), any float dtype.
        weight: [V, H] LM head weight; may be tied to the input embedding or frozen (requires_grad=False).
        bias: [V] LM head bias, or None.
        target: [N] int64 token ids.
        temperature: τ > 0; logits are divided by it (as swift does with its sampling temperature).
        chunk_size: tokens per chunk. Working memory: a [chunk_size, V] buffer in float32, plus one in the
            matmul dtype when that is bf16/fp16 (so chunk_size · V · 4 or · 6 bytes), and in backward the
            float32 grad_W accumulator [V, H]. Larger chunks amortise the per-chunk grad_W accumulation
            (a pass over [V, H]), which matters most with bf16 matmuls.
        fp32_head: do the matmuls in float32 even for bf16/fp16 inputs (MiniMax-M1's FP32 LM head).
        compute_entropy: also return the per-token entropy of softmax(z) (nats), detached.

    Returns:
        logps: [N] float32, differentiable w.r.t. hidden, weight and bias.
        entropy: [N] float32, detached (no gradient flows through it), or None.
    """
    _check_inputs(hidden, weight, bias, target, temperature, chunk_size)
    return _ChunkedTokenLogps.apply(
        hidden, weight, bias, target, float(temperature), int(chunk_size), bool(fp32_head), bool(compute_entropy)
    )


class _FusedLinearLogpLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden, weight, bias, target, coef_fn, temperature, chunk_size, fp32_head, compute_entropy, need_grads
    ):
        n_tok = hidden.shape[0]
        need_h, need_w, need_b = (need_grads and x for x in ctx.needs_input_grad[:3])
        cdt = _compute_dtype(hidden, weight, fp32_head)
        w, b = _head(weight, bias, cdt)
        logps = hidden.new_empty(n_tok, dtype=_stat_dtype(cdt))
        entropy = hidden.new_empty(n_tok, dtype=_stat_dtype(cdt)) if compute_entropy else None
        loss = hidden.new_zeros((), dtype=_stat_dtype(cdt))
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=_stat_dtype(cdt), device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=_stat_dtype(cdt), device=bias.device) if need_b else None
        ws = _Workspace(min(chunk_size, n_tok), w, _stat_dtype(cdt), widen_grad_w=need_w and w.dtype != grad_w.dtype)
        for start in range(0, n_tok, chunk_size):
            end = min(start + chunk_size, n_tok)
            h_c, t_c = hidden[start:end].to(cdt), target[start:end]
            e, s, logp, ent = _chunk_softmax(h_c, w, b, t_c, temperature, compute_entropy, ws)
            logps[start:end] = logp
            if entropy is not None:
                entropy[start:end] = ent
            loss_c, dlogp = coef_fn(logp, start, end)
            if loss_c.dim() != 0 or dlogp.shape != logp.shape:
                raise ValueError(
                    f'coef_fn must return (scalar loss, dloss_dlogp [{end - start}]) for tokens [{start}, {end}), '
                    f'got shapes {tuple(loss_c.shape)} and {tuple(dlogp.shape)}'
                )
            loss += loss_c.to(loss.dtype)
            if need_h or need_w or need_b:
                g = _grad_logits_(e, s, t_c, dlogp.to(e.dtype) / temperature)
                _accumulate_grads(g, h_c, w, grad_hidden, grad_w, grad_b, start, end, ws)
        del w, b, ws
        # Stored in the parameters' dtypes; backward only scales them by grad_output.
        ctx.grads = [
            grad_hidden,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
        ]
        ctx.mark_non_differentiable(*(t for t in (logps, entropy) if t is not None))  # one call: a second replaces
        return loss, logps, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_logps, grad_entropy):
        if ctx.grads is None:
            raise RuntimeError('fused_linear_logp_loss: backward called twice; its stored gradients are consumed once')
        grads, ctx.grads = ctx.grads, None
        if grad_loss is not None and not bool(grad_loss == 1):
            for g in grads:
                if g is not None:
                    g.mul_(grad_loss.to(g.dtype))  # in place: the stored gradients are used once
        return (*grads, None, None, None, None, None, None, None)


def fused_linear_logp_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    target: torch.Tensor,
    coef_fn: CoefFn,
    *,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    fp32_head: bool = False,
    compute_entropy: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Loss L = Σ_chunks loss_chunk(log π) through the LM head, with gradients formed in the forward (3 matmuls).

    For a loss that is a per-token function of log π(y_t) whose derivative is known once log π is known, e.g.
    CISPO (MiniMax-M1, arXiv 2506.13585, section 3.1) with the clipped IS weight a constant:
        ℓ_t = -sg(w_t) · Â_t · log π(y_t) · m_t / N    =>    ∂L/∂log π(y_t) = -w_t · Â_t · m_t / N.
    For each chunk [start, end) the logits are computed once, ``coef_fn`` is called, and G = ∂L/∂logits
    (see module docstring) gives grad_hidden[start:end] = G W and the chunk's share of grad_W, grad_b.
    Backward multiplies these stored gradients by grad_output (in place; a second backward raises).

    Args:
        hidden, weight, bias, target, temperature, chunk_size, fp32_head, compute_entropy:
            as in ``chunked_token_logps``.
        coef_fn: ``coef_fn(logps_chunk, start, end) -> (loss_chunk, dloss_dlogp_chunk)``; logps_chunk is
            [end - start] float32 (no grad); loss_chunk is a scalar tensor and dloss_dlogp_chunk is
            [end - start]. Index your per-token tensors (old log-probs, advantages, mask, ...) with
            [start:end] of the flattened N. It must not depend on other chunks' log-probs.

    Returns:
        loss: scalar float32, differentiable w.r.t. hidden, weight, bias (of those that require grad).
        logps: [N] float32, detached.
        entropy: [N] float32, detached, or None.

    Memory: the chunk buffers as in ``chunked_token_logps``; grad_W [V, H] is accumulated in float32 during the
    loop, and grad_hidden [N, H] and grad_W (in the parameters' dtypes) are held from forward to backward.
    Under ``torch.no_grad()`` no gradient is formed.
    """
    _check_inputs(hidden, weight, bias, target, temperature, chunk_size)
    return _FusedLinearLogpLoss.apply(
        hidden,
        weight,
        bias,
        target,
        coef_fn,
        float(temperature),
        int(chunk_size),
        bool(fp32_head),
        bool(compute_entropy),
        torch.is_grad_enabled(),
    )


def autograd_coef_fn(chunk_loss: Callable[[torch.Tensor, int, int], torch.Tensor]) -> CoefFn:
    """``coef_fn`` for a loss given as a function of one chunk's log-probs: its value and, by autograd, its
    gradient w.r.t. those log-probs. ``chunk_loss(logps_chunk, start, end)`` gets a leaf [end - start] that
    requires grad and returns a scalar; it must be a per-token function of log π (no other chunk's log-probs)."""

    def coef_fn(logps, start, end):
        with torch.enable_grad():
            leaf = logps.detach().requires_grad_(True)
            value = chunk_loss(leaf, start, end)
            (grad,) = torch.autograd.grad(value, leaf)
        return value.detach(), grad

    return coef_fn
