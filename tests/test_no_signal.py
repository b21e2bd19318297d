"""CISPO_SKIP_NO_SIGNAL: an optimizer step whose gradient is exactly zero leaves the weights, Adam's state and its
step counter alone; and CISPO_KL_BUDGET's spent generation batch costs no forward or backward. Unit tests of the
decision, then end to end through `swift rlhf` on the tiny model: one process, gradient accumulation, 2-process DDP.
"""

import json
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cispo_swift import guards
from cispo_swift.config import CISPOConfig
from cispo_swift.metrics import KLBudget

HERE = Path(__file__).resolve().parent
SIGNAL_PLUGIN = str(HERE / 'signal_reward_plugin.py')
WEIGHTS_PLUGIN = str(HERE / 'weights_trace_plugin.py')
PASSES_PLUGIN = str(HERE / 'pass_count_plugin.py')


def _model(*grads):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    for p, g in zip(model.parameters(), grads):
        p.grad = None if g is None else torch.full_like(p, g)
    return model


@pytest.mark.parametrize(
    'grads, zero',
    [
        ((), True),  # no gradient at all (no loss tokens)
        ((0.0, 0.0, 0.0, 0.0), True),
        ((0.0, None, -0.0, 0.0), True),
        ((0.0, 0.0, 1e-30, 0.0), False),
        ((0.0, float('nan'), 0.0, 0.0), False),  # NaN is not "no signal": CISPO_CHECK_FINITE stops on it
    ],
)
def test_gradient_is_zero(grads, zero):
    assert guards.gradient_is_zero(_model(*grads)) is zero


def _trainer(model, skip_no_signal=True, budget=None, check_finite=True):
    return SimpleNamespace(
        model=model,
        cispo_config=CISPOConfig(skip_no_signal=skip_no_signal, check_finite=check_finite),
        cispo_budget=budget,
        _metrics={'train': defaultdict(list)},
        state=SimpleNamespace(global_step=3),
        accelerator=SimpleNamespace(process_index=0),
    )


def test_skip_decision_records_one_value_per_step_and_the_budget_comes_first():
    budget = KLBudget(0.05)
    trainer = _trainer(_model(0.0, 0.0, 0.0, 0.0), budget=budget)
    assert guards.skip_decision(trainer) is True  # no signal
    trainer.model = _model(0.0, 1.0, 0.0, 0.0)
    assert guards.skip_decision(trainer) is False  # signal, budget not spent
    budget.observe({'approx_kl_sum': 1.0, 'tokens': 1.0})
    assert guards.skip_decision(trainer) is True  # skipped for the drift, not for want of signal
    bucket = trainer._metrics['train']
    assert bucket[guards.NO_SIGNAL_KEY] == [1.0, 0.0, 0.0]
    assert bucket['cispo/kl_budget_skipped'] == [0.0, 0.0, 1.0]


def test_skip_decision_without_the_option_logs_nothing_and_checks_finiteness():
    trainer = _trainer(_model(0.0, 0.0, 0.0, 0.0), skip_no_signal=False)
    assert guards.skip_decision(trainer) is False
    assert guards.NO_SIGNAL_KEY not in trainer._metrics['train']
    trainer.model = _model(0.0, float('inf'), 0.0, 0.0)
    with pytest.raises(FloatingPointError, match='Non-finite gradient at global step 3'):
        guards.skip_decision(trainer)


def test_option_parses_like_every_boolean():
    assert CISPOConfig.from_env({'CISPO_SKIP_NO_SIGNAL': '1'}).skip_no_signal is True
    assert CISPOConfig.from_env({}).skip_no_signal is False
    with pytest.raises(ValueError, match='CISPO_SKIP_NO_SIGNAL'):
        CISPOConfig.from_env({'CISPO_SKIP_NO_SIGNAL': 'maybe'})


def test_skip_under_deepspeed_needs_readable_gradients():
    from test_kl_budget import _Args

    from cispo_swift import config as C

    args = _Args()
    args.deepspeed = 'zero3_offload'
    with pytest.raises(ValueError, match='CISPO_SKIP_NO_SIGNAL=1 with DeepSpeed optimizer offload'):
        C.check_run(args, CISPOConfig(skip_no_signal=True))
    for deepspeed in (None, 'zero1', 'zero2', 'zero3'):
        args.deepspeed = deepspeed
        C.check_run(args, CISPOConfig(skip_no_signal=True))


