"""Diagnose CISPO runs from their per-token traces (scripts/cispo_trace_plugin.py) and logs: which tokens' ratios grow,
how much of the gradient the capped tokens carry, and what the drift metrics did before a collapse.

    PYTHONPATH=. python scripts/cispo_diagnose.py RESULTS_DIR [--out docs/cispo_stability_diagnosis.json]
        [--png docs/cispo_stability_traces.png]

RESULTS_DIR is the --out of scripts/bench_cispo_stability.py. For every CISPO run with a trace it computes, per
optimizer step, over the tokens in the loss: r = π_θ/π_old, the share of tokens with r > CAP, and the share of the
gradient they carry. A token's gradient w.r.t. its logits is (w·Â/N)·(onehot − p) with w = min(r, CAP), whose norm
lies between |w·Â|(1 − p_y)/N and √2 of that (p_y: the sampled token's probability); the share uses |w·Â|(1 − p_y),
so it is the share of the logit-space gradient up to that factor. Tokens with r > GROW (2) are broken down by the
sign of their advantage, their probability under π_old and their position in the completion.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

CAP = 5.0
DEGRADED = 0.10
GROW = 2.0
P_OLD_BINS = ((0.0, 0.1), (0.1, 0.5), (0.5, 1.01))
POSITION_BINS = ((0, 4), (4, 8), (8, 1 << 30))


def _tokens(record: Dict):
    """(ratio, advantage, p_old, p_now, position, token id) of every token in the loss of one micro-batch."""
    for adv, mask, ids, logp, anchor in zip(
        record['advantages'], record['mask'], record['ids'], record['logp'], record['anchor']
    ):
        pos = 0
        for m, tid, lp, la in zip(mask, ids, logp, anchor):
            if m:
                yield math.exp(min(lp - la, 700.0)), adv, math.exp(la), math.exp(lp), pos, tid
                pos += 1


def step_stats(record: Dict) -> Dict:
    n = capped = 0
    grad_all = grad_capped = grad_ppo_dropped = 0.0
    grow = {'pos_adv': 0, 'neg_adv': 0, 'zero_adv': 0}
    grow_p_old = [0] * len(P_OLD_BINS)
    grow_position = [0] * len(POSITION_BINS)
    kl = 0.0
    for r, adv, p_old, p_now, pos, _ in _tokens(record):
        n += 1
        kl += (r - 1.0) - math.log(r) if r > 0 else math.inf
        w = min(r, CAP)
        g = abs(w * adv) * (1.0 - p_now)
        grad_all += g
        if r > CAP:
            capped += 1
            grad_capped += g
        if (adv > 0 and r > 1.2) or (adv < 0 and r < 0.8):  # the tokens PPO with ε 0.2 gives zero gradient
            grad_ppo_dropped += g
        if r > GROW:
            grow['pos_adv' if adv > 0 else 'neg_adv' if adv < 0 else 'zero_adv'] += 1
            grow_p_old[next(i for i, (lo, hi) in enumerate(P_OLD_BINS) if lo <= p_old < hi)] += 1
            grow_position[next(i for i, (lo, hi) in enumerate(POSITION_BINS) if lo <= pos < hi)] += 1
    return {
        'step': record['global_step'],
        'tokens': n,
        'approx_kl': kl / n if n else 0.0,
        'capped_frac': capped / n if n else 0.0,
        'grad_share_capped': grad_capped / grad_all if grad_all else 0.0,
        'grad_share_ppo_dropped': grad_ppo_dropped / grad_all if grad_all else 0.0,
        'grow': grow,
        'grow_p_old': grow_p_old,
        'grow_position': grow_position,
    }


def top_tokens(records: Sequence[Dict], tokenizer, k: int = 12) -> List[Dict]:
    """The k tokens with the largest ratios over a run's trace, decoded."""
    found = []
    for rec in records:
        for r, adv, p_old, _, pos, tid in _tokens(rec):
            found.append((r, rec['global_step'], adv, p_old, pos, tid))
    found.sort(reverse=True)
    out = []
    for r, step, adv, p_old, pos, tid in found[:k]:
        text = tokenizer.decode([tid]) if tokenizer is not None else str(tid)
        out.append({'ratio': r, 'step': step, 'advantage': adv, 'p_old': p_old, 'position': pos, 'token': text})
    return out


