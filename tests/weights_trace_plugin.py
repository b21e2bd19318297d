"""Test-only `--external_plugins` file: a callback (`--callbacks cispo_test_weights`) that appends, after every
optimizer step, the global step and a float64 checksum of all trainable weights to OUTPUT_DIR/weights.jsonl (from the
main process; under DeepSpeed ZeRO-3 every process gathers the partitioned weights for it)."""

import contextlib
import json
import os

import torch
from swift.callbacks import TrainerCallback, callbacks_map


class WeightsChecksum(TrainerCallback):
    def _write(self, args, state, model):
        model = self.trainer.accelerator.unwrap_model(model or self.trainer.model)
        params = [p for p in model.parameters() if p.requires_grad]
        gathered = contextlib.nullcontext()
        if any(hasattr(p, 'ds_id') for p in params):
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters(params)
        with gathered, torch.no_grad():
            total = sum(p.detach().double().abs().sum().item() for p in params)
        if state.is_world_process_zero:
            with open(os.path.join(args.output_dir, 'weights.jsonl'), 'a') as f:
                f.write(json.dumps({'step': state.global_step, 'checksum': total}) + '\n')

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._write(args, state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._write(args, state, model)


callbacks_map['cispo_test_weights'] = WeightsChecksum
