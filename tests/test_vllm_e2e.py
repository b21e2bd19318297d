"""End to end with vLLM on CPU: `swift rlhf --use_vllm true --vllm_mode colocate` and the vllm_cpu plugin.

Needs vLLM (`bash scripts/setup.sh --vllm`; run by `bash scripts/test_vllm.sh`); skipped where it is not installed.
Tiny Qwen2 with 2 heads of 64/2 = 32 dims (vLLM's CPU attention has no kernel for head_dim 16). Each run starts
vLLM in process (≈20–40 s on 2 cores) and trains 4 steps.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from swift_run import PACKAGE_DIR, check_ok, logged_steps, run_swift

pytest.importorskip('vllm', reason='vLLM is not installed (bash scripts/setup.sh --vllm, then scripts/test_vllm.sh)')
pytestmark = pytest.mark.slow

VLLM_CPU_PLUGIN = str(PACKAGE_DIR / 'vllm_cpu_plugin.py')
NO_SYNC_PLUGIN = str(Path(__file__).resolve().parent / 'vllm_no_sync_plugin.py')
ROOT = Path(__file__).resolve().parents[1]
VLLM_FLAGS = [
    '--use_vllm', 'true',
    '--vllm_mode', 'colocate',
    '--vllm_enforce_eager', 'true',
    '--vllm_max_model_len', '256',
    '--tuner_type', 'full',
]  # fmt: skip
# Without it vLLM sizes its KV cache from --vllm_gpu_memory_utilization of the machine's memory, and refuses to start
# when other jobs hold part of it.
VLLM_ENV = {'VLLM_CPU_KVCACHE_SPACE': '1'}
BF16 = ['--torch_dtype', 'bfloat16', '--use_cpu', 'true']
ROLLOUT_MODES = ('token_truncate', 'token_mask', 'sequence_truncate', 'sequence_mask')


@pytest.fixture(scope='session')
def tiny_vllm(tmp_path_factory):
    from cispo_swift.demo.tiny import TinyConfig, build

    return build(str(tmp_path_factory.mktemp('tiny_vllm')), TinyConfig(num_heads=2, num_kv_heads=1))


def run(tiny, out, *flags, plugin=True, env=None, extra_plugins=(VLLM_CPU_PLUGIN,)):
    result = run_swift(
        tiny, out, *VLLM_FLAGS, '--max_steps', '4', *flags, plugin=plugin, extra_plugins=extra_plugins,
        env={**VLLM_ENV, **(env or {})}, timeout=900,
    )  # fmt: skip
    check_ok(result)
    rows = logged_steps(out)
    assert len(rows) == 4
    return rows, result.stdout + result.stderr


def finite(rows, key):
    return all(key in r and math.isfinite(r[key]) for r in rows)


def test_reproduction_and_fix_at_the_vllm_level(tmp_path):
    """scripts/repro_vllm_cpu_weight_sync.py: the upstream error, then vLLM's log-probs equal transformers' after
    the reload (fp32, tied embeddings), where before the reload they differed by much more."""
    env = {**os.environ, 'MODELSCOPE_OFFLINE': '1', 'HF_HUB_OFFLINE': '1', 'PYTHONPATH': str(ROOT)}
    script = ROOT / 'scripts' / 'repro_vllm_cpu_weight_sync.py'
    out = subprocess.run(
        [sys.executable, str(script), '--out', str(tmp_path)], capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode == 0, out.stderr[-4000:]
    [line] = [x for x in out.stdout.splitlines() if x.startswith('RESULT ')]
    result = json.loads(line[len('RESULT ') :])
    # Still present in vllm-cpu 0.32.0; when this fails, check whether vLLM fixed the CPU weight reload upstream.
    assert result['load_weights_error'] == "AttributeError: 'Parameter' object has no attribute 'weight_loader'"
    assert result['tied'] and result['max_abs_dlogp_initial'] < 1e-4
    assert result['max_abs_dlogp_before'] > 0.1
    assert result['max_abs_dlogp_after_reload'] < 1e-4


def test_colocate_trains_and_vllm_follows_the_weights(tiny_vllm, tmp_path):
    """fp32: after each weight sync vLLM's log-probs equal the trainer's to float32 rounding; a run whose sync is
    switched off shows what a stale engine looks like in the same metric."""
    flags = ['--num_iterations', '1', '--log_rollout_offpolicy_metrics', 'true']
    rows, output = run(tiny_vllm, tmp_path / 'sync', *flags)
    assert 'colocate weight sync goes through vLLM reload_weights' in output
    assert "VLLM_PLUGINS='" in output  # swift's torchvision plugin skipped (no torchvision in .venv-vllm)
    for r in rows:
        assert abs(r['rollout_correction/log_ppl_abs_diff']) < 1e-5 and abs(r['rollout_correction/kl']) < 1e-5
        # anchor old, one update per batch: on-policy, r ≡ 1 (CISPO is REINFORCE; CISPO_ANCHOR=rollout is the fix)
        assert r['cispo/ratio_min'] == r['cispo/ratio_max'] == 1.0
    assert len({r['loss'] for r in rows}) == 4  # the policy and its samples move

    stale, _ = run(tiny_vllm, tmp_path / 'stale', *flags, extra_plugins=(VLLM_CPU_PLUGIN, NO_SYNC_PLUGIN))
    assert stale[0]['rollout_correction/log_ppl_abs_diff'] < 1e-5  # same initial weights
    assert all(r['rollout_correction/log_ppl_abs_diff'] > 1e-3 for r in stale[1:])


def test_lora_colocate_syncs_the_merged_weights(tiny_vllm, tmp_path):
    # No LoRA dropout: the trainer computes its log-probs in training mode, where dropout on the LoRA path alone
    # moved them 4e-4 to 1e-3 from vLLM's (merged weights, no dropout) in this setting.
    flags = ['--tuner_type', 'lora', '--lora_dropout', '0', '--num_iterations', '1']
    flags += ['--log_rollout_offpolicy_metrics', 'true']
    rows, _ = run(tiny_vllm, tmp_path / 'lora', *flags)
    assert all(abs(r['rollout_correction/log_ppl_abs_diff']) < 1e-5 for r in rows)
    assert rows[-1]['kl'] > 1e-6  # the LoRA policy left the reference, and vLLM still matches it


def test_weight_sync_in_parameter_groups(tiny_vllm, tmp_path):
    """--move_model_batches 2: swift syncs in groups of layers, one in-place reload per group (the layers of the
    other groups keep their weights)."""
    flags = ['--move_model_batches', '2', '--num_iterations', '1', '--log_rollout_offpolicy_metrics', 'true']
    rows, _ = run(tiny_vllm, tmp_path / 'run', *flags)
    assert all(abs(r['rollout_correction/log_ppl_abs_diff']) < 1e-5 for r in rows)
    assert len({r['loss'] for r in rows}) == 4


def test_rollout_anchor_sees_the_train_inference_mismatch(tiny_vllm, tmp_path):
    """CISPO_ANCHOR=rollout with one update per batch: bf16 kernels differ between vLLM and the trainer, so r ≠ 1."""
    flags = [*BF16, '--num_iterations', '1', '--log_rollout_offpolicy_metrics', 'true']
    rows, output = run(tiny_vllm, tmp_path / 'run', *flags, env={'CISPO_ANCHOR': 'rollout'})
    assert 'anchor=rollout' in output
    for key in ('loss', 'grad_norm', 'cispo/ratio_mean', 'cispo/weight_mean', 'rollout_correction/k3_kl'):
        assert finite(rows, key), key
    for r in rows:
        assert r['cispo/ratio_min'] < 1.0 < r['cispo/ratio_max']
        # sensible: a small mismatch, nothing near the cap 5
        assert 0.9 < r['cispo/ratio_min'] and r['cispo/ratio_max'] < 1.1 and r['cispo/clip_frac'] == 0.0
        assert abs(r['cispo/weight_mean'] - 1.0) < 0.01


@pytest.mark.parametrize('mode', ROLLOUT_MODES)
def test_rollout_importance_sampling_modes_run(tiny_vllm, tmp_path, mode):
    # bf16 so that the rollout ratio differs from 1; a threshold just above 1 so that truncation/masking happens
    # (sequence ratios are geometric means of token ratios, closer to 1: about 1 ± 3e-4 here).
    threshold = 1.001 if mode.startswith('token') else 1.0001
    flags = [*BF16, '--num_iterations', '1', '--rollout_importance_sampling_mode', mode]
    flags += ['--rollout_importance_sampling_threshold', str(threshold)]
    rows, _ = run(tiny_vllm, tmp_path / mode, *flags)
    for key in ('is_weight_mean', 'ess', 'clipped_frac', 'kl', 'k3_kl', 'training_ppl', 'rollout_ppl'):
        assert finite(rows, f'rollout_correction/{key}'), key
    assert any(r['rollout_correction/clipped_frac'] > 0 for r in rows)  # the correction acted
    for r in rows:
        assert 0.0 <= r['rollout_correction/clipped_frac'] <= 1.0 and finite(rows, 'loss')
        if mode.endswith('truncate'):
            assert r['rollout_correction/is_weight_mean'] <= threshold + 1e-6


def test_plugin_and_builtin_cispo_log_the_same_losses_with_vllm(tiny_vllm, tmp_path):
    flags = ['--num_iterations', '2']  # the second pass over each batch is off-policy: r ≠ 1
    ours, _ = run(tiny_vllm, tmp_path / 'ours', *flags)
    builtin, output = run(tiny_vllm, tmp_path / 'builtin', *flags, plugin=False)
    assert 'CISPO loss active' not in output
    assert any(r.get('cispo/ratio_max', 1.0) > 1.0 + 1e-4 for r in ours)
    for a, b in zip(ours, builtin):
        assert a['loss'] == pytest.approx(b['loss'], rel=1e-5, abs=1e-7)
        assert a['grad_norm'] == pytest.approx(b['grad_norm'], rel=1e-5)


def test_cpu_colocate_example_runs(tiny_vllm, tmp_path):
    """examples/math_qwen2.5_vllm_colocate_cpu.sh as written (bf16, FP32 head, prompt norm, dynamic sampling,
    offload flags, gradient checkpointing, 4 dataloader workers, TensorBoard), shortened to 2 steps."""
    bin_dir = Path(sys.executable).parent  # swift and python of this venv
    env = {k: v for k, v in os.environ.items() if not k.startswith('CISPO_')}
    env.update(
        PATH=f'{bin_dir}{os.pathsep}{env["PATH"]}', PYTHONPATH=str(ROOT), MODEL_DIR=tiny_vllm['model'],
        DATA=tiny_vllm['train'], OMP_NUM_THREADS='1', TOKENIZERS_PARALLELISM='false',
    )  # fmt: skip
    out = tmp_path / 'run'
    script = ROOT / 'examples' / 'math_qwen2.5_vllm_colocate_cpu.sh'
    result = subprocess.run(
        ['bash', str(script), '--max_steps', '2', '--output_dir', str(out), '--add_version', 'false'],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    check_ok(result)
    output = result.stdout + result.stderr
    assert 'fp32_lm_head=1' in output and 'norm=prompt' in output
    rows = logged_steps(out)
    assert len(rows) == 2 and finite(rows, 'loss') and finite(rows, 'grad_norm')
    assert list(out.glob('runs/*')) or list(out.glob('**/events.out.tfevents.*'))  # --report_to tensorboard


@pytest.fixture(scope='session')
def smollm2():
    """SmolLM2-135M-Instruct's checkpoint: SMOLLM2_DIR, else `python -m cispo_swift model smollm2`."""
    path = os.environ.get('SMOLLM2_DIR')
    if not path:
        found = subprocess.run(
            [sys.executable, '-m', 'cispo_swift', 'model', 'smollm2'], capture_output=True, text=True, timeout=900
        )
        if found.returncode != 0:
            pytest.fail(f'python -m cispo_swift model smollm2 failed:\n{found.stderr[-3000:]}')
        path = found.stdout.strip().splitlines()[-1]
    assert (Path(path) / 'config.json').is_file(), f'{path} is not a checkpoint directory'
    return path


