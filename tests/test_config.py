"""Options from the environment and the Python API, and the checks the trainer makes before training starts."""

import json
import logging
import math

import pytest
from stubs import make_trainer

from cispo_swift import config as C
from cispo_swift.config import CISPOConfig


def test_defaults_are_the_paper_and_swift_conventions():
    cfg = CISPOConfig.from_env(environ={})
    assert (cfg.clip_mode, cfg.eps_low, cfg.mask, cfg.anchor, cfg.norm, cfg.fp32_lm_head) == (
        'absolute',
        None,
        False,
        'old',
        'token',
        False,
    )


def test_environment_variables_are_parsed():
    env = {
        'CISPO_CLIP_MODE': 'relative',
        'CISPO_EPS_LOW': '0.5',
        'CISPO_MASK': 'true',
        'CISPO_MASK_EPS_HIGH': '0.28',
        'CISPO_NORM': 'prompt',
        'CISPO_FP32_LM_HEAD': '1',
        'OTHER': 'x',
    }
    cfg = CISPOConfig.from_env(environ=env)
    assert cfg.clip_mode == 'relative' and cfg.eps_low == 0.5 and cfg.mask is True
    assert cfg.mask_eps_high == 0.28 and cfg.norm == 'prompt' and cfg.fp32_lm_head is True


def test_keyword_overrides_win_over_environment():
    cfg = CISPOConfig.from_env(environ={'CISPO_NORM': 'prompt'}, norm='sequence')
    assert cfg.norm == 'sequence'


@pytest.mark.parametrize(
    'env, message',
    [
        (
            {'CISPO_NORMS': 'token'},
            'Unknown CISPO option variable(s): CISPO_NORMS. Valid ones: CISPO_ALLOW_CONFIG_CHANGE, CISPO_ANCHOR',
        ),
        ({'CISPO_NORM': 'tokens'}, "CISPO_NORM='tokens' is not valid: it must be one of token, sequence, prompt"),
        ({'CISPO_CLIP_MODE': 'abs'}, 'must be one of absolute, relative'),
        ({'CISPO_ANCHOR': 'vllm'}, 'must be one of old, rollout'),
        ({'CISPO_MASK': 'maybe'}, "CISPO_MASK='maybe' is not a boolean"),
        ({'CISPO_MASK_EPS_LOW': 'wide'}, "CISPO_MASK_EPS_LOW='wide' is not a number"),
        ({'CISPO_MASK_EPS_LOW': '-0.1'}, 'CISPO_MASK_EPS_LOW=-0.1 must be a number ≥ 0'),
        ({'CISPO_CLIP_MODE': 'relative', 'CISPO_EPS_LOW': '1.5'}, 'eps_low must be in [0, 1]'),
    ],
)
def test_bad_options_fail_with_what_why_and_what_to_do(env, message):
    with pytest.raises(ValueError) as err:
        CISPOConfig.from_env(environ=env)
    assert message in str(err.value)


def test_unknown_keyword_option_is_a_type_error():
    with pytest.raises(TypeError, match='Unknown CISPO option'):
        CISPOConfig.from_env(environ={}, nrom='token')


def test_configure_sets_config_and_registers_trainer():
    from swift.trainers import TrainerFactory

    saved_mapping = TrainerFactory.TRAINER_MAPPING['grpo']
    try:
        cfg = C.configure(norm='sequence')
        assert C.current_config() is cfg and cfg.norm == 'sequence'
        assert TrainerFactory.TRAINER_MAPPING['grpo'] == 'cispo_swift.trainer.CISPOGRPOTrainer'
    finally:
        C._configured = None
        TrainerFactory.TRAINER_MAPPING['grpo'] = saved_mapping


def test_options_table_lists_every_option():
    table = C.options_table()
    for name in ('CISPO_CLIP_MODE', 'CISPO_EPS_LOW', 'CISPO_MASK', 'CISPO_ANCHOR', 'CISPO_NORM'):
        assert f'`{name}`' in table


# ---- trainer start-up checks ------------------------------------------------------------------------------


def test_unset_epsilon_high_uses_cap_five_not_swifts_epsilon():
    trainer = make_trainer(epsilon_high=None, epsilon=0.2)
    assert (trainer.cispo_resolved.lower, trainer.cispo_resolved.upper) == (None, 5.0)
    note = trainer.cispo_resolved.default_note
    assert 'instead of swift' in note and '0.2' in note
    assert trainer._cispo_summary().startswith(
        'cispo-swift: CISPO loss active: w = sg(min(r, 5.0)) [absolute, eps_low unset]'
    )


