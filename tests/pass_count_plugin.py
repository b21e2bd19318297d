"""Test-only `--external_plugins` file: a callback (`--callbacks cispo_test_passes`) that appends, after every
optimizer step, how many training forward passes (grad enabled, model in train mode) and how many backward passes
through the LM head ran during that step to OUTPUT_DIR/passes.jsonl."""

import json
import os

import torch
from swift.callbacks import TrainerCallback, callbacks_map


class PassCount(TrainerCallback):
    forwards = 0
    backwards = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model = self.trainer.accelerator.unwrap_model(model or self.trainer.model)

        def count_forward(module, inputs, output):
            if torch.is_grad_enabled() and module.training:
                PassCount.forwards += 1

        def count_backward(grad):
            PassCount.backwards += 1
            return grad

        model.register_forward_hook(count_forward)
        model.get_output_embeddings().weight.register_hook(count_backward)

    def on_step_end(self, args, state, control, **kwargs):
        with open(os.path.join(args.output_dir, 'passes.jsonl'), 'a') as f:
            row = {'step': state.global_step, 'forward': self.forwards, 'backward': self.backwards}
            f.write(json.dumps(row) + '\n')
        PassCount.forwards = PassCount.backwards = 0


callbacks_map['cispo_test_passes'] = PassCount
