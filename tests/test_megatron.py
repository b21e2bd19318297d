"""cispo-swift under swift's Megatron CLI (cispo_swift/megatron.py), on CPU.

megatron-core's model cannot run on CPU (it asks for CUDA when it builds the embedding), so this file covers what
can: `megatron rlhf` with the plugin as far as it runs (argument parsing, plugin loading, torch.distributed on
gloo, the output directory; it stops building the model), the checks on the parsed arguments, and the patched
`MegatronGRPOTrainer.loss_func` on given tensors, against swift's own loss_func and against a reference written
here, in one process and on two data-parallel gloo processes. Runs in .venv-megatron with Transformer Engine
stubbed for import (scripts/test_megatron.sh puts tests/te_stub on PYTHONPATH).
"""

import dataclasses
import glob
import inspect
import json
import math
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip('megatron.core', reason='megatron-core is not installed (bash scripts/test_megatron.sh)')
pytest.importorskip('transformer_engine', reason='Transformer Engine stub not on PYTHONPATH (scripts/test_megatron.sh)')

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from linear_problem import B, linear_problem  # noqa: E402
from swift.megatron.arguments import MegatronArguments, MegatronRLHFArguments  # noqa: E402
from swift.megatron.trainers.grpo_trainer import MegatronGRPOTrainer  # noqa: E402
from swift.rl_core.data import GRPOBatch  # noqa: E402
from swift_run import PLUGIN, _free_port  # noqa: E402

from cispo_swift import megatron, registry  # noqa: E402
from cispo_swift.config import CISPOConfig  # noqa: E402

MEGATRON = str(Path(sys.executable).parent / 'megatron')
SWIFT_LOSS_FUNC = getattr(MegatronGRPOTrainer.loss_func, '_cispo_original', MegatronGRPOTrainer.loss_func)


@pytest.fixture(autouse=True)
def _no_cispo_env(monkeypatch):
    for name in [k for k in os.environ if k.startswith('CISPO_')]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(megatron, '_run', None)


def megatron_args(**overrides) -> MegatronRLHFArguments:
    """swift's MegatronRLHFArguments with its field defaults, as the plugin sees them while swift parses (before
    `__post_init__` fills in the rest): built without `__post_init__`, which starts torch.distributed."""
    args = MegatronRLHFArguments.__new__(MegatronRLHFArguments)
    for f in dataclasses.fields(MegatronRLHFArguments):
        if f.default is not dataclasses.MISSING:
            setattr(args, f.name, f.default)
        elif f.default_factory is not dataclasses.MISSING:
            setattr(args, f.name, f.default_factory())
    values = dict(rlhf_type='grpo', loss_type='cispo', report_to=[], output_dir='/nonexistent')
    values.update(overrides)
    for name, value in values.items():
        setattr(args, name, value)
    return args


# ---- at argument parsing --------------------------------------------------------------------------------------------


def test_megatron_arguments_are_recognised():
    from swift.arguments import RLHFArguments

    assert megatron.is_megatron_args(megatron_args())
    assert not megatron.is_megatron_args(RLHFArguments.__new__(RLHFArguments))


def test_unset_cap_becomes_5_on_the_parsed_arguments_and_is_logged(swift_log):
    args = megatron_args()
    assert args.epsilon_high is None  # what swift's Megatron trainer would turn into --epsilon, 0.2
    registry.validate_parsed_args(args)
    assert args.epsilon_high == 5.0
    assert "--epsilon_high not given: using 5.0 (weight cap 5.0, ScaleRL) instead of swift's fallback" in swift_log.text


@pytest.mark.parametrize(
    'cap, message',
    [(0.2, 'caps the importance weight'), (0.0, 'must be a positive number'), (float('nan'), 'NaN is not a valid')],
)
def test_caps_that_cannot_work_are_refused(cap, message):
    with pytest.raises(ValueError, match=message):
        registry.validate_parsed_args(megatron_args(epsilon_high=cap))


def test_relative_mode_gives_swift_the_absolute_cap(monkeypatch):
    monkeypatch.setenv('CISPO_CLIP_MODE', 'relative')
    args = megatron_args()
    registry.validate_parsed_args(args)
    assert args.epsilon_high == 5.0  # default ε_high 4.0 in relative mode: the cap 1 + 4.0
    args = megatron_args(epsilon_high=0.28)
    registry.validate_parsed_args(args)
    assert args.epsilon_high == pytest.approx(1.28)


