"""Helpers for the end-to-end tests: the tiny CPU model and data, `swift rlhf` runs (1 or more processes), logs."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import cispo_swift

PACKAGE_DIR = Path(cispo_swift.__file__).resolve().parent
PLUGIN = str(PACKAGE_DIR / 'plugin.py')
ROW_SAMPLING_PLUGIN = str(Path(__file__).resolve().parent / 'row_sampling_plugin.py')
SWIFT = str(Path(sys.executable).parent / 'swift')
PREBUILT_TINY = Path('/tmp/tiny')  # until cispo_swift.tiny is on this branch

# Small and off-policy (num_iterations 2: every other step reuses a generation batch, so r ≠ 1). Full tuning:
# no LoRA dropout, and the whole model is compared. --use_cpu true: the only way transformers runs data
# parallel on a machine without GPUs (and it keeps single-process runs on the CPU too).
BASE_FLAGS = [
    '--rlhf_type', 'grpo',
    '--model_type', 'qwen2',
    '--template', 'qwen',
    '--torch_dtype', 'float32',
    '--tuner_type', 'full',
    '--reward_funcs', 'cispo_tiny_letter',
    '--loss_type', 'cispo',
    '--epsilon_high', '5.0',
    '--num_generations', '4',
    '--max_completion_length', '8',
    '--max_length', '128',
    '--num_iterations', '2',
    '--learning_rate', '1e-3',
    '--logging_steps', '1',
    '--report_to', 'none',
    '--check_model', 'false',
    '--add_version', 'false',
    '--dataloader_num_workers', '0',
    '--seed', '42',
    '--use_cpu', 'true',
]  # fmt: skip


def tiny_model_dir(tmp_path_factory) -> Dict[str, str]:
    """The tiny model and the `letter` task: {'model': dir, 'train': jsonl, 'tasks_plugin': reward plugin file}."""
    out = tmp_path_factory.mktemp('tiny')
    try:
        from cispo_swift.tiny import build
    except ImportError:
        if not (PREBUILT_TINY / 'model').is_dir():
            raise RuntimeError(
                f'cispo_swift.tiny is not available and {PREBUILT_TINY} holds no prebuilt model: nothing to test on.'
            ) from None
        shutil.copytree(PREBUILT_TINY, out, dirs_exist_ok=True)
        return {
            'model': str(out / 'model'),
            'train': str(out / 'data' / 'train.jsonl'),
            'tasks_plugin': str(out / 'tasks_plugin.py'),
        }
    import cispo_swift.tasks

    return {**build(str(out)), 'tasks_plugin': cispo_swift.tasks.__file__}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run_swift(
    tiny: Dict[str, str],
    output_dir: Path,
    *flags: str,
    nproc: int = 1,
    extra_plugins: Sequence[str] = (),
    env: Optional[Dict[str, str]] = None,
    timeout: int = 600,
) -> subprocess.CompletedProcess:
    """`swift rlhf` with BASE_FLAGS, the tiny model and data, then `flags`; `nproc` > 1 launches data parallel."""
    plugins = [tiny['tasks_plugin'], PLUGIN, *extra_plugins]
    cmd = [SWIFT, 'rlhf', *BASE_FLAGS, '--model', tiny['model'], '--dataset', tiny['train']]
    cmd += ['--output_dir', str(output_dir), '--external_plugins', *plugins, *flags]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith('CISPO_')}
    full_env.update(MODELSCOPE_OFFLINE='1', HF_HUB_OFFLINE='1', TOKENIZERS_PARALLELISM='false')
    if nproc > 1:
        # A free port: torchrun's default 29500 may be taken by another job on the machine.
        full_env.update(NPROC_PER_NODE=str(nproc), MASTER_PORT=str(_free_port()))
    full_env.update(env or {})
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)


# After training, swift never destroys its process group; in 1 of 16 two-process CPU runs here a rank then
# aborted at interpreter exit (SIGABRT, this message) with every output already written.
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


def logged_steps(output_dir: Path) -> List[dict]:
    """The per-step rows of swift's logging.jsonl (those with a `loss`)."""
    rows = [json.loads(line) for line in (Path(output_dir) / 'logging.jsonl').read_text().splitlines() if line]
    return [r for r in rows if 'loss' in r]
