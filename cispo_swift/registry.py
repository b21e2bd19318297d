"""What a plugin file does when swift imports it: check the run's settings, then register the trainer.

swift imports `--external_plugins` files while it parses its arguments (`BaseArguments._import_external_plugins`,
ms-swift 4.6.0), after it has read the flags and before it loads any model. `load_plugin` runs the CISPO checks
there, on swift's own parsed arguments, so a bad setting stops the run within seconds, with one short message
and no traceback; the trainer runs the same checks again at start for users of the Python API.
"""

from __future__ import annotations

import os
import sys

from cispo_swift.compat import check_swift_version

TRAINER_PATH = 'cispo_swift.trainer.CISPOGRPOTrainer'


def detach_plugin_dir(plugin_file: str) -> None:
    """Undo swift's `sys.path.insert(0, dirname(plugin_file))` (swift/utils/utils.py::import_external_file, 4.6.0).

    Left there, the package's module names (config, loss, trainer, plot...) would shadow top-level modules of the
    same name for the rest of the run.
    """
    here = os.path.dirname(os.path.abspath(plugin_file))
    while here in sys.path:
        sys.path.remove(here)


def register() -> None:
    """Make `swift rlhf --rlhf_type grpo` build `CISPOGRPOTrainer` (it resolves this dotted path lazily).

    Refuses (`UnsupportedSwiftVersion`) on an ms-swift outside `compat.SUPPORTED_SWIFT`, before touching swift:
    the plugin file calls this at import, so `swift rlhf --external_plugins` stops at argument parsing.
    """
    check_swift_version()
    from swift.trainers import TrainerFactory

    TrainerFactory.TRAINER_MAPPING['grpo'] = TRAINER_PATH


def load_plugin() -> None:
    """Validate the arguments swift is parsing and the CISPO_* options, then register the trainer.

    A refusal prints what, why and how to fix, and exits with status 2 before any model loads.
    """
    from cispo_swift import deepspeed_cpu, megatron

    args = swift_args_being_parsed()
    try:
        validate_parsed_args(args)
    except (ValueError, TypeError) as error:
        if os.environ.get('RANK', '0') == '0':  # one message for a multi-process launch
            print(_refusal(error), file=sys.stderr, flush=True)
        record_for_torchrun(error)
        raise SystemExit(2) from None
    if args is not None and megatron.is_megatron_args(args):
        megatron.install(args)  # swift's Megatron loss for a checked cispo run; no swift rlhf trainer to register
        return
    if getattr(args, 'rlhf_type', None) == 'grpo':
        deepspeed_cpu.prepare(args)  # DeepSpeed on CPU: its distributed state, which transformers leaves out
    register()


def validate_parsed_args(args) -> None:
    """The checks that need no model: CISPO_* options, and for a GRPO run swift's CISPO-relevant flags
    (--loss_type, --epsilon_high, --epsilon, --importance_sampling_level, --resume_from_checkpoint...).

    `args` is swift's RLHFArguments (MegatronRLHFArguments under `megatron rlhf`: see megatron.py), or None where
    the plugin is imported outside argument parsing (the Python API, a dataloader worker): then only the options
    are checked. Other swift commands (rollout, deploy) and other loss types are left alone, but for a misspelt
    `cispo` and a warning when CISPO options are set.
    """
    from cispo_swift import config, deepspeed_cpu, megatron, resume

    if args is None:
        config.current_config()
        return
    if getattr(args, 'rlhf_type', None) != 'grpo':
        return
    on_megatron = megatron.is_megatron_args(args)
    if not on_megatron:
        deepspeed_cpu.check(args)  # fp16 that DeepSpeed would reject on this CPU, after the model has loaded
    if args.loss_type != 'cispo':
        config.check_loss_type(args.loss_type)
        config.warn_unused_options(args.loss_type)
        return
    cfg = config.current_config()
    if on_megatron:  # `megatron rlhf`: its own checks, and the cap set on the arguments
        megatron.check_args(args, cfg)
        return
    resolved = config.check_run(args, cfg)
    check_processes(args)
    check_vllm_installed(args, cfg)
    checkpoint = args.resume_from_checkpoint
    resume.check_checkpoint_path(checkpoint)
    saved = resume.saved_settings(checkpoint)
    if saved is not None:  # the trainer compares again at start; here a change is refused before the model loads
        from swift.utils import get_logger

        current = config.effective_settings(args, cfg, resolved)
        resume.compare_settings(checkpoint, saved, current, cfg.allow_config_change, get_logger())