REFUSED = {
    'CISPO_ANCHOR': 'rollout',
    'CISPO_NORM': 'sequence',
    'CISPO_KL_BUDGET': '0.05',
    'CISPO_SKIP_NO_SIGNAL': '1',
    'CISPO_FP32_LM_HEAD': '1',
    'CISPO_FUSED_LOGPS': '1',
    'CISPO_FUSED_CHUNK_SIZE': '64',
    'CISPO_ALLOW_CONFIG_CHANGE': '1',
}


def test_every_option_is_implemented_or_refused_under_megatron():
    options = {f'CISPO_{f.name.upper()}' for f in dataclasses.fields(CISPOConfig)}
    implemented = {f'CISPO_{name.upper()}' for name in megatron.IMPLEMENTED}
    assert options - implemented == set(REFUSED)


@pytest.mark.parametrize('variable', sorted(REFUSED))
def test_options_not_implemented_are_refused_naming_megatron(monkeypatch, variable):
    monkeypatch.setenv(variable, REFUSED[variable])
    args = megatron_args()
    with pytest.raises(ValueError, match=f'{variable}=.*not implemented under Megatron'):
        registry.validate_parsed_args(args)
    assert args.epsilon_high is None  # refused before anything was set


@pytest.mark.parametrize(
    'flag, value',
    [
        ('importance_sampling_level', 'sequence'),
        ('top_entropy_quantile', 0.2),
        ('rollout_importance_sampling_mode', 'token_truncate'),
        ('off_policy_sequence_mask_delta', 0.5),
    ],
)
def test_own_loss_refuses_swift_flags_it_does_not_reproduce(monkeypatch, flag, value):
    monkeypatch.setenv('CISPO_MASK', '1')
    with pytest.raises(ValueError, match=f'--{flag} {value} with CISPO_MASK=1 under Megatron'):
        registry.validate_parsed_args(megatron_args(**{flag: value}))
    monkeypatch.delenv('CISPO_MASK')
    registry.validate_parsed_args(megatron_args(**{flag: value}))  # swift's own loss takes them
    monkeypatch.setenv('CISPO_CLIP_MODE', 'relative')  # without a lower bound: swift's min(r, 1 + ε_high)
    registry.validate_parsed_args(megatron_args(**{flag: value}))
    monkeypatch.setenv('CISPO_EPS_LOW', '0.2')
    with pytest.raises(ValueError, match=f'--{flag} {value} with CISPO_CLIP_MODE=relative, CISPO_EPS_LOW=0.2 under'):
        registry.validate_parsed_args(megatron_args(**{flag: value}))


def test_other_swift_versions_are_refused_under_megatron(monkeypatch):
    from cispo_swift import compat

    monkeypatch.setattr(compat, 'installed_swift_version', lambda: '4.5.3')
    with pytest.raises(ValueError, match=r'supports ms-swift 4.6 \(tested with 4.6.0\).*4.5.3 is installed'):
        registry.validate_parsed_args(megatron_args())


def test_ray_pipeline_is_refused():
    with pytest.raises(ValueError, match='--use_ray'):
        registry.validate_parsed_args(megatron_args(skip_megatron_init=True))


def test_loading_the_plugin_writes_the_settings_after_swift_completes_its_arguments(monkeypatch, tmp_path):
    from swift.trainers import TrainerFactory

    monkeypatch.setattr(MegatronGRPOTrainer, 'loss_func', MegatronGRPOTrainer.loss_func)  # restored afterwards
    monkeypatch.setattr(MegatronRLHFArguments, '_init_distributed', lambda self: None)  # initialize_megatron
    monkeypatch.setenv('CISPO_MASK', '1')
    before = dict(TrainerFactory.TRAINER_MAPPING)
    args = megatron_args(output_dir=str(tmp_path))

    def parsing(self):  # swift_args_being_parsed finds `self` in the frame that imports the plugin
        registry.load_plugin()

    parsing(args)
    assert TrainerFactory.TRAINER_MAPPING == before  # megatron rlhf does not use TrainerFactory
    assert MegatronGRPOTrainer.loss_func._cispo_original is SWIFT_LOSS_FUNC
    assert not (tmp_path / 'cispo_config.json').exists()
    args.beta = 0.04  # what swift's __post_init__ fills in before it starts torch.distributed
    args._init_distributed()
    saved = json.loads((tmp_path / 'cispo_config.json').read_text())
    assert saved['engine'] == 'megatron' and saved['mask'] is True and saved['beta'] == 0.04
    assert saved['epsilon_high'] == 5.0 and saved['weight_upper'] == 5.0
    assert '_init_distributed' not in vars(args)  # nothing of the plugin's reaches args.json


