"""CISPO at a longer horizon on SmolLM2-135M-Instruct: does it keep learning for 40 optimizer steps?

docs/cispo_horizon.md registers the settings (written before the runs) and reports the results. Two regimes, each
the one an earlier page measured, run for 40 optimizer steps with held-out greedy accuracy every 10:

    reuse  docs/cispo_stability.md's re-use regime (scripts/bench_cispo_stability.py): 4 prompts x 4 completions,
           each generation batch used for 4 optimizer steps; seeds 0-4
    demo   the SmolLM2 demo's own script (examples/smollm2_arith_cpu.sh): 2 prompts x 8, each batch used twice;
           seeds 42, 1, 2, 3, 4

and four arms in each (ARMS). Outcomes per run: accuracy at steps 0 (the base model, measured once), 10, 20, 30, 40;
its area under the curve (trapezoids over steps 0-40, divided by 40: the mean accuracy over the run); the final
accuracy; whether it ended below half the base. Per arm: median [min, max] and the exact two-sided Mann-Whitney test
of every arm against `cispo_kl`.

    PYTHONPATH=. python scripts/bench_cispo_horizon.py [--out runs/horizon] [--regimes reuse demo]
        [--arms cispo_kl cispo_kl_skip cispo_kl_dyn grpo] [--seeds-per-regime 5] [--parallel 2] [--summarize-only]

Finished runs (OUT/REGIME/ARM/seedN/run.json) are kept and skipped, so an interrupted benchmark continues where it
stopped. Jobs run seed by seed, so every arm gains seeds at the same rate.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_cispo_stability as stability  # noqa: E402  (the reuse regime's flags, data and held-out set)

from cispo_swift.demo import bench  # noqa: E402

ROOT = bench.ROOT

# ---- fixed before the runs (docs/cispo_horizon.md, "Settings") ----------------------------------------------------
MAX_STEPS = 40
EVAL_EVERY = 10
SEEDS = {'reuse': (0, 1, 2, 3, 4), 'demo': (42, 1, 2, 3, 4)}
KL_BUDGET = '0.1'
DYNAMIC = ['--dynamic_sample', 'true', '--max_resample_times', '3']  # swift's default number of resamples
# Arm: the loss (`cispo` through the plugin, `grpo` swift's own) and what it adds, as flags and CISPO_* variables.
ARMS: Dict[str, Dict] = {
    'cispo_kl': {'loss': 'cispo', 'flags': [], 'env': {'CISPO_KL_BUDGET': KL_BUDGET}},
    'cispo_kl_skip': {'loss': 'cispo', 'flags': [], 'env': {'CISPO_KL_BUDGET': KL_BUDGET, 'CISPO_SKIP_NO_SIGNAL': '1'}},
    'cispo_kl_dyn': {'loss': 'cispo', 'flags': DYNAMIC, 'env': {'CISPO_KL_BUDGET': KL_BUDGET}},
    'grpo': {'loss': 'grpo', 'flags': [], 'env': {}},
}
BASELINE = 'cispo_kl'
GRPO_FLAGS = ['--loss_type', 'grpo', '--epsilon', '0.2']
# The demo regime's cispo_kl runs are the five 40-step runs of docs/smollm2_recipe.md (the same script and seeds).
RECIPE_RUNS = ROOT / 'docs' / 'data' / 'smollm2_recipe' / 'reuse_kl'


def curve_summary(curve: Sequence[Sequence[float]], base: float, max_steps: int) -> Dict:
    """AUC (trapezoids over the evaluated steps, divided by the horizon), final accuracy, below half the base."""
    points = sorted((float(s), float(a)) for s, a in curve)
    area = sum((s1 - s0) * (a0 + a1) / 2 for (s0, a0), (s1, a1) in zip(points, points[1:]))
    complete = points[-1][0] == max_steps
    return {
        'accuracy_curve': [[int(s), a] for s, a in points],
        'auc': area / max_steps if complete else None,
        'accuracy_final': points[-1][1] if complete else None,
        'heldout_halved': points[-1][1] < base / 2 if complete else None,
    }


def heldout_curve(run_dir: Path, base: float) -> List[List[float]]:
    src = newest_version(run_dir)
    records = [json.loads(x) for x in (src / 'heldout.jsonl').read_text().splitlines() if x.strip()]
    return [[0, base]] + [[int(r['step']), float(r['greedy_acc'])] for r in records if int(r['step']) > 0]


def demo_command(arm: str, seed: int, max_steps: int) -> List[str]:
    spec = ARMS[arm]
    loss = GRPO_FLAGS if spec['loss'] == 'grpo' else []
    script = str(ROOT / 'examples' / 'smollm2_arith_cpu.sh')
    # The demo script samples dynamically since this comparison chose it; the other arms run as registered, without.
    static = [] if '--dynamic_sample' in spec['flags'] else ['--dynamic_sample', 'false']
    return ['bash', script, '--seed', str(seed), '--max_steps', str(max_steps), *loss, *static, *spec['flags']]


def demo_env(arm: str, model_dir: str, data: Path, run_dir: Path, eval_steps: str) -> Dict[str, str]:
    spec = ARMS[arm]
    env = {'MODEL_DIR': model_dir, 'DATA_DIR': str(data), 'OUTPUT_DIR': str(run_dir)}
    # The demo script sets CISPO_KL_BUDGET=0.1 unless told `none`: each arm says what it uses.
    env.update({'CISPOSWIFT_HELDOUT_STEPS': eval_steps, 'CISPO_KL_BUDGET': 'none'})
    env.update(spec['env'])
    if spec['loss'] == 'grpo':
        env['PLUGIN'] = 'none'  # swift's own loss, as a user without the plugin runs it
    return env


def reuse_flags(arm: str, seed: int, model_dir: str, train: str, run_dir: Path, max_steps: int) -> List[str]:
    spec = ARMS[arm]
    base_arm = 'grpo' if spec['loss'] == 'grpo' else 'cispo'
    # Later flags win in swift's parser: the arm's additions come last.
    return [*stability.swift_flags(base_arm, 'reuse', seed, model_dir, train, run_dir, max_steps), *spec['flags']]


def summarize(runs: Dict[str, Dict[str, List[Dict]]]) -> Dict:
    out: Dict = {}
    for regime, arms in runs.items():
        out[regime] = {}
        for arm, records in arms.items():
            ok = [r for r in records if 'failed' not in r and r.get('auc') is not None]
            by_step: Dict[int, List[float]] = {}
            for r in ok:
                for s, a in r['accuracy_curve']:
                    by_step.setdefault(int(s), []).append(a)
            out[regime][arm] = {
                'n': len(ok),
                'failed': len(records) - len(ok),
                'seeds': [r['seed'] for r in ok],
                'accuracy_by_step': {s: bench.median_range(v) for s, v in sorted(by_step.items())},
                'auc': bench.median_range([r['auc'] for r in ok]) if ok else None,
                'accuracy_final': bench.median_range([r['accuracy_final'] for r in ok]) if ok else None,
                'heldout_halved': sum(bool(r['heldout_halved']) for r in ok),
                'cpu_h': round(sum(r.get('cpu_s', 0) for r in ok) / 3600, 2),
            }
        tests = {}
        base_runs = [r for r in arms.get(BASELINE, []) if r.get('auc') is not None]
        for arm, records in arms.items():
            ok = [r for r in records if r.get('auc') is not None]
            if arm == BASELINE or not ok or not base_runs:
                continue
            tests[f'{arm} vs {BASELINE}'] = {
                key: bench.rank_test([r[key] for r in ok], [r[key] for r in base_runs])
                for key in ('auc', 'accuracy_final')
            }
        out[regime]['_tests'] = tests
    return out


def markdown(summary: Dict, base: float) -> str:
    lines = []
    for regime, arms in summary.items():
        steps = sorted({int(s) for a, v in arms.items() if a != '_tests' for s in v['accuracy_by_step']})
        lines += [f'**{regime}**', '']
        lines.append(
            '| arm | runs | ' + ' | '.join(f'step {s}' for s in steps) + ' | AUC | ended below half the base |'
        )
        lines.append('|---|---|' + '---|' * len(steps) + '---|---|')

        def cell(v):
            return '' if v is None else f'{v["median"]:.3f} [{v["min"]:.3f}, {v["max"]:.3f}]'

        for arm, v in arms.items():
            if arm == '_tests' or not v['n']:
                continue
            failed = f' (+{v["failed"]} failed)' if v['failed'] else ''
            cells = [cell(v['accuracy_by_step'].get(s)) for s in steps]
            lines.append(
                f'| {arm} | {v["n"]}{failed} | ' + ' | '.join(cells) + f' | {cell(v["auc"])} | '
                f'{v["heldout_halved"]}/{v["n"]} |'
            )
        if arms['_tests']:
            lines += ['', '| exact two-sided Mann-Whitney | AUC: U, p | final accuracy: U, p |', '|---|---|---|']
            for name, t in arms['_tests'].items():
                a, f = t['auc'], t['accuracy_final']
                lines.append(f'| {name} | {a["U"]:.1f}, {a["p"]:.3f} | {f["U"]:.1f}, {f["p"]:.3f} |')
        lines.append('')
    lines.append(f'Base model: {base:.3f}; half the base: {base / 2:.3f}.')
    return '\n'.join(lines)


SKIP_METRICS = {'budget': 'cispo/kl_budget_skipped', 'no signal': 'cispo/no_signal_skipped'}
RAW_LOGS = ('heldout.jsonl', 'logging.jsonl', 'cispo_config.json')


def newest_version(run_dir: Path) -> Path:
    """The run's newest swift output folder (OUT/vN-*), where its logs are; the run folder itself if it has none."""
    versions = sorted((d for d in run_dir.glob('v*-*') if d.is_dir()), key=os.path.getmtime)
    return versions[-1] if versions else run_dir


