"""Per-token traces of CISPO training micro-batches, for the collapse diagnosis (docs/cispo_stability.md).

A benchmark-only `--external_plugins` file (after cispo_swift/plugin.py): for every training micro-batch of a
`--loss_type cispo` run it appends one JSON line to `$CISPOSWIFT_TRACE` with the global step, the advantages, and per
completion token its id, log-prob under the current policy, the anchor's (π_old) log-prob and whether it is in the
loss. Everything the diagnosis needs (ratios, caps, the weight each token's gradient carries) is computed from these
offline by `scripts/cispo_diagnose.py`. Nothing about the run changes: the trace reads detached copies.
"""

from __future__ import annotations

import json
import os

import torch

from cispo_swift.trainer import CISPOGRPOTrainer

_PATH = os.environ.get('CISPOSWIFT_TRACE')
_policy_step = CISPOGRPOTrainer._policy_step


def _rounded(t: torch.Tensor, digits: int = 5):
    return [[round(float(v), digits) for v in row] for row in t.tolist()]


def _traced_policy_step(self, model, model_inputs, grpo_batch):
    step = _policy_step(self, model, model_inputs, grpo_batch)
    if _PATH and self.model.training and self.accelerator.is_main_process:
        mask = step.mask.bool()
        width = mask.shape[-1]
        ids = model_inputs['input_ids'][:, -width:] if 'input_ids' in model_inputs else torch.zeros_like(step.mask)
        record = {
            'global_step': int(self.state.global_step),
            'advantages': [round(float(a), 5) for a in grpo_batch.advantages.detach().reshape(len(mask), -1)[:, 0]],
            'mask': mask.int().tolist(),
            'ids': ids.tolist(),
            'logp': _rounded(step.logps.detach().float()),
            'anchor': _rounded(step.tokens.anchor.detach().float().view_as(step.mask)),
        }
        with open(_PATH, 'a') as f:
            f.write(json.dumps(record) + '\n')
    return step


CISPOGRPOTrainer._policy_step = _traced_policy_step