def test_smollm2_colocate_trains_and_vllm_follows_the_weights(smollm2, tiny_vllm, tmp_path):
    """The real model (Llama, 30 layers, tied embeddings) through the same weight sync, fp32, 3 steps."""
    model = {'model': smollm2, 'train': tiny_vllm['train']}
    flags = ['--model_type', 'llama', '--template', 'chatml', '--num_iterations', '1', '--max_steps', '3']
    flags += ['--log_rollout_offpolicy_metrics', 'true', '--learning_rate', '1e-5', '--max_completion_length', '16']
    result = run_swift(
        model, tmp_path / 'run', *VLLM_FLAGS, *flags, extra_plugins=(VLLM_CPU_PLUGIN,), env=VLLM_ENV, timeout=1800
    )
    check_ok(result)
    rows = logged_steps(tmp_path / 'run')
    assert len(rows) == 3 and finite(rows, 'loss')
    assert len({r['loss'] for r in rows}) == 3
    # fp32 on both sides: vLLM's log-probs follow the trainer's weights after every sync.
    assert all(r['rollout_correction/log_ppl_abs_diff'] < 1e-3 for r in rows)


def test_fp32_lm_head_lowers_the_mismatch_on_smollm2(smollm2, tmp_path):
    """scripts/bench_vllm_mismatch.py on 8 prompts, bf16: the trainer's log-probs of the very same vLLM samples, with
    and without CISPO_FP32_LM_HEAD (paired, so the comparison is exact for these tokens)."""
    out = tmp_path / 'mismatch.json'
    cmd = [sys.executable, str(ROOT / 'scripts' / 'bench_vllm_mismatch.py'), '--model', smollm2, '--prompts', '8']
    cmd += ['--only', 'bf16,bf16 + CISPO_FP32_LM_HEAD', '--out', str(out)]
    env = {**os.environ, 'PYTHONPATH': str(ROOT), **VLLM_ENV}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    bf16, fp32_head = json.loads(out.read_text())['results']
    assert bf16['tokens'] == fp32_head['tokens'] > 50
    assert fp32_head['mean_abs_dlogp'] < bf16['mean_abs_dlogp']
    assert fp32_head['prob_correlation'] > bf16['prob_correlation']