def test_other_loss_types_are_left_to_swift(monkeypatch):
    monkeypatch.setattr(MegatronGRPOTrainer, 'loss_func', SWIFT_LOSS_FUNC)
    args = megatron_args(loss_type='grpo')

    def parsing(self):
        registry.load_plugin()

    parsing(args)
    assert args.epsilon_high is None and MegatronGRPOTrainer.loss_func is SWIFT_LOSS_FUNC
    assert '_init_distributed' not in vars(args)


# ---- the real CLI, as far as it runs on CPU -------------------------------------------------------------------------


def run_megatron(tiny, output_dir: Path, env=None, plugin=True, timeout=600):
    """`megatron rlhf --rlhf_type grpo --loss_type cispo` on the tiny model, one process on gloo (the variables
    torchrun would set). On CPU it gets through argument parsing and stops building the model."""
    cmd = [
        MEGATRON, 'rlhf',
        '--rlhf_type', 'grpo',
        '--loss_type', 'cispo',
        '--model', tiny['model'],
        '--model_type', 'qwen2',
        '--template', 'qwen',
        '--dataset', tiny['train'],
        '--reward_funcs', 'accuracy',
        '--ddp_backend', 'gloo',
        '--output_dir', str(output_dir),
    ]  # fmt: skip
    if plugin:
        cmd += ['--external_plugins', PLUGIN]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith('CISPO_')}
    full_env.update(
        RANK='0', LOCAL_RANK='0', WORLD_SIZE='1', LOCAL_WORLD_SIZE='1', MASTER_ADDR='127.0.0.1',
        MASTER_PORT=str(_free_port()), OMP_NUM_THREADS='1', MODELSCOPE_OFFLINE='1', HF_HUB_OFFLINE='1',
    )  # fmt: skip
    full_env.update(env or {})
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)


def run_dir(output_dir: Path) -> Path:
    (found,) = glob.glob(str(output_dir / 'v*-*'))  # swift's versioned run directory
    return Path(found)


STOPS_AT_MODEL_BUILD = 'Torch not compiled with CUDA enabled'


@pytest.mark.slow
def test_cli_unset_cap_is_logged_set_and_saved(tiny, tmp_path):
    result = run_megatron(tiny, tmp_path / 'out')
    log = result.stdout + result.stderr
    assert result.returncode != 0 and STOPS_AT_MODEL_BUILD in log, log[-3000:]  # past argument parsing
    assert (
        "cispo-swift (Megatron): --epsilon_high not given: using 5.0 (weight cap 5.0, ScaleRL) instead of swift's"
        in log
    )
    assert 'cispo-swift: CISPO loss active: w = sg(min(r, 5.0)) [absolute, eps_low unset]' in log
    assert 'unified_mask=off' in log and 'beta=0.04' in log and '[Megatron]' in log
    directory = run_dir(tmp_path / 'out')
    saved = json.loads((directory / 'cispo_config.json').read_text())
    assert saved['epsilon_high'] == 5.0 and saved['engine'] == 'megatron' and saved['beta'] == 0.04
    assert json.loads((directory / 'args.json').read_text())['epsilon_high'] == 5.0  # what swift's trainer reads


@pytest.mark.slow
def test_cli_mask_is_shown_active(tiny, tmp_path):
    result = run_megatron(tiny, tmp_path / 'out', env={'CISPO_MASK': '1', 'CISPO_MASK_EPS_HIGH': '0.3'})
    log = result.stdout + result.stderr
    assert STOPS_AT_MODEL_BUILD in log, log[-3000:]
    assert 'unified_mask=on (eps 0.2/0.3)' in log
    assert json.loads((run_dir(tmp_path / 'out') / 'cispo_config.json').read_text())['mask'] is True


