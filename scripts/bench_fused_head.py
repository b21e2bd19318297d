#!/usr/bin/env python
"""The fused LM head (`CISPO_FUSED_LOGPS=1`) against the floor of its three matmuls, on real models' head shapes.

For each head shape (V, H) and token count N, in one process on the same inputs, forward + backward of log-probs and
the CISPO loss:

  floor    the three LM-head matmuls alone, same shapes and dtype: Z = h Wᵀ [N, V], G W [N, H], Gᵀ h [V, H]
  fused    fused.fused_linear_logp_loss with the trainer's objective (loss.cispo_objective), 3 matmuls
  chunked  fused.chunked_token_logps + the same objective, 4 matmuls (the forward's logits are recomputed)
  swift    what swift 4.6.0 does: full logits, div_(temperature), trl's selective_log_softmax, CISPO loss

Time: median over --repeats after --warmup (CUDA: synchronised). Memory: peak allocated above the inputs (CUDA
only; on CPU see scripts/bench_logps.py, which runs each method in its own process for RSS). Prints a table and
writes --json.

    python scripts/bench_fused_head.py                          # CPU, fp32, N 1024, both shapes
    python scripts/bench_fused_head.py --device cuda --dtype bfloat16 --tokens 4096,16384
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from cispo_swift import loss as L
from cispo_swift.fused import DEFAULT_CHUNK_SIZE, autograd_coef_fn, chunked_token_logps, fused_linear_logp_loss

SHAPES = {'SmolLM2-135M': (49_152, 576), 'Qwen2.5-0.5B': (151_936, 896)}
TEMPERATURE = 0.9
CAP = 5.0


def make_inputs(n, vocab, hidden, dtype, device, seed=0):
    g = torch.Generator(device='cpu').manual_seed(seed)
    h = (torch.randn(n, hidden, generator=g) * 0.5).to(device, dtype)
    w = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).to(device, dtype)
    target = torch.randint(0, vocab, (n,), generator=g).to(device)
    old = (-5 + torch.randn(n, generator=g)).to(device)
    adv = torch.randn(n, generator=g).to(device)
    mask = (torch.rand(n, generator=g) > 0.1).to(device)
    return h, w, target, old, adv, mask


def objective_inputs(old, adv, mask):
    scale = torch.ones_like(adv) / mask.sum().clamp(min=1)
    return L.TokenInputs(advantages=adv, loss_mask=mask, scale=scale, anchor=old), L.Objective(None, CAP)


def run_floor(h, w, target, old, adv, mask, chunk):
    g = torch.empty(h.shape[0], w.shape[0], dtype=h.dtype, device=h.device).normal_()
    return lambda: (h @ w.T, g @ w, g.T @ h)


def run_fused(h, w, target, old, adv, mask, chunk):
    tokens, objective = objective_inputs(old, adv, mask)
    coef_fn = autograd_coef_fn(lambda lp, s, e: L.cispo_objective(lp, tokens[s:e], objective))

    def step():
        hh, ww = h.detach().requires_grad_(True), w.detach().requires_grad_(True)
        fused_linear_logp_loss(hh, ww, None, target, coef_fn, temperature=TEMPERATURE, chunk_size=chunk)[0].backward()

    return step


def run_chunked(h, w, target, old, adv, mask, chunk):
    tokens, objective = objective_inputs(old, adv, mask)

    def step():
        hh, ww = h.detach().requires_grad_(True), w.detach().requires_grad_(True)
        logps = chunked_token_logps(hh, ww, None, target, temperature=TEMPERATURE, chunk_size=chunk)[0]
        L.cispo_objective(logps, tokens, objective).backward()

    return step


def run_swift(h, w, target, old, adv, mask, chunk):
    from trl.trainer.utils import selective_log_softmax  # as swift 4.6.0's GRPOTrainer imports it

    def step():
        hh, ww = h.detach().requires_grad_(True), w.detach().requires_grad_(True)
        logits = hh @ ww.T
        logits.div_(TEMPERATURE)
        logps = selective_log_softmax(logits, target)
        weight = torch.clamp(torch.exp(logps - old), max=CAP).detach()
        ((-weight * adv * logps) * mask).sum().div(mask.sum()).backward()

    return step


METHODS = {'floor': run_floor, 'fused': run_fused, 'chunked': run_chunked, 'swift': run_swift}


def timed(step, device, warmup, repeats):
    sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    if device == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device == 'cuda' else 0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device == 'cuda' else None
    return statistics.median(times), peak


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
    p.add_argument('--tokens', default='1024', help='comma-separated token counts N')
    p.add_argument('--shapes', default=','.join(SHAPES), help=f'comma-separated, of {list(SHAPES)}')
    p.add_argument('--methods', default=','.join(METHODS))
    p.add_argument('--chunk-size', type=int, default=DEFAULT_CHUNK_SIZE)
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--json', default=None)
    a = p.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    device_name = torch.cuda.get_device_name() if a.device == 'cuda' else platform.processor() or 'cpu'
    print(f'device {a.device} ({device_name}), torch {torch.__version__}, {a.dtype}, chunk {a.chunk_size}', flush=True)
    rows = []
    for shape in a.shapes.split(','):
        vocab, hidden = SHAPES[shape]
        for n in (int(x) for x in a.tokens.split(',')):
            inputs = make_inputs(n, vocab, hidden, dtype, a.device)
            row = {'shape': shape, 'V': vocab, 'H': hidden, 'tokens': n}
            for method in a.methods.split(','):
                try:
                    seconds, peak = timed(METHODS[method](*inputs, a.chunk_size), a.device, a.warmup, a.repeats)
                except torch.OutOfMemoryError:
                    seconds, peak = None, 'OOM'
                row[method] = {'s': seconds, 'peak_mib': peak}
                if a.device == 'cuda':
                    torch.cuda.empty_cache()
            rows.append(row)
            print(_line(row), flush=True)
    if a.json:
        with open(a.json, 'w') as f:
            json.dump({'device': device_name, 'dtype': a.dtype, 'chunk_size': a.chunk_size, 'rows': rows}, f, indent=2)


def _line(row):
    floor = row.get('floor', {}).get('s')
    parts = [f'{row["shape"]:>13} V={row["V"]} H={row["H"]} N={row["tokens"]:>6}']
    for method, r in row.items():
        if not isinstance(r, dict):
            continue
        if r['s'] is None:
            parts.append(f'{method} {r["peak_mib"]}')
            continue
        ratio = f' ({r["s"] / floor:.2f}x floor)' if floor and method != 'floor' else ''
        mem = f', {r["peak_mib"]:.0f} MiB' if isinstance(r['peak_mib'], float) else ''
        parts.append(f'{method} {r["s"] * 1e3:.1f} ms{ratio}{mem}')
    return ' | '.join(parts)


if __name__ == '__main__':
    main()
