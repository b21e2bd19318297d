"""DeepSpeed ZeRO-2/3 and FSDP2 on CPU through `swift rlhf`, two gloo processes, the tiny model: the plugin's losses
equal the plain two-process run, and the fused LM head (`CISPO_FUSED_LOGPS=1`) runs inside the partitioned head.

Slow: each run is ~30-60 s, mostly start-up; DeepSpeed's first run on a machine also compiles a shared-memory op
(about 2.5 min, cached afterwards). Every run samples with row_sampling_plugin.py, so that one process with 8
sequences and two with 4 each draw the same completions.
"""

import re
from pathlib import Path
from typing import Dict

import pytest
from swift_run import ROW_SAMPLING_PLUGIN, SCALE_FLAGS, check_ok, logged_steps, run_swift

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
PROBE = str(HERE / 'fused_probe_plugin.py')
FSDP_CPU = str(HERE / 'fsdp_cpu_plugin.py')
FLAGS = (*SCALE_FLAGS, '--max_steps', '4', '--stop_words', 'e', '--fp16', 'false')
KEYS = ('loss', 'grad_norm', 'cispo/ratio_mean', 'cispo/ratio_max', 'cispo/approx_kl', 'cispo/clip_frac')
FUSED = {'CISPO_FUSED_LOGPS': '1'}


@pytest.fixture(scope='module')
def runs(tiny, tmp_path_factory):
    """Runs by name, each made once per module: name -> (logged steps, output text)."""
    root = tmp_path_factory.mktemp('zero')
    cache: Dict[str, tuple] = {}

    def get(name, *flags, nproc=2, env=None, model=None, plugins=()):
        if name not in cache:
            per_rank = '8' if nproc == 1 else '4'
            result = run_swift(
                model or tiny, root / name, *FLAGS, '--per_device_train_batch_size', per_rank, *flags,
                nproc=nproc, env=env, extra_plugins=[ROW_SAMPLING_PLUGIN, PROBE, *plugins],
            )  # fmt: skip
            check_ok(result, exit_abort_ok=True)
            cache[name] = (logged_steps(root / name), result.stdout + result.stderr)
        return cache[name]

    return get


def assert_same_steps(a, b, rel=1e-5, keys=KEYS, steps=None):
    assert len(a) == len(b) == 4
    for x, y in list(zip(a, b))[:steps]:
        for key in keys:
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=rel, abs=1e-7), (x['global_step/max_steps'], key)
        if 'reward' in x:
            assert y['reward'] == pytest.approx(x['reward'], rel=1e-6)


def fused_probes(output: str):
    """(rank, grad mode, weight shape, weight class) of every fused computation the probe saw."""
    return set(re.findall(r'fused-probe rank (\d) grad (\d) weight (\S+) (\w+)', output))


@pytest.mark.parametrize('stage', ['zero2', 'zero3'])
def test_zero_stages_log_the_losses_of_the_plain_run(runs, stage):
    plain, _ = runs('plain')
    steps, output = runs(stage, '--deepspeed', stage)
    assert 'world_size: 2' in output and 'DeepSpeed' in output
    assert_same_steps(plain, steps)
    assert any(abs(r['cispo/ratio_mean'] - 1.0) > 1e-3 for r in plain)  # off-policy steps were compared


def test_zero3_in_one_process_without_torchrun(runs):
    """`--deepspeed zero3 --use_cpu true` in one process, no NPROC_PER_NODE: without a launch description DeepSpeed
    looks for MPI (ModuleNotFoundError: mpi4py inside deepspeed.zero.Init); the plugin describes the single process.
    The losses are those of the plain two-process run (the same completions, see the module docstring)."""
    plain, _ = runs('plain')
    steps, output = runs('zero3_one_process', '--deepspeed', 'zero3', nproc=1)
    assert 'mpi4py' not in output and 'DeepSpeed' in output
    assert_same_steps(plain, steps)


def test_fused_head_under_zero3_is_active_and_equal(runs, tiny):
    """Under ZeRO-3 the head weight is partitioned outside its forward; the fused path runs inside it, on the whole
    [V, H] weight on both ranks, for the old-policy pass (no grad) and the loss (grad), and changes nothing."""
    zero3, _ = runs('zero3', '--deepspeed', 'zero3')
    fused, output = runs('zero3_fused', '--deepspeed', 'zero3', env=FUSED)
    assert 'fused_logps=1' in output and 'has no effect' not in output
    assert fused_probes(output) == {(r, g, '600x64', 'Parameter') for r in '01' for g in '01'}
    assert_same_steps(zero3, fused)
    one, _ = runs('one', nproc=1)
    assert_same_steps(one, fused)


def test_fused_head_under_zero3_with_lora(runs):
    """LoRA leaves the head frozen: its weight gradient is skipped, the adapters' gradients are the same."""
    plain, _ = runs('zero3_lora', '--deepspeed', 'zero3', '--tuner_type', 'lora')
    fused, output = runs('zero3_lora_fused', '--deepspeed', 'zero3', '--tuner_type', 'lora', env=FUSED)
    assert ('0', '1', '600x64', 'Parameter') in fused_probes(output)
    assert_same_steps(plain, fused)


def test_fused_fp32_head_under_zero3_bf16_tied(runs, tied_tiny):
    """bf16 with CISPO_FP32_LM_HEAD=1 and tied embeddings (the head's weight is the embedding's, partitioned once).
    The two paths round bf16 activations differently, so the on-policy first step is compared at bf16 precision."""
    env = {'CISPO_FP32_LM_HEAD': '1'}
    flags = ('--deepspeed', 'zero3', '--torch_dtype', 'bfloat16')
    plain, _ = runs('zero3_bf16_tied', *flags, env=env, model=tied_tiny)
    fused, output = runs('zero3_bf16_tied_fused', *flags, env={**env, **FUSED}, model=tied_tiny)
    assert 'fp32_lm_head=1' in output and 'fused_logps=1' in output
    assert ('1', '1', '600x64', 'Parameter') in fused_probes(output)
    assert_same_steps(plain, fused, rel=1e-3, keys=('grad_norm', 'cispo/ratio_mean'), steps=1)
    assert fused[0]['loss'] == pytest.approx(plain[0]['loss'], abs=1e-5)


def test_fused_head_under_fsdp2(runs):
    """FSDP2 forced on for CPU (fsdp_cpu_plugin.py): the head is a sharded DTensor outside its forward and whole
    inside; the fused path runs there and gives the plain DDP run's losses."""
    plain, _ = runs('plain')
    fsdp, output = runs('fsdp2_fused', '--fsdp', 'fsdp2', env=FUSED, plugins=[FSDP_CPU])
    assert 'fsdp-cpu: FSDP2 on' in output
    assert fused_probes(output) == {(r, g, '600x64', 'Parameter') for r in '01' for g in '01'}
    assert_same_steps(plain, fsdp)


def test_fp16_with_deepspeed_on_cpu_is_refused_before_the_model_loads(tiny, tmp_path):
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().is_fp16_supported():
        pytest.skip('this CPU has fp16 kernels: DeepSpeed accepts fp16 here, and so does cispo-swift')
    result = run_swift(tiny, tmp_path / 'fp16', *SCALE_FLAGS, '--deepspeed', 'zero2', nproc=2)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert '--fp16 false' in output and 'Type fp16 is not supported' in output
    assert 'model_parameter_info' not in output  # refused while swift parsed its arguments
