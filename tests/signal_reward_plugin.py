"""Test-only `--external_plugins` file: rewards that control whether a generation batch carries any signal.

`cispo_test_constant_reward` gives every completion 1.0: every group's rewards are equal, every advantage is 0 and
the CISPO gradient is exactly zero. `cispo_test_alternating_reward` does that on the 1st, 3rd, ... call (one call per
generation batch on each rank) and on the others gives the completions of the batch 0, 1, 0, 1, ... in order, so
that every group's rewards differ and the gradient is not zero.
"""

from typing import List

from swift.rewards import ORM, orms


class ConstantReward(ORM):
    def __call__(self, completions: List[str], **kwargs) -> List[float]:
        return [1.0] * len(completions)


class AlternatingReward(ORM):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def __call__(self, completions: List[str], **kwargs) -> List[float]:
        self.calls += 1
        if self.calls % 2 == 1:
            return [1.0] * len(completions)
        return [float(i % 2) for i in range(len(completions))]


orms['cispo_test_constant_reward'] = ConstantReward
orms['cispo_test_alternating_reward'] = AlternatingReward
