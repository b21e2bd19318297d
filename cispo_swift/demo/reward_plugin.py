"""The demo tasks' rewards as ms-swift ORMs: an `--external_plugins` file (`python -m cispo_swift plugin-path --tasks`).

Importing it registers the rewards of `cispo_swift.demo.tasks` (the tiny model's) and `cispo_swift.demo.arith` (the
SmolLM2 demo's) in `swift.rewards.orms`, so that `--reward_funcs cispo_tiny_letter` or `cispo_arith` works, and the
held-out accuracy callback of `cispo_swift.demo.heldout` in `swift.callbacks.callbacks_map` (`--callbacks
cispo_heldout`). swift loads plugin files by path under a hashed module name, so imports here are absolute.
"""

from typing import List, Optional

from swift.callbacks import callbacks_map
from swift.rewards import ORM, orms

from cispo_swift.demo.arith import reward_last_integer, reward_only_number
from cispo_swift.demo.heldout import HeldoutAccuracy
from cispo_swift.demo.tasks import letter_exact, letter_fraction, rare_count_reward
from cispo_swift.registry import detach_plugin_dir

detach_plugin_dir(__file__)


class TinyLetter(ORM):
    """Partial credit: share of the completion's non-whitespace characters equal to the row's ``letter``."""

    def __call__(self, completions: List[str], letter: Optional[List[str]] = None, **kwargs) -> List[float]:
        if letter is None:
            raise ValueError('cispo_tiny_letter needs a "letter" column in the dataset (see cispo_swift.demo.tasks).')
        return [letter_fraction(c, t) for c, t in zip(completions, letter)]


class TinyLetterExact(ORM):
    """1.0 when every non-whitespace character of the completion is the row's ``letter`` (at least one), else 0.0."""

    def __call__(self, completions: List[str], letter: Optional[List[str]] = None, **kwargs) -> List[float]:
        if letter is None:
            raise ValueError(
                'cispo_tiny_letter_exact needs a "letter" column in the dataset (see cispo_swift.demo.tasks).'
            )
        return [letter_exact(c, t) for c, t in zip(completions, letter)]


class RareCount(ORM):
    """``min(occurrences of the row's letter, count) / count``, from the ``letter`` and ``count`` columns."""

    def __call__(
        self, completions: List[str], letter: Optional[List[str]] = None, count: Optional[List[int]] = None, **kwargs
    ) -> List[float]:
        if letter is None or count is None:
            raise ValueError(
                'cispo_rare_count needs "letter" and "count" columns in the dataset '
                '(see cispo_swift.demo.tasks.rare_rows).'
            )
        return [rare_count_reward(c, t, int(k)) for c, t, k in zip(completions, letter, count)]


class ArithLastInteger(ORM):
    """1.0 when the last integer in the completion equals the row's ``answer`` (``7 + 12 = 19`` is right), else 0.0."""

    def __call__(self, completions: List[str], answer: Optional[List[str]] = None, **kwargs) -> List[float]:
        if answer is None:
            raise ValueError('cispo_arith needs an "answer" column in the dataset (see cispo_swift.demo.arith.rows).')
        return [reward_last_integer(c, a) for c, a in zip(completions, answer)]


class ArithOnlyNumber(ORM):
    """1.0 when the completion, stripped, is exactly the row's ``answer`` and nothing else, else 0.0."""

    def __call__(self, completions: List[str], answer: Optional[List[str]] = None, **kwargs) -> List[float]:
        if answer is None:
            raise ValueError(
                'cispo_arith_only_number needs an "answer" column in the dataset (see cispo_swift.demo.arith.rows).'
            )
        return [reward_only_number(c, a) for c, a in zip(completions, answer)]


ORMS = {
    'cispo_tiny_letter': TinyLetter,
    'cispo_tiny_letter_exact': TinyLetterExact,
    'cispo_rare_count': RareCount,
    'cispo_arith': ArithLastInteger,
    'cispo_arith_only_number': ArithOnlyNumber,
}
orms.update(ORMS)
# `--callbacks cispo_heldout`: held-out greedy accuracy during training (cispo_swift/demo/heldout.py).
callbacks_map['cispo_heldout'] = HeldoutAccuracy
