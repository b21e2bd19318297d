#!/usr/bin/env python
"""Peak memory and time of log-probs + CISPO loss, forward and backward, through a Qwen2.5-size LM head.

Compares, on the same inputs (same seed):
  swift    what swift.rlhf_trainers.GRPOTrainer._get_logps_via_local_forward does after the model forward:
           full logits [B, T, V] = lm_head(hidden), logits.div_(temperature), trl's selective_log_softmax
           (imported as swift imports it), then swift's CISPO loss and .backward()
  chunked  cispo_swift.fused.chunked_token_logps (4 matmuls) + the same CISPO loss
  fused    cispo_swift.fused.fused_linear_logp_loss with the trainer's objective, loss.cispo_objective (3 matmuls)

Each (method, size, chunk size) runs in its own subprocess. Memory = peak RSS of that process
(VmHWM, reset through /proc/self/clear_refs before each repeat; getrusage ru_maxrss where that is not
possible) minus the RSS right after the inputs were created, max over repeats: it counts everything the step
allocates, including the weight's .grad [V, H] (the same for all methods). A memory guard
(setrlimit RLIMIT_AS) makes an over-budget run fail with an allocation error that is reported (with the phase
it happened in) instead of taking the machine down. Time = median wall-clock over --repeats after --warmup.

    python scripts/bench_logps.py                    # fp32, 1024,4096,8192,16384 tokens, default chunk size
    python scripts/bench_logps.py --dtype bfloat16 --chunk-size 512,1024,2048 --json out.json
    python scripts/bench_logps.py --sizes 4096 --methods chunked,fused --dtype bfloat16 --fp32-head
"""

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # workers import cispo_swift from here
V_QWEN25, H_QWEN25_05B = 151_936, 896
EPS_HIGH = 5.0  # absolute cap on the IS ratio (ScaleRL's value); swift's convention min(r, ε_high)
SEED = 0


def _meminfo_kib(key):
    with open('/proc/meminfo') as f:
        for line in f:
            if line.startswith(key + ':'):
                return int(line.split()[1])
    return None


def _status_kib(key):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(key + ':'):
                return int(line.split()[1])
    return None


def _reset_peak_rss():
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where /proc/self/clear_refs is missing."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def _peak_rss_mib(resettable):
    if resettable:
        return _status_kib('VmHWM') / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; cannot be reset


def _cpu_s():
    r = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process
    return r.ru_utime + r.ru_stime


def _cpu_model():
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown'


