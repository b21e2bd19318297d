"""Resume checks without a run: the trainer compares the CISPO settings saved in a checkpoint with its own."""

import json

import pytest
from stubs import make_trainer

from cispo_swift.config import CISPOConfig
from cispo_swift.resume import CONFIG_FILE


def _checkpoint(tmp_path, settings=None, global_step=4):
    """A checkpoint directory as `_save_checkpoint` leaves it (settings file and trainer state only)."""
    ckpt = tmp_path / f'checkpoint-{global_step}'
    ckpt.mkdir()
    if settings is not None:
        (ckpt / CONFIG_FILE).write_text(json.dumps(settings))
    (ckpt / 'trainer_state.json').write_text(json.dumps({'global_step': global_step}))
    return str(ckpt)


def _resume(checkpoint, cispo=None, **args):
    trainer = make_trainer(cispo, resume_from_checkpoint=checkpoint, steps_per_generation=1, **args)
    trainer._check_resume()
    return trainer


def test_same_settings_resume(tmp_path, swift_log):
    saved = make_trainer(CISPOConfig(norm='prompt'), beta=0.04).cispo_effective_settings()
    _resume(_checkpoint(tmp_path, saved), CISPOConfig(norm='prompt'), beta=0.04)
    assert 'with the CISPO settings it was saved with' in swift_log.text


def test_changed_settings_are_refused_with_old_new_and_how_to_proceed(tmp_path):
    saved = make_trainer(CISPOConfig(norm='token'), beta=0.04).cispo_effective_settings()
    with pytest.raises(ValueError) as err:
        _resume(_checkpoint(tmp_path, saved), CISPOConfig(norm='prompt', clip_mode='relative', eps_low=0.2), beta=0.0)
    message = str(err.value)
    assert "norm: 'token' in the checkpoint, 'prompt' now" in message
    assert "clip_mode: 'absolute' in the checkpoint, 'relative' now" in message
    assert 'beta: 0.04 in the checkpoint, 0.0 now' in message
    assert 'weight_lower: None in the checkpoint, 0.8 now' in message
    # How to resume as trained, and how to go on with the change.
    for hint in ('CISPO_NORM=token', 'CISPO_CLIP_MODE=absolute', 'unset CISPO_EPS_LOW', '--beta 0.04'):
        assert hint in message
    assert 'CISPO_ALLOW_CONFIG_CHANGE=1' in message
    assert 'epsilon_high' not in message  # unchanged settings are not listed


def test_allow_config_change_resumes_with_a_warning(tmp_path, swift_log):
    saved = make_trainer(CISPOConfig(norm='token')).cispo_effective_settings()
    cfg = CISPOConfig.from_env(environ={'CISPO_ALLOW_CONFIG_CHANGE': '1', 'CISPO_NORM': 'sequence'})
    _resume(_checkpoint(tmp_path, saved), cfg)
    assert "norm: 'token' in the checkpoint, 'sequence' now" in swift_log.text
    assert 'Continuing, because CISPO_ALLOW_CONFIG_CHANGE=1' in swift_log.text


def test_the_override_itself_is_not_a_change(tmp_path):
    saved = make_trainer(CISPOConfig(allow_config_change=True)).cispo_effective_settings()
    _resume(_checkpoint(tmp_path, saved), CISPOConfig())


def test_the_finite_check_is_not_a_change(tmp_path, swift_log):
    """CISPO_CHECK_FINITE only stops a run whose loss or gradient is already NaN/inf: the loss is the same."""
    saved = make_trainer(CISPOConfig(check_finite=True)).cispo_effective_settings()
    _resume(_checkpoint(tmp_path, saved), CISPOConfig(check_finite=False))
    assert 'with the CISPO settings it was saved with' in swift_log.text


def test_an_allowed_change_is_warned_about_once(tmp_path, swift_log):
    """The plugin file compares at argument parsing and the trainer again at start: one warning, not two."""
    saved = make_trainer(CISPOConfig(norm='token')).cispo_effective_settings()
    checkpoint = _checkpoint(tmp_path, saved)
    cfg = CISPOConfig(norm='sequence', allow_config_change=True)
    _resume(checkpoint, cfg)
    _resume(checkpoint, cfg)
    assert swift_log.text.count('Continuing, because CISPO_ALLOW_CONFIG_CHANGE=1') == 1


def test_resuming_a_cispo_checkpoint_with_another_loss_type_warns(tmp_path, swift_log):
    """Not a CISPO run: swift's behaviour is kept (no refusal), the log says the loss changes."""
    checkpoint = _checkpoint(tmp_path, make_trainer().cispo_effective_settings())
    _resume(checkpoint, loss_type='grpo')
    assert 'was trained with --loss_type cispo; this run resumes it with --loss_type grpo' in swift_log.text


def test_checkpoint_without_settings_warns(tmp_path, swift_log):
    _resume(_checkpoint(tmp_path, None))
    assert f'has no {CONFIG_FILE}' in swift_log.text
    _resume(_checkpoint(tmp_path, None, global_step=5), loss_type='grpo')  # not a CISPO run: nothing to check
    assert swift_log.text.count(f'has no {CONFIG_FILE}') == 1


@pytest.mark.parametrize('step, warns', [(4, False), (3, True)])
def test_resume_in_the_middle_of_a_generation_batch_warns(tmp_path, swift_log, step, warns):
    # num_iterations 2: a new generation batch starts every 2 steps.
    saved = make_trainer(num_iterations=2).cispo_effective_settings()
    _resume(_checkpoint(tmp_path, saved, global_step=step), num_iterations=2)
    assert ('in the middle of a generation batch' in swift_log.text) is warns


def test_no_resume_checks_nothing(tmp_path):
    _resume(None, CISPOConfig(norm='prompt'))


def test_resume_from_a_missing_directory_or_a_run_directory_is_refused(tmp_path):
    with pytest.raises(ValueError, match='no such directory'):
        _resume(str(tmp_path / 'missing'))
    run = tmp_path / 'run'
    for step in (2, 10):
        (run / 'v0-20261126' / f'checkpoint-{step}').mkdir(parents=True)
    with pytest.raises(ValueError) as err:
        _resume(str(run))
    message = str(err.value)
    assert 'is not a checkpoint: it has no trainer_state.json' in message
    assert f'the newest is {run}/v0-20261126/checkpoint-10' in message


def test_resume_from_a_file_names_the_directory_that_holds_it(tmp_path):
    checkpoint = _checkpoint(tmp_path, make_trainer().cispo_effective_settings())
    with pytest.raises(ValueError) as err:
        _resume(f'{checkpoint}/trainer_state.json')
    assert 'is a file; a checkpoint is a directory' in str(err.value) and f'holds it: {checkpoint}.' in str(err.value)
    assert 'no such directory' not in str(err.value)
