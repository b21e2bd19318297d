"""Test-only `--external_plugins` file: sampling that does not depend on how the batch is split over ranks.

transformers samples every decoding step with one `torch.multinomial` call over the rank's whole batch, from the
process RNG, and swift seeds that RNG with `seed + rank` (`set_seed(seed, device_specific=True)`): one process
with 8 sequences and two processes with 4 each draw different completions from the same model. While swift's
rollout runs, this plugin replaces `torch.multinomial` by inverse-CDF sampling with one generator per sequence,
seeded by (rollout number, decoding step, global row = rank · local rows + local row). Completions then depend
only on the model and the global batch, so a 2-process run and a 1-process run of the same global batch can be
compared step by step. Each draw is still an exact sample from the model's distribution.
"""

import torch
import torch.distributed as dist
from swift.rlhf_trainers.rollout_mixin import RolloutTrainerMixin

_multinomial = torch.multinomial
_engine_infer = RolloutTrainerMixin._engine_infer
_state = {'active': False, 'rollout': 0, 'step': 0, 'offset': 0}


def _row_seeded_multinomial(probs, num_samples=1, replacement=False, *, generator=None, out=None):
    if not _state['active'] or num_samples != 1 or probs.dim() != 2 or out is not None:
        return _multinomial(probs, num_samples, replacement, generator=generator, out=out)
    cdf = probs.double().cumsum(-1)  # [B, V]
    draws = []
    for row in range(probs.shape[0]):
        seed = (_state['rollout'] * 10_000 + _state['step']) * 100_000 + _state['offset'] + row
        u = torch.rand((1,), generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * cdf[row, -1]
        draws.append(torch.searchsorted(cdf[row], u, right=True).clamp(max=probs.shape[1] - 1))
    _state['step'] += 1
    return torch.stack(draws).to(probs.device)  # [B, 1]


def _row_seeded_engine_infer(self, infer_requests, *args, **kwargs):
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    _state.update(active=True, step=0, offset=rank * len(infer_requests), rollout=_state['rollout'] + 1)
    try:
        return _engine_infer(self, infer_requests, *args, **kwargs)
    finally:
        _state['active'] = False


torch.multinomial = _row_seeded_multinomial
RolloutTrainerMixin._engine_infer = _row_seeded_engine_infer