@pytest.mark.slow
def test_cli_refuses_an_option_not_implemented_under_megatron(tiny, tmp_path):
    result = run_megatron(tiny, tmp_path / 'out', env={'CISPO_NORM': 'sequence'})
    assert result.returncode == 2, (result.stdout + result.stderr)[-3000:]
    assert 'cispo-swift: refusing to start' in result.stderr
    assert 'CISPO_NORM=sequence: not implemented under Megatron (megatron rlhf)' in result.stderr
    assert 'Traceback' not in result.stderr
    assert not (tmp_path / 'out').exists()  # stopped before swift made its output directory


# ---- the loss -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def model_parallel():
    """torch.distributed on gloo, one process, and megatron-core's parallel state (data-parallel size 1)."""
    from megatron.core import mpu

    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            'gloo', init_method=f'tcp://127.0.0.1:{_free_port()}', rank=0, world_size=1
        )
    mpu.initialize_model_parallel()
    yield
    mpu.destroy_model_parallel()


def make_trainer(env=None, monkeypatch=None, **arg_overrides) -> MegatronGRPOTrainer:
    """A MegatronGRPOTrainer without a model: its GRPO attributes set by swift's own `_init_grpo_params` from
    arguments the plugin has checked (with `env` as CISPO_* variables), plus what `loss_func` reads."""
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    values = dict(beta=0.0, kl_in_reward=False, generation_batch_size=8, steps_per_generation=2)
    values.update(arg_overrides)
    args = megatron_args(**values)
    args.per_device_generation_batch_size = 8  # set by swift's argument post-init
    args.num_microbatches = 3
    registry.validate_parsed_args(args)
    trainer = MegatronGRPOTrainer.__new__(MegatronGRPOTrainer)
    trainer.args = args
    trainer._init_grpo_params()
    trainer.disable_rollout_importance_sampling = False
    trainer._has_teacher = False
    trainer.unwrapped_models = [SimpleNamespace(training=True)]
    trainer._metrics = {'train': defaultdict(list), 'eval': defaultdict(list)}
    trainer._step = 2  # not the first micro-step of a generation batch: no completion table to flush
    trainer._all_reduce_metric = _all_reduce_mean
    return trainer


def _all_reduce_mean(metric):
    """swift's `_all_reduce_metric` (ReduceOp.AVG over the data-parallel group), as SUM / size: gloo has no AVG."""
    from megatron.core import mpu

    values = torch.stack(list(metric.values()))
    torch.distributed.all_reduce(values, group=mpu.get_data_parallel_group())
    return dict(zip(metric, values / mpu.get_data_parallel_world_size()))


def make_batch(seed=0, B=5, T=6, V=9, spread=1.5, on_policy=False):
    """Log-probs from a leaf `logits` [B, T, V], ragged lengths, mixed-sign advantages, ratios far from 1."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64).requires_grad_(True)
    ids = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    with torch.no_grad():
        logps = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    old = logps.clone() if on_policy else logps + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    batch = GRPOBatch(
        completion_mask=mask,
        truncated_mask=torch.tensor([False, True] + [False] * (B - 2)),
        seq_lengths=lengths,
        old_per_token_logps=old,
        ref_per_token_logps=logps + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64),
        advantages=torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T).clone(),
        num_items_in_batch=mask.sum().double() * 2,  # the optimizer step's tokens: as if one more such micro-batch
    )
    return logits, ids, batch


def logps_of(logits, ids):
    return torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def run_loss(trainer, logits, ids, batch, loss_func):
    logits.grad = None
    loss, metrics = loss_func(trainer, logps_of(logits, ids), {'grpo_batch': batch, 'per_token_entropy': None})
    loss.backward()
    return loss.detach(), logits.grad.clone(), metrics


def reference_loss(logps, batch, lower, upper, num_microbatches, mask_eps=None, beta=0.0, overlong_filter=False):
    """CISPO (MiniMax-M1 eq. 4; eq. 6-7 for the mask) on [B, T] tensors, written out here: Σ over the loss tokens
    of −M·sg(clip(r, lower, upper))·Â·log π + β·k3, over the step's tokens per rank, times the micro-batch count."""
    mask = batch.completion_mask.clone()
    if overlong_filter:
        mask[batch.truncated_mask] = False
    ratio = torch.exp(logps.detach() - batch.old_per_token_logps)
    weight = ratio.clamp(min=lower if lower is not None else 0.0, max=upper)
    adv = batch.advantages
    per_token = -weight * adv * logps
    if mask_eps is not None:
        keep = ~(((adv > 0) & (ratio > 1 + mask_eps[1])) | ((adv < 0) & (ratio < 1 - mask_eps[0])))
        per_token = per_token * keep
    if beta:
        d = (batch.ref_per_token_logps - logps).clamp(-20, 20)
        per_token = per_token + beta * (torch.exp(d) - d - 1).clamp(-10, 10)
    return (per_token * mask).sum() / batch.num_items_in_batch * num_microbatches


