"""Test-only `--external_plugins` file: swift GRPO under real FSDP2 on CPU (gloo), for `--fsdp fsdp2 --use_cpu true`.

Two gaps stop it in accelerate 1.15 / ms-swift 4.6.0 (docs/distributed.md, "FSDP2"):

- accelerate drops FSDP on CPU silently: `AcceleratorState.__init__` turns an fsdp plugin into
  `DistributedType.FSDP` only for GPU-like device types, not `MULTI_CPU`, so the model is wrapped in DDP. Here
  the state is switched to FSDP after accelerate's own `__init__`, and mirrored into `PartialState._shared_state`
  as accelerate itself does (otherwise the next `AcceleratorState()` copies `MULTI_CPU` back).
- swift's rollout (`TransformersEngine._infer`) runs under `torch.inference_mode()`; FSDP2's first all-gather then
  allocates its persistent all-gather buffers as inference tensors, and the next all-gather outside inference mode
  (the old-policy log-prob pass, under `no_grad`) fails: "Inplace update to inference tensor outside InferenceMode
  is not allowed". Here the rollout runs under `no_grad` instead, which it needs no more than that.
"""

import os

import accelerate.state as accelerate_state
import torch
from accelerate.utils import DistributedType
from swift.infer_engine import TransformersEngine

_init = accelerate_state.AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        accelerate_state.PartialState._shared_state['distributed_type'] = self.distributed_type
        print(f'fsdp-cpu: FSDP2 on for MULTI_CPU, rank {os.environ.get("RANK")}', flush=True)


accelerate_state.AcceleratorState.__init__ = _fsdp_on_cpu
TransformersEngine._infer = torch.no_grad()(TransformersEngine._infer.__wrapped__)
