"""A batch for the data-parallel tests (test_distributed, test_megatron): a linear 'model' shared by the ranks.

Eight sequences with very uneven token counts (rank 0 of two holds rows 0-3, 9 tokens; rank 1 rows 4-7, 26 tokens),
per-row inputs, and old log-probs far enough from the current ones that ratios reach past the cap and the lower bound.
"""

from types import SimpleNamespace

import torch

B, T, V, H = 8, 7, 11, 5
LENGTHS = [1, 3, 2, 3, 7, 6, 7, 6]


def linear_problem(seed: int = 0) -> SimpleNamespace:
    """W [H, V] (the parameter), hidden states [B, T, H], sampled ids, mask, old and reference log-probs, advantages."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(H, V, generator=g, dtype=torch.float64)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.arange(T).unsqueeze(0) < torch.tensor(LENGTHS).unsqueeze(1)
    with torch.no_grad():
        logps = torch.log_softmax(hidden @ weight, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    old = logps + 1.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = logps + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T).clone()
    return SimpleNamespace(weight=weight, hidden=hidden, ids=ids, mask=mask, old=old, ref=ref, adv=adv)
