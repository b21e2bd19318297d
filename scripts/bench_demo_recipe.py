"""The SmolLM2 demo's recipe, measured: candidate settings of `examples/smollm2_arith_cpu.sh`, several seeds each.

docs/smollm2_recipe.md reports it. Every run is the demo's own script (`examples/smollm2_arith_cpu.sh`, CISPO
through the plugin, full tuning) with a candidate's extra flags and environment, so what is measured is what
`bash scripts/demo.sh smollm2` runs. Held-out greedy accuracy on the 128 held-out problems of `add20` after every
EVAL_EVERY optimizer steps; step 0 is the base model (0.406), measured once, not per run.

    PYTHONPATH=. python scripts/bench_demo_recipe.py [--out runs/recipe] [--candidates reuse_kl fresh_kl]
        [--seeds 42 1 2] [--parallel 2] [--summarize-only]

Finished runs (OUT/CANDIDATE/seedN/run.json) are kept and skipped, so an interrupted benchmark continues where it
stopped; OUT/results.json holds every finished run.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Dict, List

from cispo_swift.demo import bench

ROOT = bench.ROOT
BASE_ACCURACY = 0.40625  # the base model's greedy accuracy on the 128 held-out problems (docs/smollm2.md)
MAX_STEPS = 40
EVAL_EVERY = 10
GAIN = 0.10  # the demo's target: held-out greedy accuracy at least base + 0.10
DEMO_STEPS = (10, 20)  # the demo's steadier measure: the mean of its last two evaluations (20 steps, chosen after)

# ---- fixed before the runs (docs/smollm2_recipe.md, "Settings") ---------------------------------------------------
# Common to all: the demo script's flags (2e-5 constant, T 0.7, 16 new tokens, 8 completions per prompt, full tuning
# in float32, one torch thread, no dynamic sampling: the script's later default, docs/cispo_horizon.md, is turned off),
# MAX_STEPS optimizer steps of 16 completions each.
CANDIDATES: Dict[str, Dict] = {
    # The demo as it was (2 prompts x 8, each batch used twice) with the KL budget of docs/cispo_stability.md.
    'reuse_kl': {'flags': [], 'env': {'CISPO_KL_BUDGET': '0.1'}},
    # Fresh completions for every optimizer step: a generation batch of 4 prompts x 8 split into two minibatches of
    # 16, each used once (MiniMax-M1's regime; the second is one step off-policy), with the same KL budget.
    'fresh_kl': {
        'flags': ['--num_iterations', '1', '--steps_per_generation', '2'],
        'env': {'CISPO_KL_BUDGET': '0.1'},
    },
}


def summarize_run(run_dir: Path) -> Dict:
    records = [json.loads(x) for x in (run_dir / 'heldout.jsonl').read_text().splitlines() if x.strip()]
    curve = [[0, BASE_ACCURACY]] + [[int(r['step']), float(r['greedy_acc'])] for r in records]
    last2 = [a for _, a in curve[-2:]]
    return {
        'accuracy_curve': curve,
        'accuracy_final': curve[-1][1],
        'accuracy_last2': sum(last2) / len(last2),
        'gain_final': curve[-1][1] - BASE_ACCURACY,
        'reached_gain_at': [s for s, a in curve if s > 0 and a >= BASE_ACCURACY + GAIN - 1e-12],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--out', default=str(ROOT / 'runs' / 'recipe'))
    p.add_argument('--candidates', nargs='+', default=list(CANDIDATES), choices=list(CANDIDATES))
    p.add_argument('--seeds', nargs='+', type=int, default=[42, 1, 2])
    p.add_argument('--max-steps', type=int, default=MAX_STEPS)
    p.add_argument('--parallel', type=int, default=2)
    p.add_argument('--summarize-only', action='store_true')
    a = p.parse_args(argv)
    out = Path(a.out)
    data = out / 'data'
    if not (data / 'heldout.jsonl').is_file():
        from cispo_swift.demo.arith import write

        write(str(data))
    from cispo_swift.demo.smollm2 import ensure_smollm2

    model_dir = ensure_smollm2()
    eval_steps = ','.join(str(s) for s in range(EVAL_EVERY, a.max_steps + 1, EVAL_EVERY))
    jobs = [{'candidate': c, 'seed': s, 'run_dir': str(out / c / f'seed{s}')} for c in a.candidates for s in a.seeds]

    def run_one(job: Dict) -> Dict:
        run_dir = Path(job['run_dir'])
        (run_dir / 'heldout.jsonl').unlink(missing_ok=True)
        cand = CANDIDATES[job['candidate']]
        env = dict(cand['env'], MODEL_DIR=str(model_dir), DATA_DIR=str(data), OUTPUT_DIR=str(run_dir),
                   CISPOSWIFT_HELDOUT_STEPS=eval_steps)  # fmt: skip
        cmd = ['bash', str(ROOT / 'examples' / 'smollm2_arith_cpu.sh'), '--seed', str(job['seed']),
               '--max_steps', str(a.max_steps), '--dynamic_sample', 'false', *cand['flags']]  # fmt: skip
        cost = bench.run_command(cmd, run_dir, env)
        record = {**job, **summarize_run(_newest_version(run_dir)), **cost}
        curve = ' '.join(f'{s}:{acc:.3f}' for s, acc in record['accuracy_curve'])
        print(f'{job["candidate"]:>9} seed {job["seed"]}: {curve}; {cost["cpu_s"]:.0f} s CPU, '
              f'{cost["wall_s"]:.0f} s wall', flush=True)  # fmt: skip
        return record

    if a.summarize_only:
        records = [r for r in (bench.finished(Path(j['run_dir'])) for j in jobs) if r is not None]
    else:
        records = bench.run_all(jobs, run_one, a.parallel)
    summary = summarize(records)
    (out / 'results.json').write_text(json.dumps(bench.finite_json({'runs': records, 'summary': summary}), indent=1))
    for cand, s in summary.items():
        print(cand, json.dumps(s))
    return 0


def _newest_version(run_dir: Path) -> Path:
    versions = sorted((d for d in run_dir.iterdir() if d.is_dir() and d.name.startswith('v')), key=os.path.getmtime)
    return versions[-1] if versions else run_dir


def _mean_at(record: Dict, steps) -> float:
    values = [a for t, a in record['accuracy_curve'] if t in steps]
    return sum(values) / len(values) if len(values) == len(steps) else float('nan')


def summarize(records: List[Dict]) -> Dict:
    by: Dict[str, List[Dict]] = {}
    for r in records:
        if 'failed' not in r:
            by.setdefault(r['candidate'], []).append(r)
    out = {}
    for cand, runs in by.items():
        steps = sorted({s for r in runs for s, _ in r['accuracy_curve']})
        out[cand] = {
            'runs': len(runs),
            'by_step': {
                s: bench.median_range([a for r in runs for t, a in r['accuracy_curve'] if t == s]) for s in steps
            },
            'final_gain_ge_target': sum(r['gain_final'] >= GAIN - 1e-12 for r in runs),
            'last2_gain_ge_target': sum(r['accuracy_last2'] - BASE_ACCURACY >= GAIN - 1e-12 for r in runs),
            'reached_target_by_step': {
                s: sum(a >= BASE_ACCURACY + GAIN - 1e-12 for r in runs for t, a in r['accuracy_curve'] if t == s)
                for s in steps
            },
            'demo_measure': {str(r['seed']): _mean_at(r, DEMO_STEPS) for r in runs},
        }
    return out


if __name__ == '__main__':
    raise SystemExit(main())
