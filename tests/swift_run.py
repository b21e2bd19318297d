"""Run the stock `swift rlhf` CLI on the tiny CPU model, with or without the plugin, and read its logs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import cispo_swift

PACKAGE_DIR = Path(cispo_swift.__file__).resolve().parent
PLUGIN = str(PACKAGE_DIR / 'plugin.py')
TASKS = str(PACKAGE_DIR / 'demo' / 'reward_plugin.py')
SWIFT = str(Path(sys.executable).parent / 'swift')
ROW_SAMPLING_PLUGIN = str(Path(__file__).resolve().parent / 'row_sampling_plugin.py')

# Small, fast and off-policy enough (num_iterations 2) that the importance ratio is not identically 1.
BASE_FLAGS = [
    '--rlhf_type', 'grpo',
    '--model_type', 'qwen2',
    '--template', 'qwen',
    '--torch_dtype', 'float32',
    '--reward_funcs', 'cispo_tiny_letter',
    '--loss_type', 'cispo',
    '--epsilon_high', '5.0',
    '--num_generations', '4',
    '--per_device_train_batch_size', '4',
    '--max_completion_length', '8',
    '--max_length', '128',
    '--num_iterations', '2',
    '--learning_rate', '1e-3',
    '--max_steps', '4',
    '--logging_steps', '1',
    '--save_strategy', 'no',
    '--report_to', 'none',
    '--check_model', 'false',
    '--add_version', 'false',
    '--dataloader_num_workers', '0',
    '--seed', '42',
]  # fmt: skip


# Data-parallel comparisons: full tuning (no LoRA dropout; the whole model is compared) and --use_cpu true, the
# only way transformers runs data parallel without GPUs (it keeps single-process runs on the CPU too).
SCALE_FLAGS = ('--tuner_type', 'full', '--use_cpu', 'true')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run_swift(
    tiny: Dict[str, str],
    output_dir: Path,
    *flags: str,
    plugin: bool = True,
    nproc: int = 1,
    extra_plugins: Sequence[str] = (),
    env: Optional[Dict[str, str]] = None,
    timeout: int = 600,
) -> subprocess.CompletedProcess:
    """`swift rlhf` with BASE_FLAGS, the tiny model and data, then `flags` (later flags win in swift's parser);
    `nproc` > 1 launches data parallel; `plugin=False` runs swift's built-in loss."""
    plugins = [TASKS, PLUGIN, *extra_plugins] if plugin else [TASKS, *extra_plugins]
    cmd = [SWIFT, 'rlhf', *BASE_FLAGS, '--model', tiny['model'], '--dataset', tiny['train']]
    cmd += ['--output_dir', str(output_dir), '--external_plugins', *plugins, *flags]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith('CISPO_')}
    full_env.update(MODELSCOPE_OFFLINE='1', HF_HUB_OFFLINE='1', TOKENIZERS_PARALLELISM='false', OMP_NUM_THREADS='1')
    if nproc > 1:
        # A free port: torchrun's default 29500 may be taken by another job on the machine.
        full_env.update(NPROC_PER_NODE=str(nproc), MASTER_PORT=str(_free_port()))
    full_env.update(env or {})
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)


def logged_steps(output_dir: Path) -> List[dict]:
    """The per-step rows of swift's logging.jsonl (those with a `loss`)."""
    path = output_dir / 'logging.jsonl'
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if 'loss' in r]


# After training, swift never destroys its process group; in 1 of 16 two-process CPU runs a rank then aborted at
# interpreter exit (SIGABRT, this message) with every output already written.
EXIT_ABORT = 'terminate called without an active exception'


def check_ok(result: subprocess.CompletedProcess, exit_abort_ok: bool = False) -> None:
    """The run succeeded; with `exit_abort_ok`, a rank aborting at exit after swift's last line counts as success
    (callers then check the logged steps themselves)."""
    output = result.stdout + result.stderr
    if exit_abort_ok and EXIT_ABORT in output and 'End time of running main' in output:
        return
    if result.returncode != 0:
        raise AssertionError(
            f'swift rlhf failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}'
        )