def test_unset_epsilon_high_relative_mode_gives_the_same_cap():
    trainer = make_trainer(CISPOConfig(clip_mode='relative'), epsilon_high=None)
    assert (trainer.cispo_resolved.lower, trainer.cispo_resolved.upper) == (None, 5.0)


@pytest.mark.parametrize(
    'eps_high, message',
    [
        (0.0, 'the bound must be a positive number'),
        (-1.0, 'the bound must be a positive number'),
        (0.28, 'every on-policy token (r = 1) would be down-weighted to 0.28'),
    ],
)
def test_bad_epsilon_high_is_refused(eps_high, message):
    with pytest.raises(ValueError) as err:
        make_trainer(epsilon_high=eps_high)
    assert message in str(err.value)


def test_small_epsilon_high_is_fine_in_relative_mode():
    trainer = make_trainer(CISPOConfig(clip_mode='relative', eps_low=0.2), epsilon_high=0.28)
    assert (trainer.cispo_resolved.lower, trainer.cispo_resolved.upper) == (pytest.approx(0.8), pytest.approx(1.28))


@pytest.mark.parametrize('loss_type', ['cispoo', 'CISPO', 'cipso', 'cisp'])
def test_misspelt_cispo_loss_type_is_refused(loss_type):
    with pytest.raises(ValueError) as err:
        make_trainer(loss_type=loss_type)
    assert f"--loss_type {loss_type!r} is not 'cispo'" in str(err.value) and 'Use --loss_type cispo' in str(err.value)


@pytest.mark.parametrize('loss_type', ['grpo', 'dapo', 'sapo', 'bnpo', 'dr_grpo', 'my_custom_loss'])
def test_other_loss_types_reach_swift_untouched(loss_type):
    trainer = make_trainer(loss_type=loss_type)
    assert trainer.cispo_active is False and not hasattr(trainer, 'cispo_config')


def test_other_loss_types_skip_cispo_set_up():
    trainer = make_trainer(loss_type='dapo', epsilon_high=0.28)
    assert trainer.cispo_active is False and trainer.epsilon_high == 0.28


def test_liger_is_refused_and_rollout_anchor_needs_vllm():
    with pytest.raises(ValueError, match='use_liger_kernel'):
        make_trainer(use_liger_kernel=True)
    with pytest.raises(ValueError, match='--use_vllm true'):
        make_trainer(CISPOConfig(anchor='rollout'), use_vllm=False)


def test_delta_warns_that_it_has_no_effect(caplog):
    from swift.utils import get_logger

    logger = get_logger()
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING):
            make_trainer(delta=3.0)
    finally:
        logger.removeHandler(caplog.handler)
    assert any('--delta 3.0 has no effect with --loss_type cispo' in r.getMessage() for r in caplog.records)


def test_effective_settings_are_json_serialisable():
    trainer = make_trainer()
    settings = json.loads(json.dumps(trainer.cispo_effective_settings()))
    assert settings['weight_upper'] == 5.0 and settings['norm'] == 'token'


def test_readme_options_table_is_current():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / 'README.md').read_text()
    assert C.options_table() in readme, 'README.md: paste the output of `python -m cispo_swift options`'


