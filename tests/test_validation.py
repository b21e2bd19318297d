"""Bad input is refused while swift parses its arguments (the plugin file), with the same checks at trainer start;
settings without effect are warned about; the fuzzed option space either refuses with a message naming the setting
or trains a step with finite loss and gradients. docs/bad_inputs.md is generated here (UPDATE_DOCS=1 rewrites it)."""

import dataclasses
import json
import logging
import math
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stubs import attach_logps, default_args, make_batch, make_trainer, our_loss

from cispo_swift import config as C
from cispo_swift import registry
from cispo_swift.norm import attach_group_counts

ROOT = Path(__file__).resolve().parent.parent
BAD_INPUTS_DOC = ROOT / 'docs' / 'bad_inputs.md'


def _args(**overrides):
    values = dict(rlhf_type='grpo', external_plugins=[], resume_from_checkpoint=None, use_liger_kernel=False)
    values.update(overrides)
    return default_args(**values)


def _outcome(env, caplog, **flags):
    """What the plugin file does with these settings: ('refused', message), ('warning', messages) or ('ok', '')."""
    saved = {k: v for k, v in os.environ.items() if k.startswith('CISPO_')}
    for key in saved:
        del os.environ[key]
    os.environ.update(env)
    C._warned.clear()
    caplog.clear()
    try:
        registry.validate_parsed_args(_args(**flags))
    except (ValueError, TypeError) as error:
        return 'refused', str(error)
    finally:
        for key in env:
            del os.environ[key]
        os.environ.update(saved)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    return ('warning', ' / '.join(warnings)) if warnings else ('ok', '')