# ---- end to end ---------------------------------------------------------------------------------------------------

FULL = ['--tuner_type', 'full', '--weight_decay', '0.1', '--beta', '0']  # no KL term: advantages alone carry signal


def _checksums(out: Path):
    rows = [json.loads(x) for x in (out / 'weights.jsonl').read_text().splitlines()]
    return {r['step']: r['checksum'] for r in rows}


def _moved(out: Path, steps: int):
    sums = _checksums(out)
    return [sums[s] != sums[s - 1] for s in range(1, steps + 1)]


def _saved_weights(out: Path):
    from safetensors.torch import load_file

    (ckpt,) = sorted(out.glob('checkpoint-*'))
    return load_file(str(ckpt / 'model.safetensors'))


@pytest.mark.slow
@pytest.mark.parametrize('skip', [True, False])
def test_constant_reward_leaves_the_saved_weights_unchanged_only_with_the_skip(tiny, tmp_path, skip):
    from safetensors.torch import load_file
    from swift_run import check_ok, logged_steps, run_swift

    out = tmp_path / 'run'
    flags = [*FULL, '--reward_funcs', 'cispo_test_constant_reward', '--num_iterations', '1', '--max_steps', '3']
    flags += ['--save_strategy', 'steps', '--save_steps', '3', '--save_only_model', 'true']
    env = {'CISPO_SKIP_NO_SIGNAL': '1'} if skip else {}
    result = run_swift(tiny, out, *flags, extra_plugins=[SIGNAL_PLUGIN], env=env)
    check_ok(result)
    rows = logged_steps(out)
    assert [r['grad_norm'] for r in rows] == [0.0] * 3
    initial = load_file(str(Path(tiny['model']) / 'model.safetensors'))
    saved = _saved_weights(out)
    changed = [name for name in initial if not torch.equal(initial[name], saved[name])]
    if skip:
        assert 'skip_no_signal=1' in result.stdout + result.stderr
        assert [r['cispo/no_signal_skipped'] for r in rows] == [1.0] * 3
        assert changed == []
    else:
        assert 'cispo/no_signal_skipped' not in rows[0]
        assert changed  # weight decay moved the weights on steps without any signal


@pytest.mark.slow
@pytest.mark.parametrize('nproc, accumulation', [(1, 2), (2, 1)])  # one process without GA: the constant test
def test_only_the_steps_without_signal_are_skipped(tiny, tmp_path, nproc, accumulation):
    from swift_run import SCALE_FLAGS, check_ok, logged_steps, run_swift

    out = tmp_path / 'run'
    per_device = 4 // (accumulation * nproc)  # one generation batch of 4 completions (one group) per step
    flags = [*SCALE_FLAGS, '--weight_decay', '0.1', '--beta', '0', '--reward_funcs', 'cispo_test_alternating_reward']
    flags += ['--num_iterations', '1', '--max_steps', '4', '--callbacks', 'cispo_test_weights']
    flags += ['--gradient_accumulation_steps', str(accumulation), '--per_device_train_batch_size', str(per_device)]
    result = run_swift(
        tiny, out, *flags, nproc=nproc, extra_plugins=[SIGNAL_PLUGIN, WEIGHTS_PLUGIN],
        env={'CISPO_SKIP_NO_SIGNAL': '1'},
    )  # fmt: skip
    check_ok(result, exit_abort_ok=nproc > 1)
    rows = logged_steps(out)
    assert len(rows) == 4
    # Generation batches alternate: constant rewards (no signal, skipped), then rewards that differ (a real step).
    assert [r['cispo/no_signal_skipped'] for r in rows] == [1.0, 0.0, 1.0, 0.0]
    assert [r['grad_norm'] == 0.0 for r in rows] == [True, False, True, False]
    assert _moved(out, 4) == [False, True, False, True]


