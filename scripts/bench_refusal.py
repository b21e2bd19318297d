#!/usr/bin/env python
"""How long `swift rlhf` takes to refuse a typo: swift's own unknown flag against a misspelt CISPO_* variable and a
bad --epsilon_high, which the plugin file refuses while swift parses its arguments.

Each case runs the stock CLI on the tiny model (nothing is trained), --repeats times, the cases alternating; prints
the median wall time from the start of `swift rlhf` to its exit, the exit status and the message's first line.

    python scripts/bench_refusal.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = {
    "swift's unknown flag (--epsilon_hihg 5)": (['--epsilon_hihg', '5'], {}),
    'CISPO_CLIPMODE=absolute (misspelt variable)': ([], {'CISPO_CLIPMODE': 'absolute'}),
    '--epsilon_high nan': (['--epsilon_high', 'nan'], {}),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--repeats', type=int, default=3)
    a = p.parse_args(argv)
    from cispo_swift.demo.tiny import build

    tmp = Path(tempfile.mkdtemp(prefix='bench_refusal_'))
    paths = build(str(tmp / 'tiny'))
    flags = [
        '--rlhf_type', 'grpo', '--model', paths['model'], '--model_type', 'qwen2', '--template', 'qwen',
        '--dataset', paths['train'], '--reward_funcs', 'cispo_tiny_letter', '--loss_type', 'cispo',
        '--external_plugins', str(ROOT / 'cispo_swift' / 'plugin.py'),
        str(ROOT / 'cispo_swift' / 'demo' / 'reward_plugin.py'), '--output_dir', str(tmp / 'out'),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith('CISPO_')}
    env.update(MODELSCOPE_OFFLINE='1', HF_HUB_OFFLINE='1', PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES='')
    swift = str(Path(sys.executable).parent / 'swift')
    times = {name: [] for name in CASES}
    outcome = {}
    for _ in range(a.repeats):
        for name, (extra, extra_env) in CASES.items():
            t0 = time.perf_counter()
            proc = subprocess.run(
                [swift, 'rlhf', *flags, *extra], env={**env, **extra_env}, capture_output=True, text=True
            )
            times[name].append(time.perf_counter() - t0)
            lines = [
                ln for ln in (proc.stdout + proc.stderr).splitlines() if 'remaining_argv' in ln or 'cispo-swift' in ln
            ]
            outcome[name] = (proc.returncode, lines[-1][:100] if lines else '(no message found)')
    print(f'{"case":<46} {"median s":>8}  runs (s)          exit  message')
    for name in CASES:
        runs = ', '.join(f'{t:.1f}' for t in times[name])
        print(
            f'{name:<46} {statistics.median(times[name]):8.1f}  {runs:<16}  {outcome[name][0]:>4}  {outcome[name][1]}'
        )


if __name__ == '__main__':
    main()
