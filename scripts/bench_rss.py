"""Peak memory of a whole `swift rlhf` process: swift's built-in cispo vs the plugin with CISPO_FUSED_LOGPS=1.

A benchmark, not a test: it prints figures. The tiny Qwen2 model (2 layers, hidden 64) gets Qwen2.5's vocabulary
size, 151,936 rows (padded: the extra ids decode to nothing, so completions run to the length limit and the
reward is meaningless — this measures memory only). Each configuration runs in its own process, one after the
other, with the same seed and data; its peak RSS is the operating system's high-water mark of that process
(`getrusage(RUSAGE_CHILDREN).ru_maxrss`, read by a wrapper process around each run).

    .venv/bin/python scripts/bench_rss.py [--lengths 1024 2048] [--batch 2] [--out runs/bench_rss]
    .venv/bin/python scripts/bench_rss.py --zero3 --lengths 1024 --batch 4 [--nproc 2]

`--zero3`: DeepSpeed ZeRO-3 on CPU, `--nproc` processes (gloo), `--batch` completions per rank; both arms go
through the plugin (it initialises DeepSpeed's distributed state on CPU; swift alone cannot run ZeRO-3 there), with
`CISPO_FUSED_LOGPS` 0 (swift's log-prob path) and 1. Each rank reports its own peak RSS
(scripts/rss_report_plugin.py); the table gives the largest rank's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WRAPPER = (
    'import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; '
    'print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "RC", rc)'
)


def run(label, tiny, length, batch, out, fused, nproc=0):
    import cispo_swift

    package = Path(cispo_swift.__file__).resolve().parent
    plugins = [str(package / 'demo' / 'reward_plugin.py')] + ([str(package / 'plugin.py')] if fused or nproc else [])
    rss_dir = out / f'{label}-{length}-rss'
    if nproc:
        plugins.append(str(ROOT / 'scripts' / 'rss_report_plugin.py'))
        rss_dir.mkdir(parents=True, exist_ok=True)
    swift = str(Path(sys.executable).parent / 'swift')
    cmd = [
        swift, 'rlhf', '--rlhf_type', 'grpo', '--model', tiny['model'], '--model_type', 'qwen2', '--template', 'qwen',
        '--torch_dtype', 'float32', '--tuner_type', 'full', '--dataset', tiny['train'],
        '--external_plugins', *plugins, '--reward_funcs', 'cispo_tiny_letter', '--loss_type', 'cispo',
        '--epsilon_high', '5.0', '--beta', '0', '--num_generations', str(batch),
        '--per_device_train_batch_size', str(batch), '--max_completion_length', str(length),
        '--max_length', str(length + 64), '--max_steps', '1', '--num_iterations', '1', '--logging_steps', '1',
        '--save_strategy', 'no', '--report_to', 'none', '--check_model', 'false', '--add_version', 'false',
        '--dataloader_num_workers', '0', '--seed', '0', '--output_dir', str(out / f'{label}-{length}'),
    ]  # fmt: skip
    if nproc:
        cmd += ['--deepspeed', 'zero3', '--use_cpu', 'true', '--fp16', 'false', '--callbacks', 'rss_report']
    env = {k: v for k, v in os.environ.items() if not k.startswith('CISPO_')}
    env.update(MODELSCOPE_OFFLINE='1', HF_HUB_OFFLINE='1', TOKENIZERS_PARALLELISM='false')
    if fused:
        env['CISPO_FUSED_LOGPS'] = '1'
    if nproc:
        env.update(NPROC_PER_NODE=str(nproc), OMP_NUM_THREADS='1', BENCH_RSS_DIR=str(rss_dir))
    start = time.perf_counter()
    result = subprocess.run([sys.executable, '-c', WRAPPER, *cmd], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    line = [x for x in result.stdout.splitlines() if x.startswith('PEAK_RSS_KB')][-1].split()
    ok = line[3] == '0'
    if not ok:
        sys.stderr.write(result.stderr[-3000:])
    record = {'label': label, 'length': length, 'peak_rss_gib': int(line[1]) / 2**20, 'ok': ok, 'seconds': seconds}
    if nproc:  # per rank, from the ranks themselves (the wrapper's figure is only the largest process's)
        ranks = [json.loads(p.read_text()) for p in sorted(rss_dir.glob('rank*.json'))]
        record['ranks_gib'] = [r['peak_rss_kib'] / 2**20 for r in ranks]
        record['ok'] = ok = ok and len(ranks) == nproc
        record['peak_rss_gib'] = max(record['ranks_gib'], default=float('nan'))
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--lengths', type=int, nargs='+', default=[1024, 2048])
    parser.add_argument('--batch', type=int, default=2, help='completions per step (= num_generations)')
    parser.add_argument('--out', default=str(ROOT / 'runs' / 'bench_rss'))
    parser.add_argument('--zero3', action='store_true', help='DeepSpeed ZeRO-3 on CPU, --nproc processes')
    parser.add_argument('--nproc', type=int, default=2)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import torch

    from cispo_swift.demo.tiny import TinyConfig, build

    tiny = build(str(out / 'tiny'), TinyConfig(vocab_size=151936), n_rows=64)
    print(
        f'conditions: torch {torch.__version__}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), '
        f'threads {torch.get_num_threads()}; tiny Qwen2 (2 layers, hidden 64) with vocab 151,936, fp32, full '
        f'tuning; {args.batch} completions of each length per step, 1 step; peak RSS of the swift process'
        + (f'; DeepSpeed ZeRO-3, {args.nproc} processes, {args.batch} completions per rank; "swift" = the plugin '
           "with CISPO_FUSED_LOGPS=0 (swift's log-prob path)" if args.zero3 else '')
    )  # fmt: skip
    rows = []
    for length in args.lengths:
        for label, fused in (('swift', False), ('fused', True)):
            rows.append(run(label, tiny, length, args.batch, out, fused, nproc=args.nproc if args.zero3 else 0))
            r = rows[-1]
            print(
                f'  {label:5s} {length:6d} tokens x {args.batch}: peak RSS {r["peak_rss_gib"]:.2f} GiB, '
                f'{r["seconds"]:.0f} s{"" if r["ok"] else " (FAILED)"}'
                + (f'; per rank {", ".join(f"{g:.2f}" for g in r["ranks_gib"])} GiB' if 'ranks_gib' in r else ''),
                flush=True,
            )
    print('\n| completion tokens per step | swift peak RSS (GiB) | fused peak RSS (GiB) | ratio |')
    print('|---|---|---|---|')
    for length in args.lengths:
        s, f = (next(r for r in rows if r['length'] == length and r['label'] == k) for k in ('swift', 'fused'))
        ratio = f['peak_rss_gib'] / s['peak_rss_gib'] if s['ok'] and f['ok'] else float('nan')
        print(f'| {length * args.batch} | {s["peak_rss_gib"]:.2f} | {f["peak_rss_gib"]:.2f} | {ratio:.2f} |')
    (out / 'results.json').write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
