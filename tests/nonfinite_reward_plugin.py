"""Test-only `--external_plugins` file: rewards that are not finite numbers.

`cispo_test_inf_reward` gives +inf to the first completion of every batch (0 elsewhere): the advantages become
NaN/inf and CISPO_CHECK_FINITE stops the run. `cispo_test_nan_reward` gives NaN there: swift sums rewards with
`nansum`, its meaning of "not applicable", so the run trains on the other rewards.
"""

from typing import List

from swift.rewards import ORM, orms


class _FirstIs(ORM):
    value = 0.0

    def __call__(self, completions: List[str], **kwargs) -> List[float]:
        return [self.value if i == 0 else 0.0 for i in range(len(completions))]


class InfReward(_FirstIs):
    value = float('inf')


class NanReward(_FirstIs):
    value = float('nan')


orms['cispo_test_inf_reward'] = InfReward
orms['cispo_test_nan_reward'] = NanReward
