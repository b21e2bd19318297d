"""End to end through the stock `swift rlhf` CLI on the tiny CPU model (slow: ~20 s a run)."""

import json

import pytest
from swift_run import check_ok, logged_steps, run_swift

pytestmark = pytest.mark.slow

CISPO_KEYS = (
    'cispo_clip_ratio',
    'cispo/clip_frac',
    'cispo/clip_frac_pos',
    'cispo/clip_frac_neg',
    'cispo/ppo_zero_grad_frac',
    'cispo/ratio_mean',
    'cispo/ratio_min',
    'cispo/ratio_max',
    'cispo/weight_mean',
)


def _same_losses(ours, builtin):
    assert len(ours) == len(builtin) > 0
    for a, b in zip(ours, builtin):
        assert a['loss'] == pytest.approx(b['loss'], rel=1e-5, abs=1e-7)
        assert a['grad_norm'] == pytest.approx(b['grad_norm'], rel=1e-5)


def test_plugin_logs_the_same_losses_as_builtin_cispo(tiny, tmp_path):
    ours = run_swift(tiny, tmp_path / 'ours')
    check_ok(ours)
    builtin = run_swift(tiny, tmp_path / 'builtin', plugin=False)
    check_ok(builtin)
    assert 'cispo-swift: CISPO loss active: w = sg(min(r, 5.0)) [absolute, eps_low unset]' in ours.stdout + ours.stderr
    ours_rows, builtin_rows = logged_steps(tmp_path / 'ours'), logged_steps(tmp_path / 'builtin')
    _same_losses(ours_rows, builtin_rows)
    # num_iterations 2: the second pass over a batch is off-policy, so the ratio moved away from 1.
    assert any(r['cispo/ratio_max'] > 1.0 + 1e-4 for r in ours_rows)
    for key in CISPO_KEYS:
        assert all(key in r for r in ours_rows), key
    settings = json.loads((tmp_path / 'ours' / 'cispo_config.json').read_text())
    assert settings['weight_upper'] == 5.0 and settings['norm'] == 'token'


def test_swift_features_compose_and_match_builtin(tiny, tmp_path):
    flags = [
        '--beta', '0.04',
        '--top_entropy_quantile', '0.5',
        '--log_entropy', 'true',
        '--overlong_filter', 'true',
        '--max_completion_length', '6',
        '--gradient_accumulation_steps', '2',
        '--steps_per_generation', '4',
        '--per_device_train_batch_size', '2',
        '--dynamic_sample', 'true',
        '--num_iterations', '2',
    ]  # fmt: skip
    ours = run_swift(tiny, tmp_path / 'ours', *flags)
    check_ok(ours)
    builtin = run_swift(tiny, tmp_path / 'builtin', *flags, plugin=False)
    check_ok(builtin)
    _same_losses(logged_steps(tmp_path / 'ours'), logged_steps(tmp_path / 'builtin'))


def test_cispo_options_run_full_parameter(tiny, tmp_path):
    env = {
        'CISPO_NORM': 'prompt',
        'CISPO_MASK': '1',
        'CISPO_MASK_EPS_HIGH': '0.28',
        'CISPO_CLIP_MODE': 'relative',
        'CISPO_EPS_LOW': '0.5',
    }
    result = run_swift(
        tiny, tmp_path / 'run', '--tuner_type', 'full', '--importance_sampling_level', 'sequence', '--epsilon_high',
        '4.0', env=env,
    )  # fmt: skip
    check_ok(result)
    rows = logged_steps(tmp_path / 'run')
    assert len(rows) == 4 and all(r['loss'] == r['loss'] for r in rows)  # finite, not NaN
    settings = json.loads((tmp_path / 'run' / 'cispo_config.json').read_text())
    assert settings['norm'] == 'prompt' and settings['mask'] is True and settings['clip_mode'] == 'relative'
    assert settings['weight_lower'] == 0.5 and settings['weight_upper'] == 5.0


def test_fp32_lm_head_with_bf16_model(tiny, tmp_path):
    flags = ['--torch_dtype', 'bfloat16', '--use_cpu', 'true']
    result = run_swift(tiny, tmp_path / 'run', *flags, env={'CISPO_FP32_LM_HEAD': '1'})
    check_ok(result)
    assert 'fp32_lm_head=1' in result.stdout + result.stderr
    assert len(logged_steps(tmp_path / 'run')) == 4


@pytest.mark.parametrize(
    'flags, env, message',
    [
        (['--epsilon_high', '0.5'], {}, 'every on-policy token (r = 1) would be down-weighted to 0.5'),
        (['--epsilon_high', '0'], {}, 'the bound must be a positive number'),
        (['--loss_type', 'cispoo'], {}, "--loss_type 'cispoo' is not 'cispo'"),
        ([], {'CISPO_NORM': 'tokens'}, "CISPO_NORM='tokens' is not valid"),
        ([], {'CISPO_NROM': 'token'}, 'Unknown CISPO option variable(s): CISPO_NROM'),
        (['--epsilon_high', 'nan'], {}, '--epsilon_high nan: NaN is not a valid setting'),
    ],
    ids=['cap-below-1', 'cap-zero', 'unknown-loss-type', 'bad-option', 'unknown-option', 'cap-nan'],
)
def test_bad_input_fails_before_training_with_a_clear_message(tiny, tmp_path, flags, env, message):
    """Refused while swift parses its arguments: exit status 2, one block, no traceback, no model loaded."""
    result = run_swift(tiny, tmp_path / 'run', *flags, env=env)
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert 'cispo-swift: refusing to start (checked while swift parsed its arguments' in output
    assert message in output and 'Traceback' not in output
    assert 'Loading model from' not in output and 'Successfully imported external_plugins' not in output
    assert not (tmp_path / 'run' / 'logging.jsonl').exists()


def test_cispo_options_with_another_loss_type_warn_and_swift_trains(tiny, tmp_path):
    result = run_swift(tiny, tmp_path / 'run', '--loss_type', 'grpo', '--max_steps', '1', env={'CISPO_NORM': 'prompt'})
    check_ok(result)
    output = result.stdout + result.stderr
    assert "CISPO_NORM set, but --loss_type is 'grpo'" in output and 'CISPO loss active' not in output
    assert len(logged_steps(tmp_path / 'run')) == 1


def test_fused_logps_log_the_same_losses(tiny, tmp_path):
    # No --top_entropy_quantile here: its mask compares entropies with their own quantile, so a last-bit
    # difference flips the token sitting at the threshold (the entropies themselves are compared below).
    flags = ['--log_entropy', 'true']
    env = {'CISPO_FUSED_LOGPS': '1', 'CISPO_FUSED_CHUNK_SIZE': '7'}
    fused = run_swift(tiny, tmp_path / 'fused', *flags, env=env)
    check_ok(fused)
    assert 'fused_logps=1' in fused.stdout + fused.stderr and 'has no effect' not in fused.stdout + fused.stderr
    builtin = run_swift(tiny, tmp_path / 'builtin', *flags, plugin=False)
    check_ok(builtin)
    fused_rows, builtin_rows = logged_steps(tmp_path / 'fused'), logged_steps(tmp_path / 'builtin')
    assert len(fused_rows) == len(builtin_rows) == 4
    for a, b in zip(fused_rows, builtin_rows):
        # Chunked float32 sums differ from swift's full log-softmax in the last bits only.
        assert a['loss'] == pytest.approx(b['loss'], rel=1e-4, abs=1e-6)
        assert a['grad_norm'] == pytest.approx(b['grad_norm'], rel=1e-4)
        assert a['entropy/mean'] == pytest.approx(b['entropy/mean'], rel=1e-4)