# ---------------------------------------------------------------- worker (one method, one size, one process)
def make_inputs(torch, n_tok, seq_len, vocab, hidden_size, dtype):
    g = torch.Generator().manual_seed(SEED)
    hidden = torch.randn(n_tok, hidden_size, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(vocab, hidden_size, generator=g).mul_(3 / hidden_size**0.5).to(dtype).requires_grad_()
    target = torch.randint(0, vocab, (n_tok,), generator=g)
    old_logps = torch.randn(n_tok, generator=g) - 12.0  # ≈ log(1/V): ratios on both sides of 1, some clipped
    advantages = torch.randn(n_tok, generator=g)
    mask = (torch.rand(n_tok, generator=g) > 0.1).float()
    return hidden, weight, target, old_logps, advantages, mask


def cispo_loss(torch, per_token_logps, old_logps, advantages, mask, normalizer):
    # swift 4.6.0, loss_type 'cispo': clamp(coef_1, max=epsilon_high).detach() * advantages * per_token_logps
    coef_1 = torch.exp(per_token_logps - old_logps)
    per_token_loss = -torch.clamp(coef_1, max=EPS_HIGH).detach() * advantages * per_token_logps  # sg(.)
    return (per_token_loss * mask).sum() / normalizer


def step_swift(torch, inputs, args):
    import torch.nn.functional as F
    from trl.trainer.utils import selective_log_softmax  # as swift/rlhf_trainers/grpo_trainer.py imports it

    hidden, weight, target, old_logps, advantages, mask = inputs
    b, t = hidden.shape[0] // args.seq_len, args.seq_len
    logits = F.linear(hidden.view(b, t, -1), weight)  # lm_head: [B, T, V] in the model dtype
    logits.div_(args.temperature)
    logps = selective_log_softmax(logits, target.view(b, t))  # [B, T]
    loss = cispo_loss(torch, logps, old_logps.view(b, t), advantages.view(b, t), mask.view(b, t), mask.sum())
    return loss


def step_chunked(torch, inputs, args):
    from cispo_swift.fused import chunked_token_logps

    hidden, weight, target, old_logps, advantages, mask = inputs
    logps, _ = chunked_token_logps(
        hidden, weight, None, target, temperature=args.temperature, chunk_size=args.chunk, fp32_head=args.fp32_head
    )
    loss = cispo_loss(torch, logps, old_logps, advantages, mask, mask.sum())
    return loss


def step_fused(torch, inputs, args):
    from cispo_swift import loss as L
    from cispo_swift.fused import autograd_coef_fn, fused_linear_logp_loss

    hidden, weight, target, old_logps, advantages, mask = inputs
    scale = torch.ones_like(advantages) / mask.sum()
    tokens = L.TokenInputs(advantages=advantages, loss_mask=mask.bool(), scale=scale, anchor=old_logps)
    objective = L.Objective(lower=None, upper=EPS_HIGH)
    coef_fn = autograd_coef_fn(lambda logps, start, end: L.cispo_objective(logps, tokens[start:end], objective))
    loss, _, _ = fused_linear_logp_loss(
        hidden,
        weight,
        None,
        target,
        coef_fn,
        temperature=args.temperature,
        chunk_size=args.chunk,
        fp32_head=args.fp32_head,
    )
    return loss


STEPS = {'swift': step_swift, 'chunked': step_chunked, 'fused': step_fused}


def worker(args):
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    # import everything any step needs before the memory baseline (trl alone is > 100 MiB of RSS)
    import trl.trainer.utils  # noqa: F401

    import cispo_swift.fused  # noqa: F401

    dtype = getattr(torch, args.dtype)
    inputs = make_inputs(torch, args.n, args.seq_len, args.vocab, args.hidden, dtype)
    gc.collect()
    resettable = _reset_peak_rss()
    base_mib = _status_kib('VmRSS') / 1024 if resettable else _peak_rss_mib(False)
    peaks = []
    if args.mem_limit_gib > 0:  # guard: address space now + the remaining budget
        budget = int(args.mem_limit_gib * 2**30 - _status_kib('VmRSS') * 1024)
        limit = _status_kib('VmSize') * 1024 + max(budget, 0)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    step = STEPS[args.method]
    hidden, weight = inputs[:2]
    out = {'method': args.method, 'n': args.n, 'chunk': args.chunk if args.method != 'swift' else None}
    times, fwd_times, cpu_times, phase = [], [], [], 'forward'
    try:
        for i in range(args.warmup + args.repeats):
            hidden.grad = weight.grad = None
            gc.collect()
            _reset_peak_rss()
            phase = 'forward'
            c0 = _cpu_s()
            t0 = time.perf_counter()
            loss = step(torch, inputs, args)
            t1 = time.perf_counter()
            phase = 'backward'
            loss.backward()
            t2 = time.perf_counter()
            c2 = _cpu_s()
            loss_value = loss.item()
            del loss
            peaks.append(_peak_rss_mib(resettable) - base_mib)
            if i >= args.warmup:
                fwd_times.append(t1 - t0)
                times.append(t2 - t0)
                cpu_times.append(c2 - c0)
    except (RuntimeError, MemoryError) as e:
        msg = str(e).splitlines()[0][:200]
        oom = isinstance(e, MemoryError) or 'alloc' in msg.lower()
        out.update(
            status='OOM' if oom else 'error', where=phase, message=msg, peak_mib=_peak_rss_mib(resettable) - base_mib
        )
        print(json.dumps(out))
        return
    out.update(
        status='ok',
        peak_mib=max(peaks),
        peak_method='VmHWM' if resettable else 'ru_maxrss',
        base_mib=base_mib,
        time_s=statistics.median(times),
        fwd_s=statistics.median(fwd_times),
        cpu_s=statistics.median(cpu_times),
        load1=os.getloadavg()[0],
        times=times,
        loss=loss_value,
        grad_w_norm=weight.grad.float().norm().item(),
        grad_h_norm=hidden.grad.float().norm().item(),
    )
    print(json.dumps(out))


# ---------------------------------------------------------------- driver
def run_one(args, method, n, chunk):
    opts = {
        '--method': method, '--n': n, '--chunk': chunk, '--dtype': args.dtype, '--repeats': args.repeats,
        '--warmup': args.warmup, '--seq-len': args.seq_len, '--temperature': args.temperature, '--vocab': args.vocab,
        '--hidden': args.hidden, '--threads': args.threads, '--mem-limit-gib': args.mem_limit_gib,
    }  # fmt: skip
    cmd = [sys.executable, os.path.abspath(__file__), '--worker'] + [x for k, v in opts.items() for x in (k, str(v))]
    cmd += ['--fp32-head'] if args.fp32_head else []
    env = dict(os.environ)
    env['PYTHONPATH'] = REPO + (os.pathsep + env['PYTHONPATH'] if env.get('PYTHONPATH') else '')
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith('{')]
    if p.returncode == 0 and lines:
        return json.loads(lines[-1])
    why = f'exit {p.returncode}' + (' (killed: likely out of memory)' if p.returncode < 0 else '')
    tail = (p.stderr.strip().splitlines() or [''])[-1][:200]
    return {'method': method, 'n': n, 'chunk': chunk, 'status': 'failed', 'where': why, 'message': tail}