def skipped_steps(run_dir: Path) -> Dict[str, Optional[int]]:
    """Optimizer steps the budget and the no-signal skip passed over, counted from the run's logging.jsonl; None where
    the run logged no such metric (GRPO, or the skip off)."""
    from cispo_swift.demo.plot import load_log

    rows = load_log(str(run_dir))
    out: Dict[str, Optional[int]] = {}
    for name, key in SKIP_METRICS.items():
        values = [r[key] for r in rows if key in r]
        out[name] = round(sum(values)) if values else None
    return out


def per_run_markdown(runs: Dict[str, Dict[str, List[Dict]]]) -> str:
    head = '| regime | arm | seed | accuracy at steps 0, 10, 20, 30, 40 | AUC | steps skipped: budget / no signal |'
    lines = [head, '|---|---|---|---|---|---|']
    for regime, arms in runs.items():
        for arm, records in arms.items():
            for r in records:
                if 'failed' in r:
                    lines.append(f'| {regime} | {arm} | {r["seed"]} | failed: {r["failed"]} | | |')
                    continue
                points = [f'{a:.3f}' for _, a in r['accuracy_curve']]
                if r.get('heldout_halved'):
                    points[-1] = f'**{points[-1]}**'
                curve = ' '.join(points)
                skips = ' / '.join('–' if v is None else str(v) for v in r.get('skipped', {}).values())
                auc = '' if r.get('auc') is None else f'{r["auc"]:.3f}'
                lines.append(f'| {regime} | {arm} | {r["seed"]} | {curve} | {auc} | {skips} |')
    return '\n'.join(lines)


