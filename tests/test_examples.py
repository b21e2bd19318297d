"""Every example's swift arguments parse with swift's own parser, without loading a model or running anything.

Discovers `examples/*.sh` and `examples/*.yaml|yml` (so examples added later are checked too):

- shell scripts run under bash with a stand-in `swift` first on PATH that records its arguments and environment, so
  bash itself expands variables, defaults (`${X:-...}`), `$(python -m cispo_swift plugin-path)` and `"$@"`;
- YAML configs go through swift's own `parse_yaml_args` (its `ENV:` block included), as `swift rlhf FILE.yaml` does.

The recorded arguments are parsed by the HfArgumentParser swift builds for the subcommand's argument dataclass
(`swift.utils.parse_args`), with argparse only: flag names must be exact option strings (no prefix abbreviations),
values must convert to the field's type and lie in its choices, and nothing may remain (swift raises
`remaining_argv` then). The dataclass is not instantiated: its `__post_init__` would load models and data sets.
`CISPO_*` variables the examples set must be valid cispo-swift options (`CISPOConfig.from_env`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple
from unittest import mock

import pytest

from cispo_swift.config import ENV_PREFIX, CISPOConfig

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / 'examples'
SCRIPTS = sorted(EXAMPLES.glob('*.sh'))
CONFIGS = sorted([*EXAMPLES.glob('*.yaml'), *EXAMPLES.glob('*.yml')])
PLUGIN = ROOT / 'cispo_swift' / 'plugin.py'
# swift subcommand -> its argument dataclass in swift.arguments (the ones examples may plausibly call)
ARG_CLASSES = {
    'rlhf': 'RLHFArguments',
    'sft': 'SftArguments',
    'pt': 'PretrainArguments',
    'rollout': 'RolloutArguments',
    'infer': 'InferArguments',
    'deploy': 'DeployArguments',
    'export': 'ExportArguments',
}
SENTINEL = ['--logging_steps', '7']  # passed to each script: must arrive last, through "$@"

# Records one call: argv and environment, one JSON file per call, named in call order.
SHIM = """#!{python}
import json, os, sys, time
out = os.environ['SWIFT_SHIM_OUT']
with open(os.path.join(out, '%020d.json' % time.monotonic_ns()), 'w') as f:
    json.dump({{'argv': sys.argv[1:], 'env': dict(os.environ)}}, f)