@pytest.mark.parametrize('seed', [0, 1])
def test_default_is_swifts_own_loss_with_the_cap(model_parallel, monkeypatch, seed):
    trainer = make_trainer(monkeypatch=monkeypatch)  # --epsilon_high unset
    assert trainer.epsilon_high == 5.0
    megatron.patch_loss_func()
    logits, ids, batch = make_batch(seed)
    ours, grad, metrics = run_loss(trainer, logits, ids, batch, MegatronGRPOTrainer.loss_func)
    swift, swift_grad, _ = run_loss(trainer, logits, ids, batch, SWIFT_LOSS_FUNC)
    assert torch.equal(ours, swift) and torch.equal(grad, swift_grad)
    reference = reference_loss(logps_of(logits, ids), batch, None, 5.0, 3)
    logits.grad = None
    reference.backward()
    assert ours.item() == pytest.approx(reference.item(), rel=1e-12)
    torch.testing.assert_close(grad, logits.grad, rtol=1e-12, atol=1e-15)
    assert float(metrics['loss']) == pytest.approx(ours.item())


def test_swift_alone_caps_every_weight_at_epsilon(model_parallel, monkeypatch):
    """The trap the plugin closes: swift's Megatron trainer with --epsilon_high unset caps w at --epsilon (0.2), so
    even on-policy (r = 1) its CISPO gradient is 0.2 times the paper's."""
    trainer = make_trainer(monkeypatch=monkeypatch)
    trainer.args.epsilon_high = None  # as without the plugin
    trainer._init_grpo_params()
    assert trainer.epsilon_high == 0.2
    logits, ids, batch = make_batch(on_policy=True)
    _, swift_grad, _ = run_loss(trainer, logits, ids, batch, SWIFT_LOSS_FUNC)
    reference = reference_loss(logps_of(logits, ids), batch, None, 5.0, 3)
    logits.grad = None
    reference.backward()
    torch.testing.assert_close(swift_grad, 0.2 * logits.grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    'env, lower, upper, mask_eps',
    [
        ({'CISPO_CLIP_MODE': 'relative'}, None, 5.0, None),
        ({'CISPO_CLIP_MODE': 'relative', 'CISPO_EPS_LOW': '0.2'}, 0.8, 5.0, None),
        ({'CISPO_MASK': '1', 'CISPO_MASK_EPS_LOW': '0.3'}, None, 5.0, (0.3, 0.2)),
        ({'CISPO_CLIP_MODE': 'relative', 'CISPO_EPS_LOW': '0.5', 'CISPO_MASK': '1'}, 0.5, 5.0, (0.2, 0.2)),
    ],
)
@pytest.mark.parametrize('beta, overlong_filter', [(0.0, False), (0.04, True)])
def test_own_loss_matches_the_reference(
    model_parallel, monkeypatch, env, lower, upper, mask_eps, beta, overlong_filter
):
    trainer = make_trainer(env, monkeypatch, beta=beta, overlong_filter=overlong_filter)
    megatron.patch_loss_func()
    logits, ids, batch = make_batch(3)
    ours, grad, metrics = run_loss(trainer, logits, ids, batch, MegatronGRPOTrainer.loss_func)
    reference = reference_loss(logps_of(logits, ids), batch, lower, upper, 3, mask_eps, beta, overlong_filter)
    logits.grad = None
    reference.backward()
    assert ours.item() == pytest.approx(reference.item(), rel=1e-12)
    torch.testing.assert_close(grad, logits.grad, rtol=1e-12, atol=1e-15)
    assert float(metrics['loss']) == pytest.approx(ours.item())  # the reported loss is the one optimised
    swift, _, _ = run_loss(trainer, logits, ids, batch, SWIFT_LOSS_FUNC)
    # swift's formula has no lower bound and no mask; without them it is the same loss (given the cap 1 + ε_high).
    assert math.isclose(swift.item(), ours.item(), rel_tol=1e-12) == (lower is None and mask_eps is None)


