"""Checkpoints and resume: the CISPO settings saved beside the weights, and the checks before a resume.

Every `checkpoint-N/` gets `cispo_config.json` (the effective settings). A run with `--resume_from_checkpoint`
compares them with its own before training and refuses a change (the loss would change in the middle of the run)
unless CISPO_ALLOW_CONFIG_CHANGE=1.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from typing import Any, Dict, Optional

CONFIG_FILE = 'cispo_config.json'
# Saved with the settings but not compared on resume: they do not change the loss (check_finite only stops a run
# whose loss or gradient is already NaN/inf).
RESUME_UNCHECKED = ('allow_config_change', 'check_finite')
# How to set each saved setting back, for the resume error; the weight bounds follow from the others.
SETTING_FLAGS = {
    'epsilon_high': '--epsilon_high',
    'ppo_epsilon_for_metrics': '--epsilon',
    'importance_sampling_level': '--importance_sampling_level',
    'beta': '--beta',
}


def write_settings(directory: str, settings: Dict[str, Any]) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG_FILE), 'w') as f:
        json.dump(settings, f, indent=2, sort_keys=True)


def check_checkpoint_path(path) -> None:
    """Refuse a `--resume_from_checkpoint` that is not a checkpoint directory, before anything loads.

    A run directory (holding `checkpoint-N/` or swift's `vX-DATE/checkpoint-N/`) is the usual slip: name its
    newest checkpoint. Booleans and None (transformers' "latest checkpoint in output_dir") pass.
    """
    if not isinstance(path, str) or not path:
        return
    if os.path.isfile(path):
        parent = os.path.dirname(os.path.abspath(path))
        holds = os.path.isfile(os.path.join(parent, 'trainer_state.json'))
        hint = f'Pass the directory that holds it: {parent}.' if holds else 'Pass a checkpoint-N directory.'
        raise ValueError(
            f'--resume_from_checkpoint {path} is a file; a checkpoint is a directory (OUTPUT_DIR/.../checkpoint-N, '
            f'with trainer_state.json and the weights). {hint}'
        )
    if not os.path.isdir(path):
        raise ValueError(
            f'--resume_from_checkpoint {path}: no such directory. Pass a checkpoint directory written by a previous '
            'run (OUTPUT_DIR/.../checkpoint-N).'
        )
    if os.path.isfile(os.path.join(path, 'trainer_state.json')):
        return
    found = glob.glob(os.path.join(path, 'checkpoint-*')) + glob.glob(os.path.join(path, '*', 'checkpoint-*'))
    steps = {p: int(m.group(1)) for p in found if (m := re.search(r'checkpoint-(\d+)$', p)) and os.path.isdir(p)}
    hint = (
        f'It holds checkpoints; the newest is {max(steps, key=lambda p: (steps[p], p))}.'
        if steps
        else 'It holds no checkpoint-N directory either.'
    )
    raise ValueError(
        f'--resume_from_checkpoint {path} is not a checkpoint: it has no trainer_state.json. {hint} Pass a '
        'checkpoint-N directory.'
    )


def warn_if_mid_generation(checkpoint: str, every: int, gradient_accumulation_steps: int, warn) -> None:
    """swift keeps the completions reused for num_iterations × steps_per_generation micro-steps in memory only
    (`_buffered_inputs`, `_step`); a resume regenerates at once, so it only continues the run exactly from a
    checkpoint taken where a new generation batch starts (`every` micro-steps)."""
    try:
        with open(os.path.join(checkpoint, 'trainer_state.json')) as f:
            step = int(json.load(f)['global_step'])
    except (OSError, ValueError, KeyError):
        return
    if step * gradient_accumulation_steps % every:
        warn(
            f'Resuming from step {step}, in the middle of a generation batch: swift generates every {every} '
            'micro-steps (num_iterations × steps_per_generation) and does not save the batch being reused, so this '
            'run generates a new one now and its off-policy steps differ from an uninterrupted run. For exact '
            f'resumes, save at steps where step × gradient_accumulation_steps is a multiple of {every}.'
        )


def saved_settings(checkpoint) -> Optional[Dict[str, Any]]:
    """The settings saved in `checkpoint`, None when there is no checkpoint directory or no settings file."""
    path = os.path.join(checkpoint, CONFIG_FILE) if isinstance(checkpoint, str) else None
    if path is None or not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(
            f'{path} cannot be read as the CISPO settings of this checkpoint ({type(error).__name__}: {error}): the '
            'file is damaged. Restore it (every checkpoint-N and the run directory hold a copy), or delete it to '
            'resume without checking the settings (a warning then says so).'
        ) from None
    if not isinstance(saved, dict):
        raise ValueError(f'{path} holds {type(saved).__name__}, not the settings object cispo-swift writes: damaged.')
    return saved


def compare_settings(checkpoint: str, saved: Dict[str, Any], current: Dict[str, Any], allow_change: bool, log):
    """Refuse (ValueError) to resume with CISPO settings other than the saved ones, listing each difference, how
    to set it back and how to go on anyway; with `allow_change`, warn instead. `log` has info and warning."""
    missing = object()
    current = json.loads(json.dumps(current))  # the types the file holds (lists, not tuples)
    changed = [
        (key, saved.get(key, missing), current.get(key, missing))
        for key in sorted(set(saved) | set(current))
        if key not in RESUME_UNCHECKED and saved.get(key, missing) != current.get(key, missing)
    ]
    if not changed:
        _log_once(log.info, f'cispo-swift: resuming from {checkpoint} with the CISPO settings it was saved with.')
        return

    def show(value):
        return 'absent' if value is missing else repr(value)

    lines = '\n'.join(f'  {key}: {show(old)} in the checkpoint, {show(new)} now' for key, old, new in changed)
    message = (
        f'Resuming from {checkpoint} with CISPO settings that differ from those saved in its {CONFIG_FILE}:\n'
        f'{lines}\nThe loss would change in the middle of the run.'
    )
    if allow_change:  # the plugin file and the trainer both compare: one warning
        _log_once(log.warning, f'{message} Continuing, because CISPO_ALLOW_CONFIG_CHANGE=1.')
        return
    hints = [_setting_hint(key, old) for key, old, _ in changed if old is not missing]
    restore = ', '.join(h for h in hints if h) or 'the values above'
    raise ValueError(
        f'{message} To resume as trained, use: {restore}. If the change is intended, set '
        'CISPO_ALLOW_CONFIG_CHANGE=1 (Python API: cispo_swift.configure(..., allow_config_change=True)).'
    )


_logged = set()


def _log_once(emit, message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        emit(message)


def _setting_hint(key: str, value) -> Optional[str]:
    """How to set a saved setting back: `CISPO_NORM=token`, `--beta 0.04`; None for derived ones."""
    from cispo_swift.config import CISPOConfig

    if key in SETTING_FLAGS:
        return f'{SETTING_FLAGS[key]} {value}'
    if key in {f.name for f in dataclasses.fields(CISPOConfig)}:
        if value is None:
            return f'unset CISPO_{key.upper()}'
        return f'CISPO_{key.upper()}={int(value) if isinstance(value, bool) else value}'
    return None