def conditions(args):
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg() if hasattr(os, 'getloadavg') else ('?',)
    return [
        f'date: {time.strftime("%Y-%m-%d %H:%M:%S %Z")}',
        f'torch {torch.__version__}, threads {torch.get_num_threads()} (os.cpu_count {os.cpu_count()}), '
        f'python {platform.python_version()}',
        f'cpu: {_cpu_model()}',
        f'memory: MemTotal {_meminfo_kib("MemTotal") / 2**20:.1f} GiB, MemAvailable '
        f'{_meminfo_kib("MemAvailable") / 2**20:.1f} GiB at start; guard RLIMIT_AS ≈ {args.mem_limit_gib:.1f} GiB/run',
        f'load average at start: {", ".join(f"{x:.2f}" for x in load)}',
        f'V {args.vocab}, H {args.hidden}, dtype {args.dtype}, fp32_head {args.fp32_head}, temperature '
        f'{args.temperature}, bias none, CISPO eps_high {EPS_HIGH} (absolute cap)',
        f'swift layout: [B, T, V] with T = {args.seq_len} (B = tokens / T); chunked/fused: flat [N, H]',
        f'timing: median of {args.repeats} after {args.warmup} warm-up, forward + backward, each run in a fresh '
        'process; wall-clock (fwd s, total s) and process CPU time (cpu s, all threads); load = 1-min load average '
        'after the run',
        'memory: peak RSS of a repeat (VmHWM reset via /proc/self/clear_refs) minus RSS after creating the inputs, '
        'max over repeats; includes weight.grad',
    ]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--sizes', default='1024,4096,8192,16384', help='completion tokens per step, comma-separated')
    p.add_argument(
        '--chunk-size',
        default=None,
        help='chunk size(s) for chunked/fused, comma-separated (default: the module default)',
    )
    p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
    p.add_argument('--fp32-head', action='store_true', help='fp32 matmul in chunked/fused (bf16 inputs)')
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--methods', default='swift,chunked,fused')
    p.add_argument('--seq-len', type=int, default=1024, help="T of swift's [B, T, V] logits; must divide sizes")
    p.add_argument('--temperature', type=float, default=0.9, help='swift rlhf default 0.9')
    p.add_argument('--vocab', type=int, default=V_QWEN25)
    p.add_argument('--hidden', type=int, default=H_QWEN25_05B)
    p.add_argument('--threads', type=int, default=0, help='torch threads (0: torch default)')
    p.add_argument(
        '--mem-limit-gib',
        type=float,
        default=None,
        help='per-run address-space guard (default: MemAvailable at start - 1 GiB; 0 disables)',
    )
    p.add_argument('--json', default=None, help='also write all results to this file')
    # worker-only
    p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--method', help=argparse.SUPPRESS)
    p.add_argument('--n', type=int, help=argparse.SUPPRESS)
    p.add_argument('--chunk', type=int, default=1024, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    if args.mem_limit_gib is None:
        args.mem_limit_gib = max(_meminfo_kib('MemAvailable') / 2**20 - 1.0, 1.0)
    if args.chunk_size is None:
        sys.path.insert(0, REPO)
        from cispo_swift.fused import DEFAULT_CHUNK_SIZE

        args.chunk_size = str(DEFAULT_CHUNK_SIZE)
    sizes = [int(s) for s in args.sizes.split(',')]
    chunks = [int(c) for c in args.chunk_size.split(',')]
    methods = args.methods.split(',')
    for n in sizes:
        if n % args.seq_len and n > args.seq_len:
            sys.exit(f'--sizes {n} is not a multiple of --seq-len {args.seq_len}; pick sizes that are')
    print('\n'.join(conditions(args)), flush=True)

    results = []
    hdr = (
        f'{"tokens":>7} {"method":>8} {"chunk":>6} {"status":>7} {"peak MiB":>9} {"fwd s":>7} {"total s":>8} '
        f'{"cpu s":>7} {"load":>5} {"mem/swift":>9} {"time/swift":>10} {"cpu/swift":>9}  loss / |grad_W| / |grad_h|'
    )
    print('\n' + hdr + '\n' + '-' * len(hdr), flush=True)
    for n in sizes:
        seq_len = min(args.seq_len, n)
        a = argparse.Namespace(**{**vars(args), 'seq_len': seq_len})
        ref = None
        for m in methods:
            for c in chunks if m != 'swift' else [None]:
                r = run_one(a, m, n, c or 0)
                results.append(r)
                if m == 'swift':
                    ref = r if r['status'] == 'ok' else None
                print(fmt_row(r, ref), flush=True)
    print(summary(results))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'conditions': conditions(args), 'results': results}, f, indent=1)


