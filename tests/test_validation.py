"""Bad input is refused while swift parses its arguments (the plugin file), with the same checks at trainer start;
settings without effect are warned about; the fuzzed option space either refuses with a message naming the setting
or trains a step with finite loss and gradients. docs/bad_inputs.md is generated here (UPDATE_DOCS=1 rewrites it)."""

import logging
import math
import os
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
    ('--epsilon_high inf', {}, {'epsilon_high': math.inf}, 'ok', ''),
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
    ('CISPO_MASK_EPS_HIGH=inf', {'CISPO_MASK': '1', 'CISPO_MASK_EPS_HIGH': 'inf'}, {}, 'ok', ''),
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


def test_bad_inputs_table_in_docs_is_current(swift_log):
    rows = ['| input | outcome | message |', '|---|---|---|']
    for label, env, flags, _, _ in BAD_INPUTS:
        outcome, text = _outcome(env, swift_log, **flags)
        text = text.replace('|', '\\|').replace('\n', ' ')
        rows.append(f'| `{label}` | {outcome} | {text} |')
    content = (
        '# Bad inputs and what cispo-swift does with them\n\n'
        'Checked when swift imports the plugin file during argument parsing (before any model loads) and again at '
        'trainer start. "refused": the run stops with this message and exit status 2; "warning": logged, the run '
        'goes on; "ok": a valid setting. Generated by `tests/test_validation.py` '
        '(`UPDATE_DOCS=1 pytest tests/test_validation.py -k docs` rewrites it).\n\n' + '\n'.join(rows) + '\n'
    )
    if os.environ.get('UPDATE_DOCS') == '1':
        BAD_INPUTS_DOC.write_text(content)
    assert BAD_INPUTS_DOC.read_text() == content, 'docs/bad_inputs.md is stale: rerun this test with UPDATE_DOCS=1'


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


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_settings())
def test_fuzzed_settings_are_refused_by_name_or_train_a_finite_step(swift_log, drawn):
    env, flags = drawn
    outcome, text = _outcome(env, swift_log, **flags)
    if outcome == 'refused':
        named = [k for k in env if k in text] + [f'--{k}' for k in flags if f'--{k}' in text]
        assert named, f'the refusal names none of the given settings: {text}'
        return
    cfg = C.CISPOConfig.from_env(environ=env)
    logits, ids, batch, entropies = make_batch(1)
    trainer = attach_logps(make_trainer(cfg, **flags), logits, ids, entropies)
    if cfg.norm != 'token':
        trainer.split_by_mini_batches = lambda samples: [samples]
        samples = [SimpleNamespace(prompt_id=i // 2) for i in range(batch.completion_mask.shape[0])]
        attach_group_counts(trainer, samples, [{'grpo_batch': batch}])
    loss, _ = our_loss(trainer, batch)
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(loss) and torch.isfinite(grad).all(), (env, flags)