def analyse_run(run_dir: Path, tokenizer) -> Optional[Dict]:
    trace = next((p for p in (run_dir / 'trace.jsonl', run_dir / 'trace.jsonl.gz') if p.is_file()), None)
    record_file = run_dir / 'run.json'
    if trace is None or not record_file.is_file():
        return None
    text = gzip.decompress(trace.read_bytes()).decode() if trace.suffix == '.gz' else trace.read_text()
    records = [json.loads(x) for x in text.splitlines() if x.strip()]
    run = json.loads(record_file.read_text())
    if 'failed' in run:
        return None
    steps = [step_stats(r) for r in records]
    reward = dict((int(s), v) for s, v in run['reward_curve'])
    first_zero = next((s for s, v in sorted(reward.items()) if v == 0.0 and run['collapsed']), None)
    base, final = run['accuracy_curve'][0][1], run['accuracy_curve'][-1][1]
    return {
        'run': str(run_dir),
        # Post-hoc label (the pre-registered "collapsed" fires on one all-wrong batch of 16 and so on most runs):
        # the run ended with held-out accuracy more than DEGRADED below the base model's.
        'degraded': final < base - DEGRADED,
        'collapsed': run['collapsed'],
        'accuracy_curve': run['accuracy_curve'],
        'reward_curve': run['reward_curve'],
        'first_zero_reward_step': first_zero,
        'steps': steps,
        'top_tokens': top_tokens(records, tokenizer),
        'metrics': run['metrics'],
    }


def early_warning(runs: Sequence[Dict], key: str, upto: int) -> Dict:
    """The largest logged value of `key` within the first `upto` steps, degraded runs against the others, and
    whether a threshold separates them (every degraded run above every other)."""
    collapsed, healthy = [], []
    for r in runs:
        series = [v for s, v in r['metrics'].get(key, []) if s <= upto and math.isfinite(v)]
        if series:
            (collapsed if r['degraded'] else healthy).append(max(series))
    separates = bool(collapsed and healthy and min(collapsed) > max(healthy))
    return {
        'key': key,
        'upto_step': upto,
        'degraded': sorted(collapsed),
        'healthy': sorted(healthy),
        'separates': separates,
        'threshold': (min(collapsed) + max(healthy)) / 2 if separates else None,
    }


