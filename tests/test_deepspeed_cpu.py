"""cispo_swift.deepspeed_cpu: which runs swift would start in fp16 (mirrors ms-swift 4.6.0
`ModelArguments._init_mixed_precision`), the refusal where DeepSpeed's CPU accelerator has no fp16, and where the
distributed state is initialised. Fast: no process is launched (tests/test_zero.py runs the real thing)."""

import json
from types import SimpleNamespace

import pytest

from cispo_swift import deepspeed_cpu


def args(**kw):
    base = dict(deepspeed='zero3', use_cpu=True, fp16=None, bf16=None, torch_dtype=None, model=None)
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize(
    'kw, fp16',
    [
        (dict(torch_dtype='float32'), True),
        (dict(torch_dtype='float16'), True),
        (dict(torch_dtype='bfloat16'), False),
        (dict(torch_dtype='float32', fp16=False), False),
        (dict(torch_dtype='bfloat16', fp16=True), True),
        (dict(torch_dtype='float32', bf16=True), False),
        (dict(), False),  # a hub id without --torch_dtype: unknown before loading, not refused
    ],
)
def test_resolves_to_fp16_like_swift(kw, fp16):
    assert deepspeed_cpu.resolves_to_fp16(args(**kw)) is fp16


def test_model_dtype_read_from_a_local_config(tmp_path):
    (tmp_path / 'config.json').write_text(json.dumps({'torch_dtype': 'float32'}))
    assert deepspeed_cpu.resolves_to_fp16(args(model=str(tmp_path)))
    (tmp_path / 'config.json').write_text(json.dumps({'dtype': 'bfloat16'}))
    assert not deepspeed_cpu.resolves_to_fp16(args(model=str(tmp_path)))
    (tmp_path / 'config.json').write_text('{not json')
    assert not deepspeed_cpu.resolves_to_fp16(args(model=str(tmp_path)))


def test_refusal_names_the_cause_and_the_fix():
    with pytest.raises(ValueError, match=r'--torch_dtype float32.*--fp16 false'):
        deepspeed_cpu.check_fp16(args(torch_dtype='float32'), fp16_supported=False)
    with pytest.raises(ValueError, match=r'from --fp16 true'):
        deepspeed_cpu.check_fp16(args(torch_dtype='bfloat16', fp16=True), fp16_supported=False)
    deepspeed_cpu.check_fp16(args(torch_dtype='float32'), fp16_supported=True)  # a CPU with fp16 kernels
    deepspeed_cpu.check_fp16(args(torch_dtype='float32', fp16=False), fp16_supported=False)


def test_nothing_happens_without_deepspeed(monkeypatch):
    called = []
    monkeypatch.setattr(deepspeed_cpu, '_accelerator', lambda: called.append(1))
    deepspeed_cpu.check(args(deepspeed=None, torch_dtype='float32'))
    deepspeed_cpu.prepare(args(deepspeed=None))
    deepspeed_cpu.check(None)
    assert called == []


def test_distributed_state_only_under_torchrun_with_use_cpu(monkeypatch):
    inits = []
    monkeypatch.setattr(deepspeed_cpu, 'init_distributed', lambda: inits.append(1))
    cpu = SimpleNamespace(device_name=lambda: 'cpu', is_fp16_supported=lambda: False)
    monkeypatch.setattr(deepspeed_cpu, '_accelerator', lambda: cpu)
    deepspeed_cpu.prepare(args(use_cpu=False))
    assert inits == []
    deepspeed_cpu.prepare(args())
    assert inits == [1]
    gpu = SimpleNamespace(device_name=lambda: 'cuda', is_fp16_supported=lambda: True)
    monkeypatch.setattr(deepspeed_cpu, '_accelerator', lambda: gpu)
    deepspeed_cpu.prepare(args())
    assert inits == [1]


def test_init_distributed_needs_a_launcher(monkeypatch):
    deepspeed = pytest.importorskip('deepspeed')  # the 'deepspeed' extra (setup.sh installs it)

    calls = []
    monkeypatch.setattr(deepspeed, 'init_distributed', lambda **kw: calls.append(kw))
    monkeypatch.setattr(deepspeed.comm, 'is_initialized', lambda: False)
    for key in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv('RANK', '0')
    deepspeed_cpu.init_distributed()  # half a launch description: the launcher's own error, not a guess
    assert calls == []
    monkeypatch.setenv('WORLD_SIZE', '2')
    deepspeed_cpu.init_distributed()
    assert calls == [{'dist_backend': 'gloo', 'auto_mpi_discovery': False}]


def test_a_single_process_without_torchrun_is_described_to_deepspeed(monkeypatch):
    """Without RANK/WORLD_SIZE DeepSpeed would look for MPI (mpi4py); the process is rank 0 of 1 on a free port."""
    deepspeed = pytest.importorskip('deepspeed')

    calls = []
    monkeypatch.setattr(deepspeed, 'init_distributed', lambda **kw: calls.append(kw))
    monkeypatch.setattr(deepspeed.comm, 'is_initialized', lambda: False)
    for key in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'):
        # setenv first, so that monkeypatch restores the variables' absence afterwards: left set, they would make
        # every later `swift rlhf` of the session look like a torchrun worker.
        monkeypatch.setenv(key, '')
        monkeypatch.delenv(key)
    deepspeed_cpu.init_distributed()
    assert calls == [{'dist_backend': 'gloo', 'auto_mpi_discovery': False}]
    env = __import__('os').environ
    assert (env['RANK'], env['WORLD_SIZE'], env['LOCAL_RANK'], env['MASTER_ADDR']) == ('0', '1', '0', '127.0.0.1')
    assert 0 < int(env['MASTER_PORT']) < 65536
