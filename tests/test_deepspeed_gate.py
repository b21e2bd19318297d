"""CISPO_KL_BUDGET and CISPO_SKIP_NO_SIGNAL inside DeepSpeed's engine (cispo_swift/deepspeed_gate.py): the DeepSpeed
and accelerate code the gate relies on, the settings refused at argument parsing, and end to end with two gloo
processes that a skipped step under ZeRO-1/2/3 leaves the weights alone and the next step logs the loss of the plain
two-process run."""

import inspect
import json
from pathlib import Path

import pytest

from cispo_swift import deepspeed_gate as G

HERE = Path(__file__).resolve().parent
WEIGHTS_PLUGIN = str(HERE / 'weights_trace_plugin.py')
SIGNAL_PLUGIN = str(HERE / 'signal_reward_plugin.py')


def test_deepspeed_code_the_gate_relies_on_is_unchanged():
    """DeepSpeed 0.19.8 / accelerate 1.15: a ZeRO optimizer calls `_update_scale(self.overflow)` right before it
    tests `self.overflow` and clears its gradients; the engine reads `optimizer.overflow` after `optimizer.step()`;
    accelerate's backward steps the engine; reduced gradients wait in `averaged_gradients`."""
    pytest.importorskip('deepspeed')  # the 'deepspeed' extra (setup.sh installs it; the ms-swift 4.5.3 venv has not)
    from accelerate.utils.deepspeed import DeepSpeedEngineWrapper, DeepSpeedOptimizerWrapper
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    stage12 = inspect.getsource(DeepSpeedZeroOptimizer.step)
    assert 'self._update_scale(self.overflow)\n        if not self.overflow:' in stage12
    assert 'if self.overflow:' in stage12.split('self._update_scale(self.overflow)')[1]
    assert 'self.averaged_gradients[k] = None' in stage12
    cleanup = inspect.getsource(DeepSpeedZeroOptimizer_Stage3._loss_scale_update_and_overflow_cleanup)
    assert 'self._update_scale(self.overflow)\n\n        if self.overflow:' in cleanup
    stage3 = inspect.getsource(DeepSpeedZeroOptimizer_Stage3)  # its `step` is wrapped for NVTX
    assert 'if self._loss_scale_update_and_overflow_cleanup():' in stage3
    assert 'self.averaged_gradients[i] = [' in stage3
    take = inspect.getsource(DeepSpeedEngine._take_model_step)
    assert 'self.optimizer.step()' in take and 'overflow = self.optimizer.overflow' in take
    assert 'self.engine.step()' in inspect.getsource(DeepSpeedEngineWrapper.backward)
    assert 'return self.optimizer.overflow' in inspect.getsource(DeepSpeedOptimizerWrapper.step_was_skipped.fget)


@pytest.mark.parametrize(
    'deepspeed, settings',
    [
        ('zero0', (0, False)),
        ('zero1', (1, False)),
        ('zero2', (2, False)),
        ('zero3', (3, False)),
        ('zero3_offload', (3, True)),
        ({'zero_optimization': {'stage': 2, 'offload_optimizer': {'device': 'cpu'}}}, (2, True)),
        ('{"zero_optimization": {"stage": 1}}', (1, False)),
        ('/no/such/file.json', None),
    ],
)
def test_zero_settings_of_the_deepspeed_argument(deepspeed, settings):
    assert G.zero_settings(deepspeed) == settings


def test_settings_the_gate_cannot_serve_are_refused():
    with pytest.raises(ValueError, match='CISPO_KL_BUDGET=0.1 with --deepspeed at ZeRO stage 0'):
        G.check_settings('zero0', 0.1, False)
    with pytest.raises(ValueError, match='CISPO_SKIP_NO_SIGNAL=1 with DeepSpeed optimizer offload'):
        G.check_settings('zero3_offload', None, True)
    G.check_settings('zero3_offload', 0.1, False)  # the budget needs no gradients: it works with offload
    for preset in ('zero1', 'zero2', 'zero3'):
        G.check_settings(preset, 0.1, True)
    G.check_settings('zero0', None, False)