def fmt_row(r, ref):
    c = '' if r.get('chunk') in (None, 0) else str(r['chunk'])
    if r['status'] != 'ok':
        peak = f'{r["peak_mib"]:9.0f}' if 'peak_mib' in r else f'{"":>9}'
        return f'{r["n"]:>7} {r["method"]:>8} {c:>6} {r["status"]:>7} {peak}  in {r["where"]}: {r["message"]}'
    mr = tr = cr = ''
    if ref is not None and r['method'] != 'swift':
        mr, tr = f'{r["peak_mib"] / ref["peak_mib"]:.3f}', f'{r["time_s"] / ref["time_s"]:.3f}'
        cr = f'{r["cpu_s"] / ref["cpu_s"]:.3f}'
    return (
        f'{r["n"]:>7} {r["method"]:>8} {c:>6} {r["status"]:>7} {r["peak_mib"]:9.0f} {r["fwd_s"]:7.2f} '
        f'{r["time_s"]:8.2f} {r["cpu_s"]:7.1f} {r["load1"]:5.1f} {mr:>9} {tr:>10} {cr:>9}  '
        f'{r["loss"]:.6g} / {r["grad_w_norm"]:.6g} / {r["grad_h_norm"]:.6g}'
    )


def summary(results):
    ok_swift = [r for r in results if r['method'] == 'swift' and r['status'] == 'ok']
    lines = ['']
    failed = [r for r in results if r['method'] == 'swift' and r['status'] != 'ok']
    for r in failed:
        lines.append(f'swift path did not fit at {r["n"]} tokens: {r["status"]} in {r["where"]} ({r["message"]})')
    if not ok_swift:
        return '\n'.join(lines + ['no swift run succeeded: no ratios'])
    n = max(r['n'] for r in ok_swift)
    ref = next(r for r in ok_swift if r['n'] == n)
    lines.append(
        f"largest size where swift's path fits: {n} tokens (peak {ref['peak_mib']:.0f} MiB, {ref['time_s']:.2f} s)"
    )
    for r in results:
        if r['n'] == n and r['method'] != 'swift' and r['status'] == 'ok':
            lines.append(
                f'  {r["method"]:>8} chunk {r["chunk"]:>5}: memory {r["peak_mib"] / ref["peak_mib"]:.3f}x, '
                f'time {r["time_s"] / ref["time_s"]:.3f}x, cpu time {r["cpu_s"] / ref["cpu_s"]:.3f}x of swift'
            )
    return '\n'.join(lines)


if __name__ == '__main__':
    main()
