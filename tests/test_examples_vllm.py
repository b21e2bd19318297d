"""The CPU twin of the vLLM colocate example keeps the GPU example's flags: only the documented differences (each
flag that cannot work on CPU, and the scale) may differ. It runs end to end in tests/test_vllm_e2e.py."""

from typing import Dict, List, Tuple

from test_examples import EXAMPLES, check_swift_args, run_script

GPU = EXAMPLES / 'math_qwen2.5_vllm_colocate.sh'
CPU = EXAMPLES / 'math_qwen2.5_vllm_colocate_cpu.sh'


def flag_values(argv: List[str]) -> Dict[str, Tuple[str, ...]]:
    """{'--flag': (values...)} of a `swift rlhf` argv (the last occurrence wins, as in swift's parser)."""
    flags: Dict[str, Tuple[str, ...]] = {}
    name = None
    for arg in argv:
        if arg.startswith('--'):
            name = arg
            flags[name] = ()
        elif name is not None:
            flags[name] += (arg,)
    return flags


def test_cpu_twin_has_the_gpu_examples_flags(tmp_path):
    [(gpu_argv, gpu_env)] = run_script(GPU, tmp_path / 'gpu')
    [(cpu_argv, cpu_env)] = run_script(CPU, tmp_path / 'cpu')
    check_swift_args('rlhf', cpu_argv[1:])
    gpu, cpu = flag_values(gpu_argv[1:]), flag_values(cpu_argv[1:])
    # Cannot work on CPU: DeepSpeed needs an accelerator, vLLM has no sleep mode there, bf16 needs --use_cpu.
    assert set(gpu) - set(cpu) == {'--deepspeed', '--num_train_epochs'}
    # ... and the scale: a local model needs its type and template, a few steps instead of an epoch.
    assert set(cpu) - set(gpu) == {'--use_cpu', '--check_model', '--max_steps', '--model_type', '--template'}
    assert cpu['--sleep_level'] == ('0',) and gpu['--sleep_level'] == ('1',) and cpu['--use_cpu'] == ('true',)
    scale = {'--model', '--dataset', '--reward_funcs', '--max_completion_length'}
    scale |= {'--vllm_max_model_len', '--learning_rate', '--output_dir', '--external_plugins'}
    changed = {k for k in set(gpu) & set(cpu) if gpu[k] != cpu[k]}
    assert changed == scale | {'--sleep_level'}
    # Plugins: the GPU example's, then the vLLM-on-CPU fix and the tiny task's reward.
    assert cpu['--external_plugins'][0] == gpu['--external_plugins'][0]
    assert cpu['--external_plugins'][1].endswith('vllm_cpu_plugin.py')
    assert gpu_env['NPROC_PER_NODE'] == '8' and 'NPROC_PER_NODE' not in cpu_env
    cispo = {k: v for k, v in gpu_env.items() if k.startswith('CISPO_')}
    assert cispo and cispo == {k: v for k, v in cpu_env.items() if k.startswith('CISPO_')}
    assert cpu_env['VLLM_CPU_KVCACHE_SPACE'] == '1'
