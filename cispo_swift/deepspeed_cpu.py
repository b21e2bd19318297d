"""DeepSpeed on CPU through the stock CLI: what `swift rlhf --deepspeed ... --use_cpu true` needs and does not do.

Two gaps of ms-swift 4.6.0 / transformers 5.19 / DeepSpeed 0.19.8 on a machine without GPUs, both handled while
swift parses its arguments (the plugin file calls `check`, then `prepare`), before any model loads:

- **Distributed state.** With `--use_cpu true`, transformers' `TrainingArguments._setup_devices` takes its CPU
  branch and never calls `deepspeed.init_distributed`, so `deepspeed.zero.Init` (ZeRO-3 model loading) sees world
  size 1 and stops: "train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size 8 !=
  4 * 1 * 1". `prepare` initialises DeepSpeed's communication with gloo first; accelerate then finds
  torch.distributed initialised and uses that process group. In one process started without torchrun (no RANK,
  WORLD_SIZE), DeepSpeed would look for MPI (`mpi4py`) instead: `prepare` describes the single process to it.
- **fp16.** swift turns `--fp16` on for float32 (and float16) models when neither `--fp16` nor `--bf16` is given
  (`ModelArguments._init_mixed_precision`), and DeepSpeed's engine rejects fp16 on a CPU without fp16 kernels
  ("Type fp16 is not supported on your device.") only after the model has loaded. `check_fp16` refuses it first.
"""

from __future__ import annotations

import json
import os
from typing import Optional


def check(args) -> None:
    """For a `--deepspeed` run on DeepSpeed's CPU accelerator, refuse fp16 where DeepSpeed would (ValueError)."""
    if _on_cpu(args):
        check_fp16(args, _accelerator().is_fp16_supported())


def prepare(args) -> None:
    """For a `--deepspeed --use_cpu true` run on DeepSpeed's CPU accelerator, initialise DeepSpeed's distributed
    state with gloo. Does nothing without `--deepspeed` or on a GPU."""
    if _on_cpu(args) and getattr(args, 'use_cpu', False):
        init_distributed()


def _on_cpu(args) -> bool:
    if args is None or not getattr(args, 'deepspeed', None):
        return False
    return _accelerator().device_name() == 'cpu'


def check_fp16(args, fp16_supported: bool) -> None:
    if fp16_supported or not resolves_to_fp16(args):
        return
    how = '--fp16 true' if getattr(args, 'fp16', None) else f'--torch_dtype {_dtype_name(args) or "float32"}'
    raise ValueError(
        f'--deepspeed on the CPU with fp16 mixed precision (from {how}): DeepSpeed rejects fp16 on this CPU ("Type '
        'fp16 is not supported on your device"), but only after the model has loaded. Add --fp16 false (float32 '
        'training; swift turns fp16 on for float32 models unless told otherwise), or use --torch_dtype bfloat16.'
    )


def resolves_to_fp16(args) -> bool:
    """Whether swift will train with fp16 mixed precision: `--fp16 true`, or neither `--fp16` nor `--bf16` given
    and the model's dtype float16 or float32 (mirrors ms-swift 4.6.0 `ModelArguments._init_mixed_precision`).
    A model dtype that cannot be read without loading (a hub id without `--torch_dtype`) counts as not fp16."""
    fp16 = getattr(args, 'fp16', None)
    if fp16 is not None:
        return bool(fp16)
    if getattr(args, 'bf16', None):
        return False
    return _dtype_name(args) in ('float16', 'float32')


def _dtype_name(args) -> Optional[str]:
    dtype = getattr(args, 'torch_dtype', None)
    if dtype is None:
        dtype = _config_dtype(getattr(args, 'model', None))
    if dtype is None:
        return None
    name = str(dtype).replace('torch.', '')
    return {'fp16': 'float16', 'half': 'float16', 'fp32': 'float32', 'float': 'float32', 'bf16': 'bfloat16'}.get(
        name, name
    )


def _config_dtype(model: Optional[str]) -> Optional[str]:
    path = os.path.join(model, 'config.json') if isinstance(model, str) else None
    if path is None or not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    return config.get('dtype') or config.get('torch_dtype')


def init_distributed() -> None:
    """DeepSpeed's communication backend on gloo: in a process launched by torchrun (RANK/WORLD_SIZE set), or in a
    single process, which is then described as rank 0 of 1 on a free local port (as torchrun would set it)."""
    if 'RANK' not in os.environ or 'WORLD_SIZE' not in os.environ:
        if 'RANK' in os.environ or 'WORLD_SIZE' in os.environ:
            return  # half a launch description: leave it to the launcher's own error
        os.environ.update(RANK='0', LOCAL_RANK='0', WORLD_SIZE='1', LOCAL_WORLD_SIZE='1')
        os.environ.setdefault('MASTER_ADDR', '127.0.0.1')
        os.environ.setdefault('MASTER_PORT', str(_free_port()))
    import deepspeed

    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend='gloo', auto_mpi_discovery=False)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _accelerator():
    from deepspeed.accelerator import get_accelerator

    return get_accelerator()