def test_metrics_are_token_sums_over_tokens(model_parallel, monkeypatch):
    trainer = make_trainer({'CISPO_CLIP_MODE': 'relative', 'CISPO_EPS_LOW': '0.2'}, monkeypatch, beta=0.04)
    megatron.patch_loss_func()
    logits, ids, batch = make_batch(4, spread=2.0)
    _, _, metrics = run_loss(trainer, logits, ids, batch, MegatronGRPOTrainer.loss_func)
    mask = batch.completion_mask
    logps = logps_of(logits, ids).detach()
    log_ratio = (logps - batch.old_per_token_logps)[mask]
    ratio, adv = log_ratio.exp(), batch.advantages[mask]
    clipped = (ratio > 5.0) | (ratio < 0.8)
    n = float(mask.sum())
    d = (batch.ref_per_token_logps - logps).clamp(-20, 20)[mask]
    expected = {
        'clip_frac': float(clipped.sum()),
        'clip_frac_pos': float((clipped & (adv > 0)).sum()),
        'clip_frac_neg': float((clipped & (adv < 0)).sum()),
        'ppo_zero_grad_frac': float((((adv > 0) & (ratio > 1.2)) | ((adv < 0) & (ratio < 0.8))).sum()),
        'ratio_mean': float(ratio.sum()),
        'weight_mean': float(ratio.clamp(0.8, 5.0).sum()),
        'approx_kl': float((ratio - 1 - log_ratio).sum()),
        'kl': float((torch.exp(d) - d - 1).clamp(-10, 10).sum()),
    }
    assert 0 < expected['clip_frac'] < n  # the batch exercises the clip
    for name, total in expected.items():
        pair = metrics[f'cispo/{name}']
        assert pair.shape == (2,) and float(pair[1]) == n, name  # [sum, tokens]: swift adds pairs, logs the ratio
        assert float(pair[0]) == pytest.approx(total, rel=1e-6), name
    assert 'completions/mean_length' in metrics and 'cispo_clip_ratio' in metrics  # swift's metrics stay


@pytest.mark.parametrize('own', [False, True])
def test_check_finite_stops_on_a_nan_in_the_loss(model_parallel, monkeypatch, own):
    trainer = make_trainer({'CISPO_MASK': '1'} if own else {}, monkeypatch)
    megatron.patch_loss_func()
    logits, ids, batch = make_batch(5)
    padding = tuple((~batch.completion_mask).nonzero()[0].tolist())
    batch.old_per_token_logps[padding] = float('nan')
    if own:  # the objective selects the loss tokens before any product: NaN in padding cannot reach it
        loss, _, _ = run_loss(trainer, logits, ids, batch, MegatronGRPOTrainer.loss_func)
        assert torch.isfinite(loss)
    else:  # swift's loss multiplies by the mask, NaN · 0 = NaN: stopped, naming the cause
        with pytest.raises(FloatingPointError, match=r'Non-finite loss \(nan\) .* from finite inputs'):
            run_loss(trainer, logits, ids, batch, MegatronGRPOTrainer.loss_func)
    batch.old_per_token_logps[0, 0] = float('nan')
    with pytest.raises(FloatingPointError, match=r'old log-probs: 1 token\(s\) in sequence\(s\) \[0\]'):
        run_loss(trainer, logits, ids, batch, MegatronGRPOTrainer.loss_func)
    monkeypatch.setenv('CISPO_CHECK_FINITE', '0')
    unchecked = make_trainer(monkeypatch=monkeypatch)
    loss, _, _ = run_loss(unchecked, logits, ids, batch, MegatronGRPOTrainer.loss_func)
    assert torch.isnan(loss)