# (what a user gives, env, flags, expected outcome, a piece of the message)
BAD_INPUTS = [
    ('--epsilon_high nan', {}, {'epsilon_high': math.nan}, 'refused', '--epsilon_high nan: NaN is not a valid'),
    ('--epsilon_high 0', {}, {'epsilon_high': 0.0}, 'refused', 'must be a positive number (inf: no cap)'),
    ('--epsilon_high -1', {}, {'epsilon_high': -1.0}, 'refused', 'must be a positive number'),
    ('--epsilon_high 0.28', {}, {'epsilon_high': 0.28}, 'refused', 'would be down-weighted to 0.28'),
    ('--epsilon_high inf', {}, {'epsilon_high': math.inf}, 'warning', '--epsilon_high inf: no cap on the CISPO weight'),
    ('--epsilon nan', {}, {'epsilon': math.nan}, 'refused', '--epsilon nan'),
    ('--beta nan', {}, {'beta': math.nan}, 'refused', '--beta nan'),
    ('--delta 3', {}, {'delta': 3.0}, 'warning', '--delta 3.0 has no effect with --loss_type cispo'),
    ('--loss_type cispoo', {}, {'loss_type': 'cispoo'}, 'refused', "--loss_type 'cispoo' is not 'cispo'"),
    ('--loss_type CISPO', {}, {'loss_type': 'CISPO'}, 'refused', "--loss_type 'CISPO' is not 'cispo'"),
    ('--loss_type grpo with CISPO_NORM=prompt', {'CISPO_NORM': 'prompt'}, {'loss_type': 'grpo'}, 'warning',
     "the CISPO options apply only to --loss_type cispo"),
    ('--importance_sampling_level seq', {}, {'importance_sampling_level': 'seq'}, 'refused',
     "--importance_sampling_level 'seq' is not one of token, sequence, sequence_token"),
    ('--use_liger_kernel true', {}, {'use_liger_kernel': True}, 'refused', 'would bypass the cispo-swift loss'),
    ('--resume_from_checkpoint MISSING', {}, {'resume_from_checkpoint': '/nonexistent/checkpoint-4'}, 'refused',
     'no such directory'),
    ('CISPO_CLIPMODE=absolute', {'CISPO_CLIPMODE': 'absolute'}, {}, 'refused',
     'Unknown CISPO option variable(s): CISPO_CLIPMODE'),
    ('CISPO_NORM=tokens', {'CISPO_NORM': 'tokens'}, {}, 'refused', "CISPO_NORM='tokens' is not valid"),
    ('CISPO_MASK=maybe', {'CISPO_MASK': 'maybe'}, {}, 'refused', "CISPO_MASK='maybe' is not a boolean"),
    ('CISPO_MASK_EPS_HIGH=nan', {'CISPO_MASK': '1', 'CISPO_MASK_EPS_HIGH': 'nan'}, {}, 'refused',
     "CISPO_MASK_EPS_HIGH='nan': NaN is not a valid setting"),
    ('CISPO_MASK_EPS_LOW=-0.1', {'CISPO_MASK': '1', 'CISPO_MASK_EPS_LOW': '-0.1'}, {}, 'refused',
     'CISPO_MASK_EPS_LOW=-0.1 must be a number ≥ 0'),
    ('CISPO_MASK_EPS_HIGH=inf', {'CISPO_MASK': '1', 'CISPO_MASK_EPS_HIGH': 'inf'}, {'num_iterations': 2}, 'ok', ''),
    ('CISPO_MASK=1 on-policy (--num_iterations 1)', {'CISPO_MASK': '1'}, {'num_iterations': 1}, 'warning',
     'CISPO_MASK=1 has no effect: with --num_iterations 1'),
    ('CISPO_MASK=1 with both mask eps inf', {'CISPO_MASK': '1', 'CISPO_MASK_EPS_LOW': 'inf',
                                             'CISPO_MASK_EPS_HIGH': 'inf'}, {'num_iterations': 2}, 'warning',
     'neither side drops a token'),
    ('CISPO_MASK_EPS_HIGH=1e-400', {'CISPO_MASK': '1', 'CISPO_MASK_EPS_HIGH': '1e-400'}, {}, 'refused',
     "CISPO_MASK_EPS_HIGH='1e-400' is below the float range and would read as 0"),
    ('CISPO_KL_BUDGET=1e-400', {'CISPO_KL_BUDGET': '1e-400'}, {}, 'refused',
     "CISPO_KL_BUDGET='1e-400' is below the float range"),
    ('--top_entropy_quantile 0', {}, {'top_entropy_quantile': 0.0}, 'refused',
     'so about one token per micro-batch trains'),
    ('--resume_from_checkpoint FILE', {}, {'resume_from_checkpoint': str(ROOT / 'README.md')}, 'refused',
     'is a file; a checkpoint is a directory'),
    ('CISPO_MASK_EPS_HIGH=0.28 without CISPO_MASK=1', {'CISPO_MASK_EPS_HIGH': '0.28'}, {}, 'warning',
     'CISPO_MASK_EPS_HIGH=0.28 has no effect without CISPO_MASK=1'),
    ('CISPO_EPS_LOW=0.2 (absolute mode)', {'CISPO_EPS_LOW': '0.2'}, {}, 'warning',
     'CISPO_EPS_LOW=0.2 has no effect with CISPO_CLIP_MODE=absolute'),
    ('CISPO_EPS_LOW=1.5', {'CISPO_CLIP_MODE': 'relative', 'CISPO_EPS_LOW': '1.5'}, {}, 'refused',
     'eps_low must be in [0, 1]'),
    ('CISPO_EPS_LOW=nan', {'CISPO_CLIP_MODE': 'relative', 'CISPO_EPS_LOW': 'nan'}, {}, 'refused',
     "CISPO_EPS_LOW='nan': NaN is not a valid setting"),
    ('CISPO_FUSED_CHUNK_SIZE=0', {'CISPO_FUSED_LOGPS': '1', 'CISPO_FUSED_CHUNK_SIZE': '0'}, {}, 'refused',
     'CISPO_FUSED_CHUNK_SIZE=0 must be a positive number of tokens'),
    ('CISPO_FUSED_CHUNK_SIZE=inf', {'CISPO_FUSED_LOGPS': '1', 'CISPO_FUSED_CHUNK_SIZE': 'inf'}, {}, 'refused',
     "CISPO_FUSED_CHUNK_SIZE='inf' is not an integer"),
    ('CISPO_FUSED_CHUNK_SIZE=256 without CISPO_FUSED_LOGPS=1', {'CISPO_FUSED_CHUNK_SIZE': '256'}, {}, 'warning',
     'CISPO_FUSED_CHUNK_SIZE=256 has no effect without CISPO_FUSED_LOGPS=1'),
    ('CISPO_KL_BUDGET=0', {'CISPO_KL_BUDGET': '0'}, {}, 'refused', 'CISPO_KL_BUDGET=0.0 must be a finite number > 0'),
    ('CISPO_KL_BUDGET=nan', {'CISPO_KL_BUDGET': 'nan'}, {}, 'refused', "CISPO_KL_BUDGET='nan': NaN is not a valid"),
    ('CISPO_KL_BUDGET=0.1 with --num_iterations 1', {'CISPO_KL_BUDGET': '0.1'}, {'num_iterations': 1}, 'warning',
     'CISPO_KL_BUDGET=0.1 has no effect'),
    ('CISPO_ANCHOR=rollout without vLLM', {'CISPO_ANCHOR': 'rollout'}, {}, 'refused', 'Use --use_vllm true'),
    ('CISPO_ALLOW_CONFIG_CHANGE=1 without a resume', {'CISPO_ALLOW_CONFIG_CHANGE': '1'}, {}, 'warning',
     'CISPO_ALLOW_CONFIG_CHANGE=1 has no effect without --resume_from_checkpoint'),
    ('CISPO_NORM=prompt with --sequence_parallel_size 2', {'CISPO_NORM': 'prompt'}, {'sequence_parallel_size': 2},
     'refused', 'sequence parallelism splits them'),
]  # fmt: skip


