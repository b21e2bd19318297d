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
    monkeypatch.delenv('RANK', raising=False)
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    deepspeed_cpu.init_distributed()  # a plain single process: nothing to join
    assert calls == []
    monkeypatch.setenv('RANK', '0')
    monkeypatch.setenv('WORLD_SIZE', '2')
    deepspeed_cpu.init_distributed()
    assert calls == [{'dist_backend': 'gloo', 'auto_mpi_discovery': False}]
