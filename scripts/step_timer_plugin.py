"""Benchmark-only `--external_plugins` file: a swift callback (`--callbacks cispo_step_timer`) that writes, for every
optimizer step, its wall time and the memory high-water marks to OUTPUT_DIR/step_times.jsonl.

    {"step": 3, "seconds": 1.82, "peak_rss_mib": 3120.5, "cuda_peak_mib": 0.0}

seconds: from the callback's on_step_begin to on_step_end (generation, scoring, forward, backward and the
optimizer step of that step); peak_rss_mib: the process's resident-set high-water mark so far (VmHWM);
cuda_peak_mib: torch.cuda.max_memory_allocated so far (0 without CUDA).
"""

import json
import os
import resource
import time

import torch
from swift.callbacks import TrainerCallback, callbacks_map


class StepTimer(TrainerCallback):
    def __init__(self, args, trainer):
        super().__init__(args, trainer)
        self.path = os.path.join(args.output_dir, 'step_times.jsonl')
        self.t0 = None

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.synchronize()
        row = {
            'step': state.global_step,
            'seconds': time.perf_counter() - self.t0,
            'peak_rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            'cuda_peak_mib': torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0,
        }
        if state.is_world_process_zero:
            with open(self.path, 'a') as f:
                f.write(json.dumps(row) + '\n')


callbacks_map['cispo_step_timer'] = StepTimer