@pytest.mark.parametrize('label, env, flags, kind, message', BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_outcome(label, env, flags, kind, message, swift_log):
    outcome, text = _outcome(env, swift_log, **flags)
    assert outcome == kind, text
    assert message in text


def test_the_same_checks_run_at_trainer_start(swift_log):
    """The Python API builds the trainer without the plugin file: the refusals and warnings come from there."""
    with pytest.raises(ValueError, match='--epsilon_high nan'):
        make_trainer(epsilon_high=math.nan)
    with pytest.raises(ValueError, match="--loss_type 'cispoo' is not 'cispo'"):
        make_trainer(loss_type='cispoo')
    make_trainer(C.CISPOConfig(mask_eps_high=0.3))
    assert 'CISPO_MASK_EPS_HIGH=0.3 has no effect without CISPO_MASK=1' in swift_log.text


def test_bad_inputs_doc_is_generated_through_the_cli_and_agrees_with_the_cases():
    """docs/bad_inputs.md comes from real commands (scripts/bad_inputs_doc.py); every case is in it, with the
    outcome the case expects, and every refusal happened before the model loaded."""
    import importlib.util

    spec = importlib.util.spec_from_file_location('bad_inputs_doc', ROOT / 'scripts' / 'bad_inputs_doc.py')
    doc_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(doc_script)
    rows = {}
    for line in BAD_INPUTS_DOC.read_text().splitlines():
        cells = [c.strip() for c in re.split(r'(?<!\\)\|', line.strip())[1:-1]]
        if len(cells) == 6 and cells[0].startswith('`'):
            rows[cells[0].strip('`')] = cells
    for label, _, _, expected in doc_script.CASES:
        assert label in rows, f'docs/bad_inputs.md has no row for {label!r}: run scripts/bad_inputs_doc.py'
        outcome, _, loaded, seconds, message = rows[label][1:]
        assert outcome == expected, (label, outcome)
        float(seconds)
        if outcome == 'refused':
            assert loaded == 'no' and message, label


def test_refusal_prints_one_block_and_exits_2(monkeypatch, capsys):
    class Args:  # stands for swift's RLHFArguments, whose __post_init__ imports the plugin file
        def __init__(self):
            self.__dict__.update(vars(_args()))
            registry.load_plugin()

    monkeypatch.setenv('CISPO_NORM', 'tokens')
    with pytest.raises(SystemExit) as exit_info:
        Args()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('cispo-swift: refusing to start (checked while swift parsed its arguments; nothing')
    assert "  CISPO_NORM='tokens' is not valid" in err and 'Traceback' not in err


def test_under_torchrun_the_refusal_is_the_root_cause_of_its_summary(monkeypatch, tmp_path, capsys):
    """torchrun prints a ChildFailedError summary after a worker exits non-zero; the refusal is written where it reads
    the worker's error, so the summary names it instead of "To enable traceback see"."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    class Args:
        def __init__(self):
            self.__dict__.update(vars(_args()))
            registry.load_plugin()

    error_file = tmp_path / 'error.json'
    monkeypatch.setenv('TORCHELASTIC_ERROR_FILE', str(error_file))
    monkeypatch.setenv('CISPO_NORM', 'tokens')
    with pytest.raises(SystemExit):
        Args()
    capsys.readouterr()
    failure = ProcessFailure(local_rank=0, pid=1, exitcode=2, error_file=str(error_file))
    summary = ChildFailedError('swift/cli/rlhf.py', {0: failure}).format_msg()
    assert "cispo-swift refused to start (nothing was loaded): CISPO_NORM='tokens' is not valid" in summary
    assert 'To enable traceback' not in summary


def test_package_init_handed_to_swift_works_as_the_plugin(monkeypatch):
    from swift.trainers import TrainerFactory
    from swift.utils import import_external_file

    monkeypatch.setitem(TrainerFactory.TRAINER_MAPPING, 'grpo', 'swift.rlhf_trainers.GRPOTrainer')
    monkeypatch.setattr('sys.path', list(__import__('sys').path))
    module = import_external_file(str(ROOT / 'cispo_swift' / '__init__.py'))
    monkeypatch.delitem(__import__('sys').modules, module.__name__)
    assert TrainerFactory.TRAINER_MAPPING['grpo'] == registry.TRAINER_PATH


def test_outside_argument_parsing_there_are_no_swift_args():
    assert registry.swift_args_being_parsed() is None


# ---- fuzzing the option space ----------------------------------------------------------------------------------

_NUMBERS = st.sampled_from(['0', '0.2', '1', '4.0', '-1', '1.5', 'nan', 'inf', '-inf', '1e309', '', ' 0.3 ', 'x'])
_OPTIONS = {
    'CISPO_CLIP_MODE': st.sampled_from(['absolute', 'relative', 'abs', '']),
    'CISPO_EPS_LOW': _NUMBERS,
    'CISPO_MASK': st.sampled_from(['0', '1', 'true', 'maybe']),
    'CISPO_MASK_EPS_LOW': _NUMBERS,
    'CISPO_MASK_EPS_HIGH': _NUMBERS,
    'CISPO_NORM': st.sampled_from(['token', 'sequence', 'prompt', 'tokens']),
    'CISPO_FUSED_CHUNK_SIZE': st.sampled_from(['1', '7', '512', '0', '-3', 'inf', '2.5']),
    'CISPO_CHECK_FINITE': st.sampled_from(['0', '1']),
    'CISPO_KL_BUDGET': _NUMBERS,
    'CISPO_NROM': st.just('token'),
}


@st.composite
def _settings(draw):
    env = {
        k: draw(v) for k, v in _OPTIONS.items() if draw(st.booleans()) and (k != 'CISPO_NROM' or draw(st.booleans()))
    }
    flags = {
        'epsilon_high': draw(st.sampled_from([None, 5.0, 4.0, 1.0, 0.5, 0.0, -2.0, math.inf, math.nan, 1e-300])),
        'epsilon': draw(st.sampled_from([0.2, 0.0, math.nan])),
        'beta': draw(st.sampled_from([0.0, 0.04, math.nan])),
        'importance_sampling_level': draw(st.sampled_from(['token', 'sequence', 'sequence_token', 'tok'])),
    }
    return env, flags


def _refused_by_name_or_outcome(swift_log, env, flags):
    """What the plugin file does with drawn settings; a refusal must name one of the settings given."""
    outcome, text = _outcome(env, swift_log, **flags)
    if outcome == 'refused':
        named = [k for k in env if k in text] + [f'--{k}' for k in flags if f'--{k}' in text]
        assert named, f'the refusal names none of the given settings: {text}'
    return outcome, text


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_settings())
def test_fuzzed_settings_are_refused_by_name_or_train_a_finite_step(swift_log, drawn):
    env, flags = drawn
    outcome, text = _refused_by_name_or_outcome(swift_log, env, flags)
    if outcome == 'refused':
        return
    cfg = C.CISPOConfig.from_env(environ=env)
    logits, ids, batch, entropies = make_batch(1)
    trainer = attach_logps(make_trainer(cfg, **flags), logits, ids, entropies)
    if cfg.norm != 'token':
        trainer.split_by_mini_batches = lambda samples: [samples]
        samples = [SimpleNamespace(prompt_id=i // 2) for i in range(batch.completion_mask.shape[0])]
        attach_group_counts(trainer, samples, [{'grpo_batch': batch}])
    loss, _ = our_loss(trainer, batch)
    if trainer.cispo_budget is not None and trainer.cispo_budget.skip_pending:
        # The drift spent the budget: this step is skipped, and its loss carries no graph (no backward wasted on it).
        assert torch.isfinite(loss) and loss.grad_fn is None, (env, flags)
        return
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(loss) and torch.isfinite(grad).all(), (env, flags)


# ---- the whole option space: refused, or shown (settings line and cispo_config.json), or warned about ----------

_ANY_NUMBER = st.sampled_from(
    ['0', '0.05', '0.2', '1', '4.0', '-1', 'nan', 'NaN', 'inf', '-inf', '1e309', '', ' ', '1_0', '0x10', ' 0.3 ', 'x']
)
_ALL_OPTIONS = {
    'CISPO_CLIP_MODE': st.sampled_from(['absolute', 'relative', 'Absolute', 'abs', '']),
    'CISPO_EPS_LOW': _ANY_NUMBER,
    'CISPO_MASK': st.sampled_from(['0', '1', 'true', 'FALSE', 'on', 'maybe', '']),
    'CISPO_MASK_EPS_LOW': _ANY_NUMBER,
    'CISPO_MASK_EPS_HIGH': _ANY_NUMBER,
    'CISPO_ANCHOR': st.sampled_from(['old', 'rollout', 'Old', '']),
    'CISPO_NORM': st.sampled_from(['token', 'sequence', 'prompt', 'Prompt', 'tokens', '']),
    'CISPO_KL_BUDGET': _ANY_NUMBER,
    'CISPO_FP32_LM_HEAD': st.sampled_from(['0', '1', 'yes', '2', '']),
    'CISPO_FUSED_LOGPS': st.sampled_from(['0', '1', 'true', '']),
    'CISPO_FUSED_CHUNK_SIZE': st.sampled_from(['1', '512', '0', '-3', 'inf', '2.5', '1_0', '', ' 64 ']),
    'CISPO_CHECK_FINITE': st.sampled_from(['0', '1', 'off', '', 'maybe']),
    'CISPO_ALLOW_CONFIG_CHANGE': st.sampled_from(['0', '1', '']),
    'cispo_norm': st.just('prompt'),
    'Cispo_Mask': st.just('1'),
    'CISPO_NROM': st.just('token'),
}
_FLAG_VALUES = {
    'epsilon_high': [None, 5.0, 4.0, 1.0, 0.5, 0.0, -2.0, math.inf, math.nan],
    'epsilon': [0.2, 0.0, -1.0, math.inf, math.nan],
    'beta': [0.0, 0.04, -1.0, math.inf, math.nan],
    'temperature': [1.0, 0.7, 0.0, -1.0, math.inf, math.nan],
    'top_entropy_quantile': [1.0, 0.2, 0.0, 2.0, -0.5, math.nan],
    'num_iterations': [1, 2, 4, 0, -1],
    'importance_sampling_level': ['token', 'sequence', 'sequence_token', 'tok'],
}


@st.composite
def _whole_space(draw):
    keys = draw(st.lists(st.sampled_from(sorted(_ALL_OPTIONS)), max_size=5, unique=True))
    env = {k: draw(_ALL_OPTIONS[k]) for k in keys}
    flags = {k: draw(st.sampled_from(v)) for k, v in _FLAG_VALUES.items() if draw(st.booleans())}
    return env, flags


def _shown(name: str, cfg, line: str) -> bool:
    """Whether the settings line shows option `name` with the value the run uses (False: not shown)."""
    field = name[len('CISPO_') :].lower()
    value = getattr(cfg, field)
    if field == 'eps_low':
        return f'eps_low {"unset" if value is None else f"{value:g}"}]' in line
    if field in ('mask_eps_low', 'mask_eps_high'):
        return (f'(eps {value:g}/' if field == 'mask_eps_low' else f'/{value:g})') in line
    if field == 'fused_chunk_size':
        return f'(chunk {value})' in line
    if field == 'clip_mode':
        return f'[{value}, ' in line
    if field == 'mask':
        return f'unified_mask={"on" if value else "off"}' in line
    if field == 'kl_budget':
        return f'kl_budget={"off" if value is None else f"{value:g}"}' in line
    if isinstance(value, bool):
        return f'{field}={int(value)}' in line
    return f'{field}={value}' in line


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_whole_space())
def test_every_input_is_refused_by_name_or_shown_or_warned_about(swift_log, drawn):
    env, flags = drawn
    outcome, text = _refused_by_name_or_outcome(swift_log, env, flags)
    if outcome == 'refused':
        return
    assert not any(k != k.upper() for k in env), f'a lower-case CISPO variable was accepted: {env}'
    for flag, value in flags.items():  # accepted swift values are valid ones
        if isinstance(value, float):
            assert not math.isnan(value), flag
    args = _args(**flags)
    cfg = C.CISPOConfig.from_env(environ=env)
    resolved = C.resolve_weight(args, cfg)
    settings = C.effective_settings(args, cfg, resolved)
    line = C.summary_line(settings)
    saved = json.loads(json.dumps(settings))  # what cispo_config.json holds
    for name in env:
        field = name[len('CISPO_') :].lower()
        assert field in saved and saved[field] == json.loads(json.dumps(getattr(cfg, field))), name
        assert _shown(name, cfg, line) or name in text, f'{name}={env[name]!r} accepted, not shown nor warned: {line}'
    if flags.get('epsilon_high') is not None:
        assert f'{resolved.upper}' in line, line
    if 'beta' in flags:
        assert f'beta={flags["beta"]}' in line, line
    if 'importance_sampling_level' in flags:
        assert f'is_level={flags["importance_sampling_level"]}' in line, line
    if 'epsilon' in flags:
        assert f'ppo_epsilon(metric)={flags["epsilon"]}' in line


def test_parse_time_checks_of_swift_ranges_and_no_cap(swift_log):
    for flags, message in [
        ({'beta': math.inf}, '--beta inf with --loss_type cispo: it must be a finite number ≥ 0'),
        ({'beta': -1.0}, '--beta -1.0 with --loss_type cispo'),
        ({'epsilon': -1.0}, '--epsilon -1.0 with --loss_type cispo: it must be a finite number ≥ 0'),
        ({'temperature': 0.0}, '--temperature 0.0 with --loss_type cispo: it must be a finite number > 0'),
        ({'temperature': math.inf}, '--temperature inf'),
        ({'top_entropy_quantile': 2.0}, '--top_entropy_quantile 2.0 with --loss_type cispo: it must be a number in'),
        ({'num_iterations': 0}, '--num_iterations 0: it must be an integer ≥ 1'),
    ]:
        outcome, text = _outcome({}, swift_log, **flags)
        assert outcome == 'refused' and message in text, (flags, text)
    outcome, text = _outcome({}, swift_log, epsilon_high=math.inf)
    assert outcome == 'warning' and '--epsilon_high inf: no cap' in text and '1e309' in text


@pytest.mark.parametrize(
    'raw, message',
    [
        ('', 'CISPO_CHECK_FINITE is set but empty'),
        ('  ', 'CISPO_CHECK_FINITE is set but empty'),
    ],
)
def test_empty_values_are_refused_for_every_option(raw, message):
    with pytest.raises(ValueError, match=message):
        C.CISPOConfig.from_env({'CISPO_CHECK_FINITE': raw})
    for f in dataclasses.fields(C.CISPOConfig):
        name = 'CISPO_' + f.name.upper()
        with pytest.raises(ValueError, match=f'{name} is set but empty'):
            C.CISPOConfig.from_env({name: raw})


@pytest.mark.parametrize(
    'name, raw, message',
    [
        ('CISPO_FUSED_CHUNK_SIZE', '1_0', "CISPO_FUSED_CHUNK_SIZE='1_0' is not an integer"),
        ('CISPO_MASK_EPS_HIGH', '1_0.5', "CISPO_MASK_EPS_HIGH='1_0.5' is not a number"),
        ('CISPO_KL_BUDGET', '0x10', "CISPO_KL_BUDGET='0x10' is not a number"),
        ('CISPO_MASK_EPS_HIGH', '1e309', 'beyond the float range and would read as inf'),
    ],
)
def test_numbers_are_plain_literals(name, raw, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        C.CISPOConfig.from_env({name: raw})
    assert C.CISPOConfig.from_env({'CISPO_MASK_EPS_HIGH': 'INF'}).mask_eps_high == math.inf


def test_lower_case_variable_names_are_refused_with_the_right_name():
    with pytest.raises(ValueError, match='Variable names are upper case: cispo_norm → CISPO_NORM'):
        C.CISPOConfig.from_env({'cispo_norm': 'prompt'})


def test_processes_without_gpus_need_use_cpu_at_parsing(swift_log, monkeypatch):
    """NPROC_PER_NODE=2 (torchrun sets WORLD_SIZE) on a machine without GPUs, without --use_cpu true: refused while
    swift parses its arguments, saying what to add (the trainer's own check comes only after the model loaded)."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    outcome, text = _outcome({'WORLD_SIZE': '2'}, swift_log, use_cpu=False)
    assert outcome == 'refused' and 'Add --use_cpu true' in text and '2 processes' in text
    assert _outcome({'WORLD_SIZE': '2'}, swift_log, use_cpu=True)[0] == 'ok'
    assert _outcome({'WORLD_SIZE': '1'}, swift_log, use_cpu=False)[0] == 'ok'


def test_use_vllm_without_vllm_installed_is_refused_at_parsing(swift_log, monkeypatch):
    import swift.utils

    monkeypatch.setattr(swift.utils, 'is_vllm_available', lambda: False)
    outcome, text = _outcome({'CISPO_ANCHOR': 'rollout'}, swift_log, use_vllm=True)
    assert outcome == 'refused' and 'vLLM is not installed' in text and 'CISPO_ANCHOR=rollout needs it too' in text
    assert 'bash scripts/setup.sh --vllm' in text
    monkeypatch.setattr(swift.utils, 'is_vllm_available', lambda: True)
    assert _outcome({'CISPO_ANCHOR': 'rollout'}, swift_log, use_vllm=True)[0] == 'ok'


# ---- configure(): the same parser and checks as the variables ------------------------------------------------------

_FIELDS = {'CISPO_' + f.name.upper(): f.name for f in dataclasses.fields(C.CISPOConfig)}


def _config_or_refusal(make):
    try:
        return make().to_dict()
    except ValueError as error:
        return ('refused', str(error))


@settings(max_examples=300, deadline=None)
@given(_whole_space())
def test_configure_keywords_are_read_as_the_variables_are(drawn):
    """Every drawn set of variables, given to configure as keywords instead (the same strings, then the Python values
    they parse to), is accepted with the same settings or refused naming the same variable."""
    env = {k: v for k, v in drawn[0].items() if k in _FIELDS}
    keywords = {_FIELDS[k]: v for k, v in env.items()}
    by_env = _config_or_refusal(lambda: C.CISPOConfig.from_env(environ=env))
    by_keywords = _config_or_refusal(lambda: C.CISPOConfig.from_env(environ={}, **keywords))
    if isinstance(by_env, tuple):
        assert isinstance(by_keywords, tuple), (env, by_keywords)
        assert any(name in by_keywords[1] for name in env), by_keywords[1]
        return
    assert by_keywords == by_env
    typed = {name: by_env[name] for name in keywords}  # bools, numbers, None: as a Python caller writes them
    assert C.CISPOConfig.from_env(environ={}, **typed).to_dict() == by_env
    # Keywords win over variables; the variables they do not name still apply.
    for name, value in typed.items():
        others = {k: v for k, v in env.items() if _FIELDS[k] != name}
        assert C.CISPOConfig.from_env(environ=env, **{name: value}).to_dict() == by_env
        assert C.CISPOConfig.from_env(environ=others, **{name: value}).to_dict() == by_env