def test_other_loss_types_get_swifts_loss_func(model_parallel, monkeypatch):
    trainer = make_trainer(monkeypatch=monkeypatch, loss_type='grpo', epsilon_high=0.28)
    megatron.patch_loss_func()
    logits, ids, batch = make_batch(6)
    ours, grad, metrics = run_loss(trainer, logits, ids, batch, MegatronGRPOTrainer.loss_func)
    swift, swift_grad, swift_metrics = run_loss(trainer, logits, ids, batch, SWIFT_LOSS_FUNC)
    assert torch.equal(ours, swift) and torch.equal(grad, swift_grad)
    assert not any(key.startswith('cispo/') for key in metrics)


# ---- data parallel: two gloo ranks ------------------------------------------------------------------------------


DP_WORLD = 2  # rank 0 holds rows 0-3 of linear_problem (9 tokens), rank 1 rows 4-7 (26 tokens)
DP_ENVS = {'default': {}, 'own': {'CISPO_CLIP_MODE': 'relative', 'CISPO_EPS_LOW': '0.2', 'CISPO_MASK': '1'}}


def _dp_run(problem, rows):
    """Loss, gradient of W and metrics of the patched loss_func on `rows` (CISPO_* options from the environment)."""
    trainer = make_trainer(beta=0.04)
    megatron.patch_loss_func()
    weight = problem.weight.clone().requires_grad_(True)
    logps = torch.log_softmax(problem.hidden[rows] @ weight, -1).gather(-1, problem.ids[rows].unsqueeze(-1))
    mask = problem.mask[rows]
    batch = GRPOBatch(
        completion_mask=mask,
        truncated_mask=torch.zeros(mask.shape[0], dtype=torch.bool),
        seq_lengths=mask.sum(-1),
        old_per_token_logps=problem.old[rows],
        ref_per_token_logps=problem.ref[rows],
        advantages=problem.adv[rows],
        num_items_in_batch=problem.mask.sum().double(),  # swift's all-reduced count of the step's tokens
    )
    data = {'grpo_batch': batch, 'per_token_entropy': None}
    loss, metrics = MegatronGRPOTrainer.loss_func(trainer, logps.squeeze(-1), data)
    loss.backward()
    return {'loss': loss.detach(), 'grad': weight.grad.clone(), 'metrics': metrics}


def _dp_worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(DP_WORLD))
    torch.set_num_threads(1)
    from megatron.core import mpu

    torch.distributed.init_process_group('gloo', rank=rank, world_size=DP_WORLD)
    mpu.initialize_model_parallel()
    assert mpu.get_data_parallel_world_size() == DP_WORLD
    rows = slice(rank * B // DP_WORLD, (rank + 1) * B // DP_WORLD)
    results = {}
    for name, env in DP_ENVS.items():
        for variable in [k for k in os.environ if k.startswith('CISPO_')]:
            del os.environ[variable]
        os.environ.update(env)
        out = _dp_run(linear_problem(seed=7), rows)
        # Megatron's DDP averages the gradients over the data-parallel ranks.
        torch.distributed.all_reduce(out['grad'])
        out['grad'] /= DP_WORLD
        results[name] = out
    torch.save(results, os.path.join(out_dir, f'rank{rank}.pt'))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope='module')
def two_dp_ranks():
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_dp_worker, args=(_free_port(), out_dir), nprocs=DP_WORLD, join=True)
        return [torch.load(os.path.join(out_dir, f'rank{r}.pt'), weights_only=False) for r in range(DP_WORLD)]


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(DP_ENVS))
def test_two_data_parallel_ranks_give_the_whole_batch(two_dp_ranks, model_parallel, monkeypatch, name):
    """Each rank holds its own sequences (9 and 26 tokens); after the gradient average the step is the one process's
    with the whole batch, and every rank logs the whole batch's metrics and loss."""
    for variable, value in DP_ENVS[name].items():
        monkeypatch.setenv(variable, value)
    whole = _dp_run(linear_problem(seed=7), slice(None))
    assert whole['grad'].abs().sum() > 0
    assert 0 < float(whole['metrics']['cispo/clip_frac'][0]) < float(whole['metrics']['cispo/clip_frac'][1])
    for rank in two_dp_ranks:
        torch.testing.assert_close(rank[name]['grad'], whole['grad'], rtol=1e-10, atol=1e-12)
        assert rank[name]['metrics'].keys() == whole['metrics'].keys()
        for key, value in whole['metrics'].items():
            if key.startswith('cispo/') or key == 'loss':
                torch.testing.assert_close(rank[name]['metrics'][key], value, rtol=1e-6, atol=1e-12, msg=key)
    losses = [rank[name]['loss'] for rank in two_dp_ranks]
    torch.testing.assert_close(sum(losses) / DP_WORLD, whole['loss'], rtol=1e-10, atol=1e-12)


