"""docs/bad_inputs.md from runs through the CLI: what a user sees for each bad input, and how long it took.

    PYTHONPATH=. python scripts/bad_inputs_doc.py [--out docs/bad_inputs.md] [--only LABEL ...]

Each case is a real command on the tiny CPU model: `swift rlhf` (2 steps, `--external_plugins` the cispo-swift plugin
file) or `python -m cispo_swift ...`. Recorded: the exit status, whether the model was loaded before the command
ended (swift logs "model_parameter_info" once it has), the wall time, and the lines the command printed about the
input (cispo-swift's refusal or warning, or swift's own error). `CASES` also holds what each case should do;
tests/test_validation.py checks that the document agrees with it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / 'docs' / 'bad_inputs.md'
PLUGIN = str(ROOT / 'cispo_swift' / 'plugin.py')
TASKS = str(ROOT / 'cispo_swift' / 'demo' / 'reward_plugin.py')
NONFINITE = str(ROOT / 'tests' / 'nonfinite_reward_plugin.py')
MODEL_LOADED = 'model_parameter_info'

# (label, env, swift rlhf flags or ['python', '-m'/'-c', ...], expected: refused | refused-torchrun | raises | warning |
# ok | stops | swift-refuses)
# 'refused': cispo-swift refuses at argument parsing, exit 2, before the model loads; 'refused-torchrun': the same
# under torchrun, whose summary follows with exit 1; 'raises': the Python API raises at the call; 'stops': the run
# starts and stops with an error naming the step; 'swift-refuses': swift itself refuses first (not the plugin).
Case = Tuple[str, Dict[str, str], List[str], str]
API = 'import cispo_swift; cispo_swift.configure'  # `python -c` cases: the Python API, flags formatted as the rest
CASES: List[Case] = [
    ('--epsilon_high nan', {}, ['--epsilon_high', 'nan'], 'refused'),
    ('--epsilon_high 0', {}, ['--epsilon_high', '0'], 'refused'),
    ('--epsilon_high -1', {}, ['--epsilon_high', '-1'], 'refused'),
    ('--epsilon_high 0.28', {}, ['--epsilon_high', '0.28'], 'refused'),
    ('--epsilon_high inf', {}, ['--epsilon_high', 'inf'], 'warning'),
    ('--epsilon_high 1e309', {}, ['--epsilon_high', '1e309'], 'warning'),
    ('--epsilon nan', {}, ['--epsilon', 'nan'], 'refused'),
    ('--epsilon -1', {}, ['--epsilon', '-1'], 'refused'),
    ('--beta nan', {}, ['--beta', 'nan'], 'refused'),
    ('--beta inf', {}, ['--beta', 'inf'], 'refused'),
    ('--beta -1', {}, ['--beta', '-1'], 'refused'),
    ('--temperature 0', {}, ['--temperature', '0'], 'refused'),
    ('--temperature -1', {}, ['--temperature', '-1'], 'refused'),
    ('--temperature inf', {}, ['--temperature', 'inf'], 'refused'),
    ('--top_entropy_quantile 2', {}, ['--top_entropy_quantile', '2'], 'refused'),
    ('--num_iterations 0', {}, ['--num_iterations', '0'], 'refused'),
    ('--delta 3', {}, ['--delta', '3'], 'warning'),
    ('--loss_type cispoo', {}, ['--loss_type', 'cispoo'], 'refused'),
    ('--loss_type CISPO', {}, ['--loss_type', 'CISPO'], 'refused'),
    ('--loss_type grpo with CISPO_NORM=prompt', {'CISPO_NORM': 'prompt'}, ['--loss_type', 'grpo'], 'warning'),
    ('--importance_sampling_level seq', {}, ['--importance_sampling_level', 'seq'], 'swift-refuses'),
    ('--use_liger_kernel true', {}, ['--use_liger_kernel', 'true'], 'refused'),
    ('--resume_from_checkpoint MISSING', {}, ['--resume_from_checkpoint', '/nonexistent/checkpoint-4'],
     'swift-refuses'),
    ('--resume_from_checkpoint RUN_DIR (not a checkpoint)', {}, ['--resume_from_checkpoint', '{run_dir}'], 'refused'),
    ('resume with CISPO_NORM changed', {'CISPO_NORM': 'sequence'}, ['--resume_from_checkpoint', '{checkpoint}'],
     'refused'),
    ('resume, cispo_config.json damaged', {}, ['--resume_from_checkpoint', '{damaged}'], 'refused'),
    ('CISPO_CLIPMODE=absolute', {'CISPO_CLIPMODE': 'absolute'}, [], 'refused'),
    ('cispo_norm=prompt (lower-case name)', {'cispo_norm': 'prompt'}, [], 'refused'),
    ('CISPO_NORM=tokens', {'CISPO_NORM': 'tokens'}, [], 'refused'),
    ('CISPO_NORM= (empty)', {'CISPO_NORM': ''}, [], 'refused'),
    ('CISPO_CHECK_FINITE= (empty)', {'CISPO_CHECK_FINITE': ''}, [], 'refused'),
    ('CISPO_MASK=maybe', {'CISPO_MASK': 'maybe'}, [], 'refused'),
    ('CISPO_MASK_EPS_HIGH=nan', {'CISPO_MASK': '1', 'CISPO_MASK_EPS_HIGH': 'nan'}, [], 'refused'),
    ('CISPO_MASK_EPS_LOW=-0.1', {'CISPO_MASK': '1', 'CISPO_MASK_EPS_LOW': '-0.1'}, [], 'refused'),
    ('CISPO_MASK_EPS_HIGH=0.28 without CISPO_MASK=1', {'CISPO_MASK_EPS_HIGH': '0.28'}, [], 'warning'),
    ('CISPO_EPS_LOW=0.2 (absolute mode)', {'CISPO_EPS_LOW': '0.2'}, [], 'warning'),
    ('CISPO_EPS_LOW=1.5', {'CISPO_CLIP_MODE': 'relative', 'CISPO_EPS_LOW': '1.5'}, [], 'refused'),
    ('CISPO_FUSED_CHUNK_SIZE=0', {'CISPO_FUSED_LOGPS': '1', 'CISPO_FUSED_CHUNK_SIZE': '0'}, [], 'refused'),
    ('CISPO_FUSED_CHUNK_SIZE=1_0', {'CISPO_FUSED_LOGPS': '1', 'CISPO_FUSED_CHUNK_SIZE': '1_0'}, [], 'refused'),
    ('CISPO_FUSED_CHUNK_SIZE=256 without CISPO_FUSED_LOGPS=1', {'CISPO_FUSED_CHUNK_SIZE': '256'}, [], 'warning'),
    ('CISPO_KL_BUDGET=0', {'CISPO_KL_BUDGET': '0'}, [], 'refused'),
    ('CISPO_KL_BUDGET=0.1 with --num_iterations 1', {'CISPO_KL_BUDGET': '0.1'}, ['--num_iterations', '1'], 'warning'),
    ('CISPO_ANCHOR=rollout without vLLM', {'CISPO_ANCHOR': 'rollout'}, [], 'refused'),
    ('CISPO_ALLOW_CONFIG_CHANGE=1 without a resume', {'CISPO_ALLOW_CONFIG_CHANGE': '1'}, [], 'warning'),
    ('a reward function returning inf', {}, ['--reward_funcs', 'cispo_test_inf_reward'], 'stops'),
    ('a reward function returning NaN', {}, ['--reward_funcs', 'cispo_test_nan_reward'], 'ok'),
    ('plot -o EXISTING_DIR', {}, ['python', '-m', 'cispo_swift', 'plot', '{run_dir}', '-o', '{run_dir}'], 'refused'),
    ('plot --smooth 0', {}, ['python', '-m', 'cispo_swift', 'plot', '{run_dir}', '-o', '{png}', '--smooth', '0'],
     'refused'),
    ('summary BINARY_FILE', {}, ['python', '-m', 'cispo_swift', 'summary', '{binary}'], 'refused'),
    ('model smollm2 --out UNDER_A_FILE', {}, ['python', '-m', 'cispo_swift', 'model', 'smollm2', '--out',
                                            '{binary}/model'], 'refused'),
    ('CISPO_MASK=1 on-policy (--num_iterations 1)', {'CISPO_MASK': '1'}, ['--num_iterations', '1'], 'warning'),
    ('CISPO_MASK=1 with both mask eps inf', {'CISPO_MASK': '1', 'CISPO_MASK_EPS_LOW': 'inf',
                                             'CISPO_MASK_EPS_HIGH': 'inf'}, [], 'warning'),
    ('CISPO_MASK_EPS_HIGH=1e-400', {'CISPO_MASK': '1', 'CISPO_MASK_EPS_HIGH': '1e-400'}, [], 'refused'),
    ('CISPO_KL_BUDGET=1e-400', {'CISPO_KL_BUDGET': '1e-400'}, [], 'refused'),
    ('--top_entropy_quantile 0', {}, ['--top_entropy_quantile', '0'], 'refused'),
    ('--resume_from_checkpoint FILE', {}, ['--resume_from_checkpoint', '{checkpoint}/trainer_state.json'], 'refused'),
    ('resume with only CISPO_CHECK_FINITE changed', {'CISPO_CHECK_FINITE': '0'},
     ['--resume_from_checkpoint', '{checkpoint}'], 'ok'),
    ('CISPO_ANCHOR=rollout --use_vllm true without vLLM', {'CISPO_ANCHOR': 'rollout'},
     ['--use_vllm', 'true', '--vllm_mode', 'colocate'], 'refused'),
    ('--deepspeed zero3 --use_cpu true in one process', {}, ['--deepspeed', 'zero3', '--use_cpu', 'true', '--fp16',
                                                             'false'], 'ok'),
    ('NPROC_PER_NODE=2 without GPUs and without --use_cpu', {'NPROC_PER_NODE': '2', 'CUDA_VISIBLE_DEVICES': ''}, [],
     'refused-torchrun'),
    ('configure(mask=\'maybe\')', {}, ['python', '-c', API + "(mask='maybe')"], 'raises'),
    ('configure(fused_chunk_size=1.5)', {}, ['python', '-c', API + '(fused_chunk_size=1.5)'], 'raises'),
    ('configure({\'norm\': \'prompt\'})', {}, ['python', '-c', API + "({{'norm': 'prompt'}})"], 'raises'),
    ('evaluate --n 0', {}, ['python', '-m', 'cispo_swift.demo.evaluate', '{model}', '--n', '0'], 'refused'),
    ('evaluate --temperature -1', {}, ['python', '-m', 'cispo_swift.demo.evaluate', '{model}', '--samples', '2',
                                      '--temperature', '-1'], 'refused'),
    ('evaluate --max-new-tokens 0', {}, ['python', '-m', 'cispo_swift.demo.evaluate', '{model}', '--max-new-tokens',
                                        '0'], 'refused'),
    ('evaluate MISSING_DIR', {}, ['python', '-m', 'cispo_swift.demo.evaluate', '{model}/missing'], 'refused'),
    ('evaluate --json nodir/x.json', {}, ['python', '-m', 'cispo_swift.demo.evaluate', '{model}', '--json',
                                         'nodir/x.json'], 'refused'),
    ('summary trainer_state.json', {}, ['python', '-m', 'cispo_swift', 'summary', '{checkpoint}/trainer_state.json'],
     'refused'),
]  # fmt: skip

BASE = [
    '--rlhf_type', 'grpo', '--model_type', 'qwen2', '--template', 'qwen', '--torch_dtype', 'float32',
    '--reward_funcs', 'cispo_tiny_letter', '--loss_type', 'cispo', '--epsilon_high', '5.0', '--num_generations', '4',
    '--per_device_train_batch_size', '4', '--max_completion_length', '8', '--max_length', '128',
    '--num_iterations', '2', '--learning_rate', '1e-3', '--max_steps', '2', '--logging_steps', '1',
    '--save_strategy', 'no', '--report_to', 'none', '--check_model', 'false', '--add_version', 'false',
    '--dataloader_num_workers', '0', '--seed', '42', '--tuner_type', 'full',
]  # fmt: skip


def _env(extra: Dict[str, str]) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith('CISPO_')}
    env.update(MODELSCOPE_OFFLINE='1', HF_HUB_OFFLINE='1', TOKENIZERS_PARALLELISM='false', OMP_NUM_THREADS='1')
    env['PYTHONPATH'] = str(ROOT) + os.pathsep + env.get('PYTHONPATH', '')
    env.update(extra)
    return env


def swift_command(tiny: Dict[str, str], out: Path, flags: Sequence[str]) -> List[str]:
    swift = str(Path(sys.executable).parent / 'swift')
    return [swift, 'rlhf', *BASE, '--model', tiny['model'], '--dataset', tiny['train'], '--output_dir', str(out),
            '--external_plugins', TASKS, PLUGIN, NONFINITE, *flags]  # fmt: skip


def prepare(work: Path) -> Dict[str, str]:
    """The tiny model, a finished run with a checkpoint, a damaged copy of it, and a binary file."""
    from cispo_swift.demo.tiny import build

    tiny = build(str(work / 'tiny'))
    run_dir = work / 'trained'
    if not (run_dir / 'checkpoint-2' / 'cispo_config.json').is_file():
        cmd = swift_command(tiny, run_dir, ['--save_strategy', 'steps', '--save_steps', '2'])
        subprocess.run(cmd, env=_env({}), capture_output=True, text=True, check=True)
    damaged = work / 'damaged' / 'checkpoint-2'
    if damaged.exists():
        shutil.rmtree(damaged.parent)
    shutil.copytree(run_dir / 'checkpoint-2', damaged)
    (damaged / 'cispo_config.json').write_text('{\n  "norm": "token",\n')
    binary = work / 'binary.jsonl'
    binary.write_bytes(bytes(range(256)))
    return {**tiny, 'run_dir': str(run_dir), 'checkpoint': str(run_dir / 'checkpoint-2'), 'damaged': str(damaged),
            'binary': str(binary), 'png': str(work / 'curves.png')}  # fmt: skip


def _messages(output: str) -> str:
    """The lines a user reads about the input: cispo-swift's and the error's, without progress bars."""
    keep: List[str] = []
    in_refusal = False
    for line in output.splitlines():
        text = re.sub(r'^\[(INFO|WARNING|ERROR):swift\] ', '', line.strip())
        if in_refusal and line.startswith('  '):
            keep.append(text)
            continue
        in_refusal = text.startswith('cispo-swift: refusing')
        if 'cispo-swift: CISPO loss active' in text or 'Successfully registered' in text:
            continue
        if text.startswith('cispo-swift:') or re.match(r'^(\w+Error|error:|python -m cispo_swift|\S+: error:)', text):
            keep.append(text)
    return ' '.join(dict.fromkeys(keep))[:900]


def run_case(case: Case, paths: Dict[str, str], work: Path) -> Dict:
    label, env, flags, expected = case
    flags = [f.format(**paths) for f in flags]
    out = work / 'runs' / re.sub(r'\W+', '_', label)[:60]
    if out.exists():
        shutil.rmtree(out)
    if flags[:1] == ['python']:
        cmd = [sys.executable, *flags[1:]]
    else:
        cmd = swift_command(paths, out, flags)
    env = dict(env)
    if 'NPROC_PER_NODE' in env:
        env.setdefault('MASTER_PORT', str(_free_port()))  # torchrun's default 29500 may be taken
    t0 = time.time()
    proc = subprocess.run(cmd, env=_env(env), capture_output=True, text=True, timeout=900, cwd=work)
    seconds = time.time() - t0
    output = proc.stdout + proc.stderr
    loaded = MODEL_LOADED in output
    ours = 'cispo-swift: refusing to start' in output or 'python -m cispo_swift' in output or flags[:1] == ['python']
    if proc.returncode == 2 and not loaded and ours:
        outcome = 'refused'
    elif (
        proc.returncode == 1
        and not loaded
        and 'cispo-swift: refusing to start' in output
        and 'ChildFailedError' in output
    ):
        outcome = 'refused-torchrun'
    elif (
        flags[:2] == ['python', '-c'] and proc.returncode == 1 and re.search(r'^(ValueError|TypeError): ', output, re.M)
    ):
        outcome = 'raises'
    elif proc.returncode == 0:
        outcome = 'warning' if re.search(r'\[WARNING:swift\] cispo-swift: ', output) else 'ok'
    elif 'FloatingPointError' in output and loaded:
        outcome = 'stops'
    else:
        outcome = 'swift-refuses' if not loaded else f'fails (exit {proc.returncode})'
    return {'label': label, 'outcome': outcome, 'expected': expected, 'exit': proc.returncode,
            'model_loaded': loaded, 'seconds': round(seconds, 1), 'message': _messages(output)}  # fmt: skip


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def read_doc(path: Path) -> Tuple[List[Dict], str]:
    """The rows and the machine note of a document written by `render`, to add rows to it (`--merge`)."""
    text = path.read_text()
    note = text.split('(for refusals, the time to refusal). ', 1)[1].split('\n\n', 1)[0] if text else ''
    expected = {c[0]: c[3] for c in CASES}
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r'(?<!\\)\|', line.strip())[1:-1]]
        if len(cells) == 6 and cells[0].startswith('`'):
            label = cells[0].strip('`')
            rows.append({'label': label, 'outcome': cells[1], 'expected': expected.get(label, cells[1]),
                         'exit': int(cells[2]), 'model_loaded': cells[3] == 'yes', 'seconds': float(cells[4]),
                         'message': cells[5].replace('\\|', '|')})  # fmt: skip
    return rows, note


def render(results: Sequence[Dict], machine_note: str) -> str:
    rows = ['| input | outcome | exit | model loaded | time (s) | what the user reads |', '|---|---|---|---|---|---|']
    for r in results:
        message = r['message'].replace('|', '\\|')
        rows.append(f'| `{r["label"]}` | {r["outcome"]} | {r["exit"]} | {"yes" if r["model_loaded"] else "no"} | '
                    f'{r["seconds"]:.1f} | {message} |')  # fmt: skip
    return (
        '# Bad inputs and what cispo-swift does with them\n\n'
        'Every row is a real command on the tiny CPU model (`swift rlhf`, 2 steps, or `python -m cispo_swift ...`), '
        'generated by `scripts/bad_inputs_doc.py`; the message column is what the command printed about the input. '
        'Outcomes: **refused**: cispo-swift stops while swift parses its arguments, with exit status 2, before any '
        'model loads (**refused-torchrun**: the same under torchrun, which loads the plugin in its workers and then '
        'prints its ChildFailedError summary and exits with 1; **raises**: the Python API raises at the call); '
        '**warning**: logged, the run goes on; **ok**: a valid setting, trained; **stops**: the run '
        'stops at the first step the value reaches, naming the step and the cause; **swift-refuses**: swift itself '
        'refuses before the plugin is imported. Time: wall seconds from the command to its end (for refusals, the '
        f'time to refusal). {machine_note}\n\n'
        'NaN from a reward function is not an error: swift sums rewards with `nansum`, its meaning of "this reward '
        'does not apply to this completion", so a NaN reward counts as 0 in the sum (swift 4.6.0 semantics, kept). '
        'An inf reward makes the advantages non-finite, which `CISPO_CHECK_FINITE=1` (the default) stops.\n\n'
        + '\n'.join(rows)
        + '\n'
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--out', default=str(DOC))
    p.add_argument('--work', default=None, help='working directory (default: a temporary one)')
    p.add_argument('--note', default='', help='a line about the machine and its load, printed in the document')
    p.add_argument('--only', nargs='+', default=None, help='run the cases whose label contains one of these (no doc)')
    p.add_argument('--merge', action='store_true', help='with --only: update or add those rows of WORK/results.json, '
                   'or of the document at --out when WORK has none (its note kept, --note added)')  # fmt: skip
    a = p.parse_args(argv)
    work = Path(a.work or tempfile.mkdtemp(prefix='cispo_bad_inputs_'))
    work.mkdir(parents=True, exist_ok=True)
    paths = prepare(work)
    results = []
    cases = [c for c in CASES if a.only is None or any(o in c[0] for o in a.only)]
    for case in cases:
        r = run_case(case, paths, work)
        flag = '' if r['outcome'] == r['expected'] else f'   <-- expected {r["expected"]}'
        print(f'{r["label"]:<60} {r["outcome"]:<14} exit {r["exit"]:<3} {r["seconds"]:6.1f} s{flag}', flush=True)
        results.append(r)
    note = a.note
    if a.merge:
        if (work / 'results.json').is_file():
            old = json.loads((work / 'results.json').read_text())
        else:
            old, old_note = read_doc(Path(a.out))
            note = f'{old_note} {a.note}'.strip()
        new = {r['label']: r for r in results}
        known = {r['label'] for r in old}
        results = [new.get(r['label'], r) for r in old] + [r for r in results if r['label'] not in known]
        order = {c[0]: i for i, c in enumerate(CASES)}
        results.sort(key=lambda r: order.get(r['label'], len(order)))
    if a.only is None or a.merge:
        Path(a.out).write_text(render(results, note))
        (work / 'results.json').write_text(json.dumps(results, indent=1))
    wrong = [r['label'] for r in results if r['outcome'] != r['expected']]
    print(f'{len(results) - len(wrong)} of {len(results)} as expected' + (f'; not: {wrong}' if wrong else ''))
    return 1 if wrong else 0


if __name__ == '__main__':
    raise SystemExit(main())