@pytest.mark.slow
def test_a_spent_budget_costs_no_forward_or_backward(tiny, tmp_path):
    from swift_run import check_ok, logged_steps, run_swift

    out = tmp_path / 'run'
    flags = [*FULL, '--num_iterations', '4', '--max_steps', '8']
    flags += ['--callbacks', 'cispo_test_weights', 'cispo_test_passes']
    result = run_swift(
        tiny, out, *flags, extra_plugins=[WEIGHTS_PLUGIN, PASSES_PLUGIN], env={'CISPO_KL_BUDGET': '1e-12'}
    )
    check_ok(result)
    rows = logged_steps(out)
    assert [r['cispo/kl_budget_skipped'] for r in rows] == [0.0, 1.0, 1.0, 1.0] * 2
    passes = [json.loads(x) for x in (out / 'passes.jsonl').read_text().splitlines()]
    # Each generation batch of 4 uses: the on-policy step runs; the 2nd use runs its forward (which finds the drift
    # past the budget) but not its backward; the 3rd and 4th cost nothing.
    assert [p['forward'] for p in passes] == [1, 1, 0, 0] * 2
    assert [p['backward'] for p in passes] == [1, 0, 0, 0] * 2
    assert _moved(out, 8) == [True, False, False, False] * 2


DYNAMIC = ['--dynamic_sample', 'true', '--max_resample_times', '3', '--reward_funcs', 'cispo_test_alternating_reward']


@pytest.mark.slow
def test_dynamic_sample_trains_on_the_resampled_groups_as_builtin_cispo_does(tiny, tmp_path):
    from swift_run import check_ok, logged_steps, run_swift

    flags = [*FULL, *DYNAMIC, '--max_steps', '4']
    ours = run_swift(tiny, tmp_path / 'ours', *flags, extra_plugins=[SIGNAL_PLUGIN])
    check_ok(ours)
    builtin = run_swift(tiny, tmp_path / 'builtin', *flags, plugin=False, extra_plugins=[SIGNAL_PLUGIN])
    check_ok(builtin)
    ours_rows, builtin_rows = logged_steps(tmp_path / 'ours'), logged_steps(tmp_path / 'builtin')
    assert len(ours_rows) == len(builtin_rows) == 4
    for a, b in zip(ours_rows, builtin_rows):
        assert a['loss'] == pytest.approx(b['loss'], rel=1e-5, abs=1e-7)
        assert a['grad_norm'] == pytest.approx(b['grad_norm'], rel=1e-5)
    # Every generation batch first had constant rewards; the resampled one carries signal, so no step is empty.
    assert all(r['grad_norm'] > 0 for r in ours_rows)


@pytest.mark.slow
def test_dynamic_sample_with_the_budget_and_the_skip(tiny, tmp_path):
    from swift_run import check_ok, logged_steps, run_swift

    out = tmp_path / 'run'
    env = {'CISPO_KL_BUDGET': '1e-12', 'CISPO_SKIP_NO_SIGNAL': '1'}
    result = run_swift(tiny, out, *FULL, *DYNAMIC, '--max_steps', '4', extra_plugins=[SIGNAL_PLUGIN], env=env)
    check_ok(result)
    rows = logged_steps(out)
    assert [r['cispo/kl_budget_skipped'] for r in rows] == [0.0, 1.0, 0.0, 1.0]
    assert [r['cispo/no_signal_skipped'] for r in rows] == [0.0] * 4  # resampling left no batch without signal
    assert all(r['cispo/approx_kl'] == 0.0 for r in rows[0::2])


@pytest.mark.slow
def test_no_signal_skip_under_fsdp2(tiny, tmp_path):
    """FSDP2 (forced on for CPU by tests/fsdp_cpu_plugin.py): the gradients are sharded DTensors; each rank tests its
    shard and the ranks agree."""
    from swift_run import SCALE_FLAGS, check_ok, logged_steps, run_swift

    out = tmp_path / 'run'
    flags = [*SCALE_FLAGS, '--fsdp', 'fsdp2', '--weight_decay', '0.1', '--beta', '0', '--num_iterations', '1']
    flags += ['--reward_funcs', 'cispo_test_alternating_reward', '--per_device_train_batch_size', '2']
    plugins = [SIGNAL_PLUGIN, str(HERE / 'fsdp_cpu_plugin.py')]
    result = run_swift(tiny, out, *flags, nproc=2, extra_plugins=plugins, env={'CISPO_SKIP_NO_SIGNAL': '1'})
    check_ok(result, exit_abort_ok=True)
    assert 'fsdp-cpu: FSDP2 on' in result.stdout + result.stderr
    rows = logged_steps(out)
    assert [r['cispo/no_signal_skipped'] for r in rows] == [1.0, 0.0, 1.0, 0.0]
    assert [r['grad_norm'] == 0.0 for r in rows] == [True, False, True, False]
