"""End to end through `swift rlhf` on the tiny CPU model: two processes against one, and checkpoint/resume.

Slow: each run is ~15-25 s, mostly start-up.
"""

import json

import pytest
import torch
from safetensors.torch import load_file
from swift_run import ROW_SAMPLING_PLUGIN, SCALE_FLAGS, check_ok, logged_steps, run_swift

pytestmark = pytest.mark.slow

CISPO_KEYS = (
    'cispo_clip_ratio',
    'cispo/clip_frac',
    'cispo/ppo_zero_grad_frac',
    'cispo/ratio_mean',
    'cispo/ratio_min',
    'cispo/ratio_max',
    'cispo/weight_mean',
)


def test_two_processes_log_the_losses_of_one_process(tiny, tmp_path):
    """8 sequences a step on one process, or 4 on each of two (gloo): same logged loss, grad norm and metrics.

    The completions must be the same for that, but transformers samples each rank's batch with one multinomial
    call from an RNG seeded `seed + rank`; row_sampling_plugin.py gives every sequence its own generator instead.
    `--stop_words e` ends completions at different lengths, so the ranks hold different numbers of tokens.
    """
    flags = [*SCALE_FLAGS, '--max_steps', '4', '--save_strategy', 'no', '--stop_words', 'e']
    one = run_swift(
        tiny, tmp_path / 'one', *flags, '--per_device_train_batch_size', '8', extra_plugins=[ROW_SAMPLING_PLUGIN]
    )
    check_ok(one)
    two = run_swift(
        tiny,
        tmp_path / 'two',
        *flags,
        '--per_device_train_batch_size',
        '4',
        nproc=2,
        extra_plugins=[ROW_SAMPLING_PLUGIN],
    )
    check_ok(two, exit_abort_ok=True)
    assert 'world_size: 2' in two.stdout + two.stderr
    one_rows, two_rows = logged_steps(tmp_path / 'one'), logged_steps(tmp_path / 'two')
    assert len(one_rows) == len(two_rows) == 4
    for a, b in zip(one_rows, two_rows):
        for key in ('loss', 'grad_norm', 'cispo/kl', *CISPO_KEYS):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a['global_step/max_steps'], key)
        if 'reward' in a:  # steps that generated
            assert b['reward'] == pytest.approx(a['reward'], rel=1e-6)
            assert b['completions/mean_length'] == a['completions/mean_length']
    # Off-policy steps (r ≠ 1) and completions of different lengths were part of the comparison.
    assert any(abs(r['cispo/ratio_mean'] - 1.0) > 1e-3 for r in one_rows)
    assert any(r.get('completions/min_length', 8) < r.get('completions/max_length', 8) for r in one_rows)


# swift's default LoRA tuning (its dropout draws from the RNG state that checkpoints carry), 2 prompts a step.
RESUME_FLAGS = (
    *SCALE_FLAGS, '--tuner_type', 'lora', '--per_device_train_batch_size', '8', '--max_steps', '4',
    '--save_strategy', 'steps', '--save_steps', '1',
)  # fmt: skip


@pytest.fixture(scope='module')
def uninterrupted(tiny, tmp_path_factory):
    """Run A: 4 steps, a checkpoint after each."""
    out = tmp_path_factory.mktemp('resume') / 'A'
    check_ok(run_swift(tiny, out, *RESUME_FLAGS))
    return out


def _resume(tiny, out, checkpoint, env=None):
    return run_swift(tiny, out, *RESUME_FLAGS, '--resume_from_checkpoint', str(checkpoint), env=env)


def test_resume_at_a_generation_boundary_is_exact(tiny, uninterrupted, tmp_path):
    """num_iterations 2: a generation batch is used for steps 1-2 and 3-4. Resuming from checkpoint-2 ends with
    bit-identical weights and logs the same steps 3-4 as the run that was never stopped."""
    settings = json.loads((uninterrupted / 'cispo_config.json').read_text())
    for step in range(1, 5):
        assert json.loads((uninterrupted / f'checkpoint-{step}' / 'cispo_config.json').read_text()) == settings
    result = _resume(tiny, tmp_path / 'B', uninterrupted / 'checkpoint-2')
    check_ok(result)
    assert 'with the CISPO settings it was saved with' in result.stdout + result.stderr
    resumed, reference = logged_steps(tmp_path / 'B'), logged_steps(uninterrupted)[2:]
    assert [r['global_step/max_steps'] for r in resumed] == ['3/4', '4/4']
    for a, b in zip(reference, resumed):
        for key in ('loss', 'grad_norm', 'cispo/kl', *CISPO_KEYS):
            assert b[key] == a[key], (a['global_step/max_steps'], key)
    assert resumed[1]['cispo/ratio_mean'] != 1.0
    final_a = load_file(uninterrupted / 'checkpoint-4' / 'adapter_model.safetensors')
    final_b = load_file(tmp_path / 'B' / 'checkpoint-4' / 'adapter_model.safetensors')
    assert final_a.keys() == final_b.keys()
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    initial = load_file(uninterrupted / 'checkpoint-1' / 'adapter_model.safetensors')
    assert not all(torch.equal(initial[k], final_a[k]) for k in initial)


def test_resume_in_the_middle_of_a_generation_batch_regenerates(tiny, uninterrupted, tmp_path):
    """swift does not checkpoint the generation batch being reused: resumed at step 1, the run generates anew at
    step 2 (where run A reused step 1's completions) and drifts away. The trainer says so before training."""
    result = _resume(tiny, tmp_path / 'B', uninterrupted / 'checkpoint-1')
    check_ok(result)
    assert 'Resuming from step 1, in the middle of a generation batch' in result.stdout + result.stderr
    resumed, reference = logged_steps(tmp_path / 'B'), logged_steps(uninterrupted)
    assert 'reward' not in reference[1] and 'reward' in resumed[0]  # step 2: reused in A, generated after resume
    assert resumed[-1]['loss'] != reference[-1]['loss']


def test_resume_with_other_cispo_settings_is_refused_before_training(tiny, uninterrupted, tmp_path):
    result = _resume(tiny, tmp_path / 'B', uninterrupted / 'checkpoint-2', env={'CISPO_NORM': 'sequence'})
    assert result.returncode == 2  # refused while swift parses its arguments
    assert 'model_parameter_info' not in result.stdout + result.stderr  # before the model loads
    assert "norm: 'token' in the checkpoint, 'sequence' now" in result.stderr
    assert 'CISPO_NORM=token' in result.stderr and 'CISPO_ALLOW_CONFIG_CHANGE=1' in result.stderr
    assert not (tmp_path / 'B' / 'logging.jsonl').exists()  # no training step ran


def test_resume_from_a_damaged_settings_file_is_refused_naming_it(tiny, uninterrupted, tmp_path):
    import shutil

    damaged = tmp_path / 'checkpoint-2'
    shutil.copytree(uninterrupted / 'checkpoint-2', damaged)
    (damaged / 'cispo_config.json').write_text('{\n  "norm": ')
    result = _resume(tiny, tmp_path / 'B', damaged)
    assert result.returncode == 2 and 'model_parameter_info' not in result.stdout + result.stderr
    assert f'{damaged}/cispo_config.json cannot be read' in result.stderr and 'damaged' in result.stderr