def test_readme_stays_short():
    """The README is the quickstart, the options and one line per result (at most 160 lines); the rest is in docs/."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / 'README.md').read_text()
    assert len(readme.splitlines()) <= 160, 'README.md: move long material to docs/ (results: docs/results.md)'


def test_sequence_weight_with_token_normalisation_warns(caplog):
    from swift.utils import get_logger

    logger = get_logger()
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING):
            make_trainer(importance_sampling_level='sequence')
            quiet = len(caplog.records)
            make_trainer(CISPOConfig(norm='sequence'), importance_sampling_level='sequence')
    finally:
        logger.removeHandler(caplog.handler)
    assert any('weighs a sequence by its length' in r.getMessage() for r in caplog.records)
    assert len(caplog.records) == quiet


# ---- configure(): the values of the variables, through the same parser ------------------------------------------


@pytest.fixture
def api(monkeypatch):
    """configure() with no CISPO_* variable set unless a test sets one; the registration undone afterwards."""
    import os

    from swift.trainers import TrainerFactory

    for key in [k for k in os.environ if k.upper().startswith('CISPO_')]:
        monkeypatch.delenv(key)
    monkeypatch.setitem(TrainerFactory.TRAINER_MAPPING, 'grpo', TrainerFactory.TRAINER_MAPPING['grpo'])
    yield monkeypatch
    C._configured = None


@pytest.mark.parametrize(
    'keyword, value, expected',
    [
        ('mask', 'no', False),
        ('mask', 'on', True),
        ('mask', True, True),
        ('mask', 0, False),
        ('check_finite', '0', False),
        ('check_finite', False, False),
        ('kl_budget', '0.1', 0.1),
        ('kl_budget', 0.1, 0.1),
        ('kl_budget', None, None),
        ('mask_eps_high', math.inf, math.inf),
        ('mask_eps_high', 'inf', math.inf),
        ('fused_chunk_size', 256, 256),
        ('fused_chunk_size', '256', 256),
        ('norm', 'prompt', 'prompt'),
    ],
)
def test_configure_takes_what_the_variable_takes(api, keyword, value, expected):
    cfg = C.configure(**{keyword: value})
    assert getattr(cfg, keyword) == expected and type(getattr(cfg, keyword)) is type(expected)
    if value is not None:
        assert getattr(CISPOConfig.from_env({f'CISPO_{keyword.upper()}': str(value)}), keyword) == expected


@pytest.mark.parametrize(
    'keyword, value, message',
    [
        ('fused_chunk_size', 1.5, "CISPO_FUSED_CHUNK_SIZE='1.5' is not an integer"),
        ('fused_chunk_size', True, "CISPO_FUSED_CHUNK_SIZE='true' is not an integer"),
        ('kl_budget', True, "CISPO_KL_BUDGET='true' is not a number"),
        ('kl_budget', math.nan, "CISPO_KL_BUDGET='nan': NaN is not a valid setting"),
        ('kl_budget', 0, 'CISPO_KL_BUDGET=0.0 must be a finite number > 0'),
        ('fused_logps', 2, "CISPO_FUSED_LOGPS='2' is not a boolean"),
        ('mask', 'maybe', "CISPO_MASK='maybe' is not a boolean"),
        ('norm', 'tokens', "CISPO_NORM='tokens' is not valid"),
        ('mask_eps_high', -1, 'CISPO_MASK_EPS_HIGH=-1.0 must be a number ≥ 0'),
    ],
)
def test_configure_refuses_what_the_variable_refuses_when_called(api, keyword, value, message):
    with pytest.raises(ValueError) as err:
        C.configure(**{keyword: value})
    assert message in str(err.value)
    assert C._configured is None  # nothing was set


def test_configure_refuses_other_types_and_a_positional_dict(api):
    with pytest.raises(TypeError, match=r"norm=\['prompt'\] \(list\): a CISPO option takes a str, bool or number"):
        C.configure(norm=['prompt'])
    with pytest.raises(TypeError, match=r'mask=None \(NoneType\)'):  # None unsets only options that can be unset
        C.configure(mask=None)
    with pytest.raises(TypeError, match=r'not dict .*configure\(\*\*options\)'):
        C.configure({'norm': 'prompt'})
    with pytest.raises(TypeError, match='Unknown CISPO option'):
        C.configure(nrom='token')


def test_configure_keywords_win_over_variables_and_the_others_still_apply(api):
    api.setenv('CISPO_NORM', 'sequence')
    api.setenv('CISPO_KL_BUDGET', '0.2')
    cfg = C.configure(mask=True)
    assert (cfg.mask, cfg.norm, cfg.kl_budget) == (True, 'sequence', 0.2)
    cfg = C.configure(norm='prompt', kl_budget=None)
    assert (cfg.norm, cfg.kl_budget) == ('prompt', None)
    api.setenv('CISPO_NORM', 'tokens')
    with pytest.raises(ValueError, match="CISPO_NORM='tokens' is not valid"):
        C.configure(mask=True)  # a bad variable is refused as the plugin file would refuse it
    # A CISPOConfig is taken as it is, and its arguments go through the same parser.
    assert (
        C.configure(CISPOConfig(mask='no', check_finite='0')).to_dict()
        == CISPOConfig(mask=False, check_finite=False).to_dict()
    )


def test_literals_beyond_the_float_range_are_refused_both_ways():
    for name in ('CISPO_KL_BUDGET', 'CISPO_MASK_EPS_HIGH', 'CISPO_EPS_LOW'):
        with pytest.raises(ValueError, match=f"{name}='1e-400' is below the float range and would read as 0"):
            CISPOConfig.from_env({name: '1e-400'})
    assert CISPOConfig.from_env({'CISPO_MASK_EPS_HIGH': '0e5'}).mask_eps_high == 0.0
    assert CISPOConfig.from_env({'CISPO_MASK_EPS_HIGH': '1e-320'}).mask_eps_high == 1e-320  # subnormal: kept