"""


# ---- the checker -------------------------------------------------------------------------------------------------

_parsers: Dict[str, object] = {}


def _parser(subcommand: str):
    """The HfArgumentParser swift's `parse_args` builds for the subcommand (with swift's dict/str type patch)."""
    if subcommand not in _parsers:
        import swift.arguments
        from transformers import HfArgumentParser

        try:
            from swift.utils.utils import _patch_get_type_hints as patch
        except ImportError:  # another swift version: the patch only matters for dict-or-str fields
            patch = contextlib.nullcontext
        cls = getattr(swift.arguments, ARG_CLASSES[subcommand])
        with patch():
            _parsers[subcommand] = HfArgumentParser([cls])
    return _parsers[subcommand]


def check_swift_args(subcommand: str, argv: List[str]) -> Dict:
    """Parse `argv` as swift would for `swift SUBCOMMAND`, without building the dataclass. Returns the values."""
    if subcommand not in ARG_CLASSES:
        raise AssertionError(f'swift {subcommand}: no argument class known to this test; add it to ARG_CLASSES')
    parser = _parser(subcommand)
    options = {s for action in parser._actions for s in action.option_strings}
    flags = [a.split('=', 1)[0] for a in argv if a.startswith('--')]
    unknown = [f for f in flags if f not in options]
    if unknown:
        raise AssertionError(
            f'swift {subcommand}: unknown flag(s) {unknown} (a typo, an abbreviation or a renamed flag)'
        )
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            namespace, remaining = parser.parse_known_args(argv)
        except SystemExit:
            message = err.getvalue().strip().splitlines()[-1]  # argparse's `error: ...` line, after the usage
            raise AssertionError(f'swift {subcommand}: {message}') from None
    if remaining:
        raise AssertionError(f'swift {subcommand}: swift would raise remaining_argv: {remaining}')
    return vars(namespace)


def check_cispo_env(env: Dict[str, str]) -> CISPOConfig:
    """The `CISPO_*` variables of `env` build a valid CISPOConfig (unknown names and bad values raise)."""
    return CISPOConfig.from_env(environ={k: v for k, v in env.items() if k.startswith(ENV_PREFIX)})


def check_cispo_run(values: Dict, base: Path) -> None:
    """A `--loss_type cispo` run loads the plugin file and sets the weight cap explicitly; plugin files exist."""
    plugins = [Path(p) if os.path.isabs(p) else base / p for p in values.get('external_plugins') or []]
    for p in plugins:
        assert p.is_file(), f'--external_plugins {p}: no such file'
    if values.get('loss_type') in ('cispo', ['cispo']):
        assert any(p.resolve() == PLUGIN for p in plugins), f'--loss_type cispo without the plugin: {plugins}'
        assert values.get('epsilon_high') is not None, '--loss_type cispo without --epsilon_high'


def run_script(script: Path, tmp_path: Path, *args: str) -> List[Tuple[List[str], Dict[str, str]]]:
    """Run `script` with bash, `swift` replaced by a recorder; the (argv, env) of each swift call, in order."""
    bin_dir, out = tmp_path / 'bin', tmp_path / 'calls'
    bin_dir.mkdir(parents=True)
    out.mkdir(parents=True)
    shim = bin_dir / 'swift'
    shim.write_text(SHIM.format(python=sys.executable))
    shim.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env.update(
        PATH=os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable), env.get('PATH', '/usr/bin:/bin')]),
        PYTHONPATH=str(ROOT),
        SWIFT_SHIM_OUT=str(out),
    )
    # Multi-node launches refuse to start without these (a worker node must be told its rank and the master).
    env.setdefault('NODE_RANK', '0')
    env.setdefault('MASTER_ADDR', '127.0.0.1')
    # A stand-in model path: examples that default to `python -m cispo_swift model smollm2` would otherwise fetch and
    # convert the real model (network, the gguf package) just to have their flags parsed.
    env.setdefault('MODEL_DIR', str(tmp_path / 'model'))
    proc = subprocess.run(
        ['bash', str(script), *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, (
        f'{script.name} failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}'
    )
    calls = [json.loads(p.read_text()) for p in sorted(out.glob('*.json'))]
    return [(c['argv'], c['env']) for c in calls]


def yaml_argv(config: Path, *extra: str) -> Tuple[List[str], Dict[str, str]]:
    """argv and environment as `swift rlhf CONFIG ...extra` builds them (swift.cli.main.parse_yaml_args)."""
    from swift.cli.main import parse_yaml_args

    argv = [str(config), *extra]
    clean = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    with mock.patch.dict(os.environ, clean, clear=True):
        parse_yaml_args(argv)  # replaces argv[0] by the config's flags, sets its ENV block in os.environ
        env = dict(os.environ)
    return argv, env


# ---- the examples --------------------------------------------------------------------------------------------------


def test_examples_are_discovered():
    names = {p.name for p in SCRIPTS + CONFIGS}
    assert {'tiny_cpu.sh', 'math_qwen2.5_vllm_colocate.sh', 'lora_single_gpu.sh', 'cispo.yaml'} <= names


@pytest.mark.parametrize('script', SCRIPTS, ids=lambda p: p.name)
def test_shell_example_parses(script, tmp_path):
    calls = run_script(script, tmp_path, *SENTINEL)
    assert calls, f'{script.name} never calls swift'
    assert any(argv[0] == 'rlhf' for argv, _ in calls), f'{script.name} has no `swift rlhf` call'
    for argv, env in calls:
        subcommand, args = argv[0], argv[1:]
        if args and args[0].endswith(('.yaml', '.yml', '.json')):
            args = yaml_argv(Path(args[0]) if os.path.isabs(args[0]) else tmp_path / args[0], *args[1:])[0]
        values = check_swift_args(subcommand, args)
        check_cispo_env(env)
        check_cispo_run(values, tmp_path)
        if subcommand == 'rlhf':
            assert args[-len(SENTINEL) :] == SENTINEL, f'{script.name}: extra arguments do not reach swift via "$@"'


@pytest.mark.parametrize('config', CONFIGS, ids=lambda p: p.name)
def test_yaml_example_parses(config):
    argv, env = yaml_argv(config)
    values = check_swift_args('rlhf', argv)
    cfg = check_cispo_env(env)
    check_cispo_run(values, ROOT)  # relative paths in the config: from the repository root, as documented there
    # Flags after the file win (argparse keeps the last value).
    argv, _ = yaml_argv(config, '--logging_steps', '7')
    assert check_swift_args('rlhf', argv)['logging_steps'] == 7
    assert isinstance(cfg, CISPOConfig)


def test_yaml_env_block_reaches_the_cispo_options():
    argv, env = yaml_argv(EXAMPLES / 'cispo.yaml')
    cfg = check_cispo_env(env)
    assert (cfg.norm, cfg.fp32_lm_head, cfg.clip_mode) == ('prompt', True, 'absolute')


def test_tiny_cpu_defaults_use_the_plugin(tmp_path):
    (argv, env), *_ = run_script(EXAMPLES / 'tiny_cpu.sh', tmp_path)
    values = check_swift_args('rlhf', argv[1:])
    assert values['loss_type'] == ['cispo'] or values['loss_type'] == 'cispo'
    assert str(PLUGIN) in values['external_plugins']


# ---- the checker catches what it should ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    'argv, message',
    [
        (['--epsilon_hihg', '5.0'], r"unknown flag\(s\) \['--epsilon_hihg'\]"),
        (['--epsilon_hi', '5.0'], r"unknown flag\(s\) \['--epsilon_hi'\]"),  # argparse would take the abbreviation
        (['--epsilon_high', 'five'], 'invalid float value'),
        (['--scale_rewards', 'sequence'], 'invalid choice'),
        (['--use_vllm', 'maybe'], 'use_vllm'),
        (['--config', 'examples/cispo.yaml'], r"unknown flag\(s\) \['--config'\]"),  # 4.6.0: the file is positional
        (['--beta', '0', 'stray'], 'remaining_argv'),
    ],
)
def test_checker_rejects(argv, message):
    with pytest.raises(AssertionError, match=message):
        check_swift_args('rlhf', argv)


def test_checker_accepts_and_converts():
    values = check_swift_args('rlhf', ['--epsilon_high', '5', '--use_vllm', 'true', '--external_plugins', 'a', 'b'])
    assert values['epsilon_high'] == 5.0 and values['use_vllm'] is True and values['external_plugins'] == ['a', 'b']


@pytest.mark.parametrize(
    'env, message',
    [
        ({'CISPO_NROM': 'prompt'}, 'Unknown CISPO option'),
        ({'CISPO_NORM': 'tokens'}, 'CISPO_NORM=.tokens. is not valid'),
    ],
)
def test_cispo_env_check_rejects(env, message):
    with pytest.raises(ValueError, match=message):
        check_cispo_env({'PATH': '/bin', **env})


def test_shell_checker_sees_a_bad_flag_and_a_bad_option(tmp_path):
    script = tmp_path / 'bad.sh'
    script.write_text(
        'CISPO_NORM=tokens \\\nswift rlhf \\\n    --rlhf_type grpo \\\n    --losstype cispo \\\n    "$@"\n'
    )
    (argv, env), *_ = run_script(script, tmp_path / 'run')
    with pytest.raises(AssertionError, match='--losstype'):
        check_swift_args(argv[0], argv[1:])
    with pytest.raises(ValueError, match='CISPO_NORM'):
        check_cispo_env(env)