def test_partitions_are_read_and_an_empty_optimizer_is_not_taken_for_zero():
    import torch

    class Opt:
        averaged_gradients = {0: torch.zeros(3), 1: [torch.zeros(2), None]}

    assert G.partitioned_gradient_is_zero(Opt())
    Opt.averaged_gradients[1][0] = torch.tensor([0.0, 1e-30])
    assert not G.partitioned_gradient_is_zero(Opt())
    Opt.averaged_gradients = {0: None}
    with pytest.raises(RuntimeError, match='found no gradient partitions'):
        G.partitioned_gradient_is_zero(Opt())


# ---- end to end, two gloo processes ------------------------------------------------------------------------------


def _run(tiny, out, *flags_, env):
    from swift_run import ROW_SAMPLING_PLUGIN, SCALE_FLAGS, check_ok, logged_steps, run_swift

    # As tests/test_zero.py: per-row sampling, so that the plain and the ZeRO runs draw the same completions.
    flags = [*SCALE_FLAGS, '--fp16', 'false', '--beta', '0', '--per_device_train_batch_size', '2', '--stop_words', 'e']
    flags += [*flags_, '--callbacks', 'cispo_test_weights']
    plugins = [ROW_SAMPLING_PLUGIN, WEIGHTS_PLUGIN, SIGNAL_PLUGIN]
    result = run_swift(tiny, out, *flags, nproc=2, extra_plugins=plugins, env=env)
    check_ok(result, exit_abort_ok=True)
    sums = {r['step']: r['checksum'] for r in map(json.loads, (out / 'weights.jsonl').read_text().splitlines())}
    return logged_steps(out), [sums[s] != sums[s - 1] for s in range(1, len(sums))]


BUDGET = ('--num_iterations', '3')


@pytest.fixture(scope='module')
def budget_plain(tiny, tmp_path_factory):
    return _run(tiny, tmp_path_factory.mktemp('plain') / 'run', *BUDGET, env={'CISPO_KL_BUDGET': '1e-12'})


@pytest.mark.slow
@pytest.mark.parametrize('stage', ['zero2', 'zero3'])
def test_budget_skips_inside_the_engine(tiny, tmp_path, budget_plain, stage):
    """--num_iterations 3: the 2nd use of the first batch has drifted past the budget and is skipped inside the
    engine, the 3rd use never reaches it; the weights and the learning-rate schedule follow the plain run, so the next
    batch's step and its metrics equal the plain run's."""
    plain, plain_moved = budget_plain
    rows, moved = _run(tiny, tmp_path / 'run', '--deepspeed', stage, *BUDGET, env={'CISPO_KL_BUDGET': '1e-12'})
    skipped = [r['cispo/kl_budget_skipped'] for r in rows]
    assert skipped == [r['cispo/kl_budget_skipped'] for r in plain] == [0.0, 1.0, 1.0, 0.0]
    assert moved == plain_moved == [True, False, False, True]
    for ours, ref in zip(rows, plain):
        for key in ('loss', 'learning_rate', 'reward'):
            if key in ref:
                assert ours[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), key
        if 'cispo/approx_kl' in ref:
            assert ours['cispo/approx_kl'] == pytest.approx(ref['cispo/approx_kl'], rel=1e-4, abs=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize('stage', ['zero1', 'zero3'])  # ZeRO-2 has ZeRO-1's optimizer class
def test_no_signal_steps_are_skipped_inside_the_engine(tiny, tmp_path, stage):
    flags = ['--deepspeed', stage, '--num_iterations', '1', '--reward_funcs', 'cispo_test_alternating_reward']
    flags += ['--weight_decay', '0.1']
    rows, moved = _run(tiny, tmp_path / 'run', *flags, env={'CISPO_SKIP_NO_SIGNAL': '1'})
    assert [r['cispo/no_signal_skipped'] for r in rows] == [1.0, 0.0, 1.0, 0.0]
    assert moved == [False, True, False, True]
