"""Test-only `--external_plugins` file: some completions are empty, as when a real model samples EOS first.

While swift's rollout generates (`RolloutTrainerMixin._engine_infer`), every `generate` call gets one more logits
processor that, at the first decoding step, leaves only an EOS token possible for the rows whose index in the
generate batch is a multiple of `FORCE_EOS_EVERY` (default 4): those completions end before their first token. The
processor runs after transformers' own (custom processors are appended), so it also overrides `min_new_tokens`.
Other rows and steps are untouched.

With `FORCE_EOS_RECORD=FILE`, each generation batch that `GRPOTrainer._prepare_batch_inputs` returns appends one JSON
line to FILE: the token normaliser of the loss (`num_items_in_batch`) and each micro-batch's per-row completion
token counts (the completion masks' row sums).
"""

import json
import os

import torch
from swift.rlhf_trainers import GRPOTrainer
from swift.rlhf_trainers.rollout_mixin import RolloutTrainerMixin
from transformers import GenerationMixin, LogitsProcessor, LogitsProcessorList

EVERY = int(os.environ.get('FORCE_EOS_EVERY', '4'))
RECORD = os.environ.get('FORCE_EOS_RECORD')
_generate = GenerationMixin.generate
_engine_infer = RolloutTrainerMixin._engine_infer
_prepare_batch_inputs = GRPOTrainer._prepare_batch_inputs
_state = {'active': False}


class ForceEOSFirst(LogitsProcessor):
    def __init__(self, eos_token_id: int):
        self.eos = eos_token_id
        self.start = None

    def __call__(self, input_ids, scores):
        if self.start is None:
            self.start = input_ids.shape[1]
        if input_ids.shape[1] == self.start:
            rows = torch.arange(scores.shape[0], device=scores.device) % EVERY == 0
            forced = torch.full_like(scores[0], float('-inf'))
            forced[self.eos] = 0.0
            scores = torch.where(rows[:, None], forced, scores)
        return scores


def _generate_with_forced_eos(self, *args, **kwargs):
    if _state['active']:
        config = kwargs.get('generation_config') or self.generation_config
        eos = config.eos_token_id
        eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        # The EOS that is also the pad token when there is one (SmolLM2: <|im_end|> is both; the tiny model stops on
        # <|im_end|> or its pad <|endoftext|>): swift drops pad ids from the generated ids, so the completion then
        # has no token at all, not even the EOS.
        eos = config.pad_token_id if config.pad_token_id in eos else eos[0]
        processors = LogitsProcessorList(kwargs.pop('logits_processor', None) or [])
        processors.append(ForceEOSFirst(int(eos)))
        kwargs['logits_processor'] = processors
    return _generate(self, *args, **kwargs)


def _engine_infer_forcing(self, *args, **kwargs):
    _state['active'] = True
    try:
        return _engine_infer(self, *args, **kwargs)
    finally:
        _state['active'] = False


def _prepare_batch_inputs_recording(self, samples):
    batches = _prepare_batch_inputs(self, samples)
    if RECORD:
        record = {
            'num_items_in_batch': float(batches[0]['grpo_batch'].num_items_in_batch),
            'row_tokens': [b['grpo_batch'].completion_mask.sum(-1).tolist() for b in batches],
        }
        with open(RECORD, 'a') as f:
            f.write(json.dumps(record) + '\n')
    return batches


GenerationMixin.generate = _generate_with_forced_eos
RolloutTrainerMixin._engine_infer = _engine_infer_forcing
GRPOTrainer._prepare_batch_inputs = _prepare_batch_inputs_recording