def plot(analyses: Dict[str, List[Dict]], png: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13.5, 7.6), layout='constrained')
    axes = fig.subplots(2, 3)
    for col, key, label in (
        (0, 'cispo/approx_kl', 'cispo/approx_kl (logged)'),
        (1, 'cispo/ratio_max', 'cispo/ratio_max (logged)'),
    ):
        ax = axes[0][col]
        for regime, runs in analyses.items():
            for r in runs:
                xs, ys = zip(*r['metrics'].get(key, [[0, math.nan]]))
                style = '-' if regime == 'reuse' else '--'
                ax.plot(xs, ys, style, color='C3' if r['degraded'] else 'C0', alpha=0.6, linewidth=1)
        ax.set_yscale('log')
        ax.set_title(f'{label}: red: ended > 0.1 below base; solid reuse, dashed minibatch', fontsize='small')
        ax.set_xlabel('optimizer step')
    ax = axes[0][2]
    for regime, runs in analyses.items():
        for r in runs:
            xs = [s['step'] for s in r['steps']]
            style = '-' if regime == 'reuse' else '--'
            ax.plot(xs, [s['grad_share_capped'] for s in r['steps']], style, color='C3' if r['degraded'] else 'C0',
                    alpha=0.6, linewidth=1)  # fmt: skip
    ax.set_title('share of the gradient on capped tokens (r > 5)', fontsize='small')
    ax.set_xlabel('optimizer step')
    reuse = analyses.get('reuse', [])
    ax = axes[1][0]
    for r in reuse:
        xs, ys = zip(*r['reward_curve'])
        ax.plot(xs, ys, color='C3' if r['degraded'] else 'C0', alpha=0.6)
    ax.set_title('reuse: training reward', fontsize='small')
    ax.set_xlabel('optimizer step')
    ax = axes[1][1]
    totals = {'pos_adv': 0, 'neg_adv': 0, 'zero_adv': 0}
    p_old = [0] * len(P_OLD_BINS)
    position = [0] * len(POSITION_BINS)
    for r in reuse:
        if r['degraded']:
            for s in r['steps']:
                for k, v in s['grow'].items():
                    totals[k] += v
                p_old = [a + b for a, b in zip(p_old, s['grow_p_old'])]
                position = [a + b for a, b in zip(position, s['grow_position'])]
    labels = ['Â>0', 'Â<0', 'Â=0'] + [f'p_old {lo:g}-{min(hi, 1):g}' for lo, hi in P_OLD_BINS]
    labels += [f'pos {lo}-{hi - 1 if hi < 1 << 20 else "end"}' for lo, hi in POSITION_BINS]
    values = list(totals.values()) + p_old + position
    ax.barh(range(len(values)), values, color=['C1'] * 3 + ['C2'] * 3 + ['C4'] * 3)
    ax.set_yticks(range(len(values)), labels, fontsize='small')
    ax.set_title(f'reuse, degraded runs: tokens with r > {GROW:g}', fontsize='small')
    ax = axes[1][2]
    for r in reuse:
        xs = [s['step'] for s in r['steps']]
        ax.plot(xs, [s['grad_share_ppo_dropped'] for s in r['steps']], color='C3' if r['degraded'] else 'C0',
                alpha=0.6)  # fmt: skip
    ax.set_title('reuse: gradient share on tokens PPO (ε 0.2) would drop', fontsize='small')
    ax.set_xlabel('optimizer step')
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=95)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('results_dir')
    p.add_argument('--arm', default='cispo')
    p.add_argument('--out', default=None)
    p.add_argument('--png', default=None)
    p.add_argument('--warn-upto', type=int, default=8, help='early-warning window: steps from the start')
    a = p.parse_args(argv)
    from transformers import AutoTokenizer

    from cispo_swift.demo.smollm2 import ensure_smollm2

    tokenizer = AutoTokenizer.from_pretrained(str(ensure_smollm2()))
    root = Path(a.results_dir) / 'runs'
    analyses: Dict[str, List[Dict]] = {}
    for regime_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        arm_dir = regime_dir / a.arm
        if not arm_dir.is_dir():
            continue
        for run_dir in sorted(arm_dir.iterdir()):
            result = analyse_run(run_dir, tokenizer)
            if result is not None:
                analyses.setdefault(regime_dir.name, []).append(result)
    everything = [r for runs in analyses.values() for r in runs]
    warnings = [early_warning(everything, k, a.warn_upto) for k in ('cispo/approx_kl', 'cispo/ratio_max')]
    out = {'arm': a.arm, 'runs': analyses, 'early_warning': warnings}
    for regime, runs in analyses.items():
        for r in runs:
            steps = r['steps']
            print(
                f'{regime:>9} {Path(r["run"]).name}: degraded={r["degraded"]} collapsed={r["collapsed"]}; '
                f'max approx_kl {max(s["approx_kl"] for s in steps):.4f}; '
                f'max capped share {max(s["capped_frac"] for s in steps):.4f}; max gradient share on capped '
                f'{max(s["grad_share_capped"] for s in steps):.3f}'
            )
    for w in warnings:
        print(f'early warning {w["key"]} (first {w["upto_step"]} steps): degraded {w["degraded"]}, healthy '
              f'{w["healthy"]}, separates: {w["separates"]}')  # fmt: skip
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))
    if a.png:
        plot(analyses, Path(a.png))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