def export(runs: Dict[str, Dict[str, List[Dict]]], out: Path, dest: Path) -> None:
    """Copy the raw logs of every run measured here (not the reused recipe runs, which docs/data keeps already) and
    the summary into `dest` (docs/data/cispo_horizon): REGIME/ARM/seedN/{run.json, heldout.jsonl, logging.jsonl,
    cispo_config.json, trace.jsonl.gz}."""
    for regime, arms in runs.items():
        for arm, records in arms.items():
            for r in records:
                if r.get('from'):
                    continue
                src = Path(r['run_dir'])
                to = dest / regime / arm / f'seed{r["seed"]}'
                to.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src / bench.DONE_FILE, to / bench.DONE_FILE)
                logs = newest_version(src)
                for name in RAW_LOGS:
                    if (logs / name).is_file():
                        shutil.copy2(logs / name, to / name)
                if (src / 'trace.jsonl').is_file():
                    with open(src / 'trace.jsonl', 'rb') as f, gzip.open(to / 'trace.jsonl.gz', 'wb') as g:
                        shutil.copyfileobj(f, g)
    for name in ('results.json', 'results.md'):
        shutil.copy2(out / name, dest / name)


def plot(runs: Dict[str, Dict[str, List[Dict]]], base: float, out_png: Path) -> None:
    from matplotlib.figure import Figure

    regimes = list(runs)
    fig = Figure(figsize=(6.4 * len(regimes), 4.2), layout='constrained')
    axes = fig.subplots(1, len(regimes), squeeze=False)[0]
    for ax, regime in zip(axes, regimes):
        curves = {a: [r['accuracy_curve'] for r in rs if 'failed' not in r] for a, rs in runs[regime].items()}
        bench.plot_curves(ax, curves, ' seeds')
        ax.axhline(base / 2, color='gray', linestyle=':', linewidth=1, label='half the base')
        ax.set_xlabel('optimizer step')
        ax.set_ylabel('held-out greedy accuracy (128 problems)')
        ax.set_title(f'{regime}: {MAX_STEPS} steps')
        ax.legend(fontsize='small')
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--out', default=str(ROOT / 'runs' / 'horizon'))
    p.add_argument('--regimes', nargs='+', default=list(SEEDS), choices=list(SEEDS))
    p.add_argument('--arms', nargs='+', default=list(ARMS), choices=list(ARMS))
    p.add_argument('--seeds-per-regime', type=int, default=5)
    p.add_argument(
        '--seeds',
        type=int,
        nargs='+',
        help="these seeds in every chosen regime instead of SEEDS' (with --out elsewhere)",
    )
    p.add_argument('--max-steps', type=int, default=MAX_STEPS)
    p.add_argument('--parallel', type=int, default=2, help='runs at a time, one torch thread each')
    p.add_argument('--summarize-only', action='store_true', help='summarise the finished runs, start none')
    p.add_argument('--export', metavar='DIR', help='copy the raw logs and the summary there (docs/data/cispo_horizon)')
    a = p.parse_args(argv)
    os.environ.update(bench.OFFLINE_ENV)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    from cispo_swift.demo import arith, evaluate
    from cispo_swift.demo.smollm2 import ensure_smollm2

    model_dir = str(ensure_smollm2())
    reuse_data = arith.write(str(out / 'data_reuse'), stability.VARIANT, stability.N_TRAIN_ROWS, stability.DATA_SEED)
    demo_data = out / 'data_demo'
    if not (demo_data / 'heldout.jsonl').is_file():
        arith.write(str(demo_data))  # what `python -m cispo_swift.demo.arith --out DIR` writes for the demo
    heldout = Path(reuse_data['heldout'])
    base_path = out / 'base.json'
    if not base_path.is_file():
        base = evaluate.evaluate(model_dir, stability.VARIANT, stability.N_HELDOUT, stability.MAX_COMPLETION_LENGTH)
        base_path.write_text(json.dumps({'greedy_acc': base['greedy_acc']}))
    base_acc = json.loads(base_path.read_text())['greedy_acc']
    eval_steps = ','.join(str(s) for s in range(EVAL_EVERY, a.max_steps + 1, EVAL_EVERY))
    regime_seeds = {regime: tuple(a.seeds) if a.seeds else seeds for regime, seeds in SEEDS.items()}
    jobs = [
        {'regime': regime, 'arm': arm, 'seed': seeds[i], 'run_dir': str(out / regime / arm / f'seed{seeds[i]}')}
        for i in range(max(a.seeds_per_regime, len(a.seeds or ())))
        for regime, seeds in regime_seeds.items()
        if regime in a.regimes and i < len(seeds)
        for arm in a.arms
    ]

    def run_one(job: Dict) -> Dict:
        run_dir, arm, seed = Path(job['run_dir']), job['arm'], job['seed']
        for stale in ('heldout.jsonl', 'logging.jsonl', 'trace.jsonl'):
            (run_dir / stale).unlink(missing_ok=True)
        if job['regime'] == 'demo':
            env = demo_env(arm, model_dir, demo_data, run_dir, eval_steps)
            cost = bench.run_command(demo_command(arm, seed, a.max_steps), run_dir, env)
        else:
            env = dict(ARMS[arm]['env'], CISPOSWIFT_HELDOUT=str(heldout), CISPOSWIFT_HELDOUT_STEPS=eval_steps)
            env.update(CISPOSWIFT_HELDOUT_MAX_NEW_TOKENS=str(stability.MAX_COMPLETION_LENGTH))
            env.update(CISPOSWIFT_TRACE=str(run_dir / 'trace.jsonl'))
            flags = reuse_flags(arm, seed, model_dir, reuse_data['train'], run_dir, a.max_steps)
            cost = bench.run_swift(flags, run_dir, env)
        record = {**job, **curve_summary(heldout_curve(run_dir, base_acc), base_acc, a.max_steps), **cost}
        curve = ' '.join(f'{s}:{acc:.3f}' for s, acc in record['accuracy_curve'])
        print(f'{job["regime"]:>5} {arm:>13} seed {seed}: {curve}; AUC {record["auc"]}; '
              f'{cost["cpu_s"]:.0f} s CPU, {cost["wall_s"]:.0f} s wall', flush=True)  # fmt: skip
        return record

    def recipe_record(job: Dict) -> Optional[Dict]:
        """A demo-regime cispo_kl run already measured by docs/smollm2_recipe.md (seed 42 is re-run instead)."""
        src = RECIPE_RUNS / f'seed{job["seed"]}'
        if job['regime'] != 'demo' or job['arm'] != BASELINE or job['seed'] == 42 or not src.is_dir():
            return None
        cost = json.loads((src / 'run.json').read_text())
        curve = curve_summary(heldout_curve(src, base_acc), base_acc, a.max_steps)
        return {**job, **curve, 'cpu_s': cost.get('cpu_s'), 'wall_s': cost.get('wall_s'), 'from': str(src)}

    reused = {j['run_dir']: recipe_record(j) for j in jobs}
    todo = [j for j in jobs if reused[j['run_dir']] is None]
    if a.summarize_only:
        done = {j['run_dir']: bench.finished(Path(j['run_dir'])) for j in todo}
    else:
        done = dict(zip((j['run_dir'] for j in todo), bench.run_all(todo, run_one, a.parallel)))
    runs: Dict[str, Dict[str, List[Dict]]] = {}
    for job in jobs:
        record = reused[job['run_dir']] or done.get(job['run_dir'])
        if record is not None:
            record = {**record, **job}  # this checkout's run folder, not the one the run was measured in
            if 'failed' not in record:
                src = Path(record['from']) if record.get('from') else Path(job['run_dir'])
                record['skipped'] = skipped_steps(src)
            runs.setdefault(job['regime'], {}).setdefault(job['arm'], []).append(record)
    summary = summarize(runs)
    cpu_s = sum(r.get('cpu_s') or 0 for arms in runs.values() for rs in arms.values() for r in rs)
    results = {
        'conditions': {
            'versions': bench.versions(),
            'base_accuracy': base_acc,
            'max_steps': a.max_steps,
            'eval_every': EVAL_EVERY,
            'seeds': {regime: regime_seeds[regime] for regime in a.regimes},
            'arms': ARMS,
            'reuse_regime': ' '.join(stability.REGIMES['reuse']),
            'demo_regime': 'examples/smollm2_arith_cpu.sh',
        },
        'runs': runs,
        'summary': summary,
        'cpu_h_runs': round(cpu_s / 3600, 2),
    }
    (out / 'results.json').write_text(json.dumps(bench.finite_json(results), indent=1))
    table = markdown(summary, base_acc) + '\n\nPer run:\n\n' + per_run_markdown(runs)
    (out / 'results.md').write_text(table + '\n')
    if runs:
        plot(runs, base_acc, out / 'horizon.png')
    if a.export:
        export(runs, out, Path(a.export).resolve())
    print('\n' + table)
    print(f'CPU {results["cpu_h_runs"]} h in finished runs; wrote {out / "results.json"}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