# ---- the swift code the patch relies on (ms-swift 4.6.0) ------------------------------------------------------------


def test_swift_megatron_code_is_what_the_patch_was_written_for():
    """A new swift whose Megatron GRPO code differs must be looked at again before the patch is trusted."""
    from importlib.metadata import version

    from swift.megatron.arguments.megatron_base_args import MegatronBaseArguments
    from swift.megatron.arguments.sft_args import MegatronSftArguments
    from swift.megatron.pipelines.train import rlhf
    from swift.megatron.trainers.base import BaseMegatronTrainer

    assert version('ms-swift') == megatron.TESTED_SWIFT
    loss = inspect.getsource(SWIFT_LOSS_FUNC)
    for line in (
        'def loss_func(self, output_tensor: torch.Tensor, data: Dict[str, Any]):',
        "grpo_batch: GRPOBatch = data['grpo_batch']",
        'per_token_logps = output_tensor',
        'if self.args.overlong_filter and truncated_mask.any():',
        'completion_mask = completion_mask & (~truncated_mask_expanded)',
        'if self.beta != 0.0 and ref_per_token_logps is not None and not self.kl_in_reward:',
        'safe_ratio = torch.clamp(ref_per_token_logps - per_token_logps, min=-20, max=20)',
        'per_token_kl = torch.clamp(torch.exp(safe_ratio) - safe_ratio - 1, min=-10, max=10)',
        'log_ratio = per_token_logps - old_per_token_logps',
        'clamped_ratios = torch.clamp(coef_1, max=self.epsilon_high).detach()',
        'per_token_loss = -clamped_ratios * advantages * per_token_logps',
        "elif self.loss_type in ['cispo', 'dapo', 'fipo']:",
        'normalizer = num_items_in_batch / dp_size',
        'loss = (per_token_loss * completion_mask).sum() / normalizer.clamp(min=1.0)',
        'loss = loss * self.args.num_microbatches',
        'return loss, reporting_metric',
    ):
        assert line in loss, line
    grpo_params = inspect.getsource(MegatronGRPOTrainer._init_grpo_params)
    assert 'self.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon' in grpo_params
    assert 'return output_tensor, partial(self.loss_func, data=data)' in inspect.getsource(
        MegatronGRPOTrainer.forward_step
    )
    assert "'grpo': 'MegatronGRPOTrainer'" in inspect.getsource(rlhf.MegatronRLHF.prepare_trainer)
    # Plugins load in BaseArguments.__post_init__, before the Megatron defaults and torch.distributed.
    base = inspect.getsource(MegatronBaseArguments.__post_init__)
    assert base.index('BaseArguments.__post_init__(self)') < base.index('self._init_megatron_args()')
    sft = inspect.getsource(MegatronSftArguments._init_megatron_args)
    assert sft.index('self._init_output_dir()') < sft.index('super()._init_megatron_args()')
    post_init = inspect.getsource(MegatronArguments.__post_init__)
    assert post_init.index('RLHFMegatronArgumentsMixin.__post_init__(self)') < post_init.index(
        'self._init_distributed()'
    )
    # (sum, count) metric pairs are added over micro-batches and logged as their ratio.
    aggregate = inspect.getsource(BaseMegatronTrainer._aggregated_metrics)
    assert 'if val[0].numel() == 2:' in aggregate and 'val = val.sum(dim=0)' in aggregate
    assert 'v = v[0] / v[1]' in inspect.getsource(BaseMegatronTrainer)