def check_processes(args, environ=None) -> None:
    """Refuse a multi-process launch (NPROC_PER_NODE, torchrun: WORLD_SIZE > 1) on a machine without GPUs and
    without `--use_cpu true`: transformers would train each process alone, and the trainer refuses that only after
    the model has loaded (`config.check_launch`)."""
    environ = os.environ if environ is None else environ
    try:
        world = int(environ.get('WORLD_SIZE', '1'))
    except ValueError:
        return
    if world <= 1 or getattr(args, 'use_cpu', False) or _has_accelerator():
        return
    raise ValueError(
        f'{world} processes (NPROC_PER_NODE / torchrun) on a machine without GPUs, without --use_cpu true: '
        'transformers trains data-parallel on the CPU only with --use_cpu true; otherwise every process would train '
        "alone on its own batch and overwrite the others' output. Add --use_cpu true (data parallel over gloo), or "
        'launch one process (unset NPROC_PER_NODE).'
    )


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or any(
        getattr(torch, name, None) is not None and getattr(torch, name).is_available() for name in ('xpu', 'npu')
    )


def check_vllm_installed(args, cfg) -> None:
    """Refuse `--use_vllm true` where vLLM cannot be imported: swift raises its ImportError only after the model has
    loaded (rollout_mixin, ms-swift 4.6.0)."""
    if not getattr(args, 'use_vllm', False):
        return
    from swift.utils import is_vllm_available

    if is_vllm_available():
        return
    anchor = (
        ' CISPO_ANCHOR=rollout needs it too: the rollout log-probs come from vLLM.' if cfg.anchor == 'rollout' else ''
    )
    raise ValueError(
        f'--use_vllm true, but vLLM is not installed in this Python ({sys.prefix}): swift would stop with an '
        f'ImportError after loading the model.{anchor} Install vLLM (on a CPU machine: bash scripts/setup.sh --vllm '
        'makes .venv-vllm, see docs/vllm_cpu.md in cispo-swift), or leave out --use_vllm to generate with the '
        'trainer (then CISPO_ANCHOR=old).'
    )


def swift_args_being_parsed():
    """swift's arguments object whose `__post_init__` is importing the plugin now, or None."""
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get('self')
        if hasattr(candidate, 'external_plugins') and hasattr(candidate, 'rlhf_type'):
            return candidate
        frame = frame.f_back
    return None


def record_for_torchrun(error: Exception) -> None:
    """Under torchrun, write the refusal where torchrun reads a failed worker's error (TORCHELASTIC_ERROR_FILE, in
    the format of torch.distributed.elastic's ErrorHandler): its ChildFailedError summary, which it prints after
    the message with exit status 1, then names the refusal as the root cause instead of "To enable traceback see".
    The plugin loads in the workers, so the launcher itself cannot be kept from starting them."""
    path = os.environ.get('TORCHELASTIC_ERROR_FILE')
    if not path:
        return
    import json
    import time

    message = f'cispo-swift refused to start (nothing was loaded): {error}'
    try:
        with open(path, 'w') as f:
            json.dump({'message': {'message': message, 'extraInfo': {'timestamp': str(int(time.time()))}}}, f)
    except OSError:
        pass  # the summary then says what torchrun says without it


def _refusal(error: Exception) -> str:
    body = '\n'.join(f'  {line}' for line in str(error).split('\n'))
    return f'cispo-swift: refusing to start (checked while swift parsed its arguments; nothing was loaded):\n{body}'
