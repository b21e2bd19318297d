"""Arithmetic problems generated in code, with a held-out split and exact-answer rewards (the SmolLM2 demo's task).

Plain Python, no swift or torch import: the ORM wrappers and their registration are in
``cispo_swift/demo/reward_plugin.py``; held-out evaluation of a checkpoint is ``cispo_swift.demo.evaluate``.

A *variant* fixes the operation, the operand range, the system prompt and the wording; ``VARIANTS`` holds every one
whose base-model accuracy was measured (docs/smollm2.md), ``DEFAULT_VARIANT`` the one the demo trains on.

The split: all problems of a variant (every ordered operand pair) are grouped by their unordered pair, so that
``a + b`` and ``b + a`` fall on the same side; the groups are shuffled with ``SPLIT_SEED`` and the first groups,
up to ``n_heldout`` problems, are held out. Training rows are drawn from the rest only, so no held-out problem (nor its
mirror image) is ever trained on. Everything is deterministic given the variant and the seeds.

Rewards (a completion is graded against the row's ``answer`` column, an integer written as a string):

    last_integer   the last integer in the completion equals the answer (``7 + 12 = 19`` is right)
    only_number    the completion, stripped, is exactly the answer (``19``; ``19.`` and ``The answer is 19`` are not)
    boxed          the last ``\\boxed{...}`` holds exactly the answer
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

SPLIT_SEED = 20250613  # fixed once: which problems are held out never changes
SMOLLM_SYSTEM = 'You are a helpful AI assistant named SmolLM, trained by Hugging Face'  # the model's default system


@dataclass(frozen=True)
class Variant:
    """One way of posing the problems. ``user`` is formatted with ``a``, ``b`` (and ``op``); ``system`` may be ''."""

    op: str  # '+', '-' or '*'
    lo: int  # operands drawn from [lo, hi]
    hi: int
    user: str
    system: str = SMOLLM_SYSTEM
    reward: str = 'last_integer'
    nonnegative: bool = True  # for '-': keep only a >= b


FEW_SHOT = 'Examples:\n3 + 5 = 8\n12 + 9 = 21\n7 + 16 = 23\nNow: {a} + {b} = ?'
VARIANTS: Dict[str, Variant] = {
    'add20': Variant('+', 1, 20, 'What is {a} + {b}? Answer with just the number.'),
    'add20_calc': Variant('+', 1, 20, '{a} + {b} =', system='You are a calculator. Reply with only the result.'),
    'add20_fewshot': Variant('+', 1, 20, FEW_SHOT + ' Answer with just the number.'),
    'add20_boxed': Variant('+', 1, 20, 'What is {a} + {b}? Put the final answer in \\boxed{{}}.', reward='boxed'),
    'add20_only': Variant('+', 1, 20, 'What is {a} + {b}? Answer with just the number.', reward='only_number'),
    'add99': Variant('+', 10, 99, 'What is {a} + {b}? Answer with just the number.'),
    'sub30': Variant('-', 1, 30, 'What is {a} - {b}? Answer with just the number.'),
    'mul19': Variant('*', 2, 19, 'What is {a} * {b}? Answer with just the number.'),
}
DEFAULT_VARIANT = 'add20'

_OPS: Dict[str, Callable[[int, int], int]] = {'+': lambda a, b: a + b, '-': lambda a, b: a - b, '*': lambda a, b: a * b}
_INT = re.compile(r'-?\d+')


def get_variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f'unknown arithmetic variant {name!r}; known variants: {sorted(VARIANTS)}')
    return VARIANTS[name]


def all_problems(variant: Variant) -> List[Tuple[int, int]]:
    pairs = [(a, b) for a in range(variant.lo, variant.hi + 1) for b in range(variant.lo, variant.hi + 1)]
    if variant.op == '-' and variant.nonnegative:
        pairs = [(a, b) for a, b in pairs if a >= b]
    return pairs


def split(variant: Variant, n_heldout: int) -> Tuple[List[Tuple[int, int]], List[Tuple[int, int]]]:
    """(train, heldout) operand pairs: disjoint, mirror images on the same side, heldout holds ``n_heldout`` or a few
    more (a group is never cut in two)."""
    groups: Dict[Tuple[int, int], List[Tuple[int, int]]] = {}
    for a, b in all_problems(variant):
        groups.setdefault((min(a, b), max(a, b)), []).append((a, b))
    keys = sorted(groups)
    random.Random(SPLIT_SEED).shuffle(keys)
    heldout, train = [], []
    for key in keys:
        (heldout if len(heldout) < n_heldout else train).extend(groups[key])
    if len(heldout) < n_heldout or not train:
        raise ValueError(
            f'the variant has {len(all_problems(variant))} problems: too few to hold out {n_heldout} and still train. '
            'Hold out fewer, or widen the operand range.'
        )
    return train, heldout


def row(variant: Variant, a: int, b: int) -> Dict:
    """One row in swift's ``messages`` format, plus ``answer`` (the rewards read it) and ``solution`` (swift's
    ``accuracy`` ORM reads it)."""
    answer = _OPS[variant.op](a, b)
    messages = [{'role': 'user', 'content': variant.user.format(a=a, b=b)}]
    if variant.system:
        messages.insert(0, {'role': 'system', 'content': variant.system})
    return {'messages': messages, 'answer': str(answer), 'solution': f'${answer}$'}


def rows(variant_name: str, which: str, n: int, seed: int = 0, n_heldout: int = 128) -> List[Dict]:
    """``n`` rows of ``which`` ('train' or 'heldout'). Train rows are drawn with replacement from the train split
    (seeded, so a run's data depends only on ``seed``); held-out rows are the first ``n`` held-out problems in a fixed
    order (the same ``n`` give the same problems every time)."""
    variant = get_variant(variant_name)
    train, heldout = split(variant, n_heldout)
    if which == 'heldout':
        if n > len(heldout):
            raise ValueError(f'n={n} held-out rows asked for, but only {len(heldout)} are held out (n_heldout).')
        return [row(variant, a, b) for a, b in heldout[:n]]
    if which != 'train':
        raise ValueError(f"which={which!r}: use 'train' or 'heldout'.")
    rng = random.Random(seed)
    return [row(variant, *rng.choice(train)) for _ in range(n)]


# ---- rewards ------------------------------------------------------------------------------------------------------


def last_integer(completion: str) -> Optional[int]:
    found = _INT.findall(completion.replace(',', ''))
    return int(found[-1]) if found else None


def reward_last_integer(completion: str, answer: str) -> float:
    return float(last_integer(completion) == int(answer))


def reward_only_number(completion: str, answer: str) -> float:
    return float(completion.strip() == str(int(answer)))


def reward_boxed(completion: str, answer: str) -> float:
    found = re.findall(r'\\boxed\{\s*(-?\d+)\s*\}', completion)
    return float(bool(found) and int(found[-1]) == int(answer))


REWARDS: Dict[str, Callable[[str, str], float]] = {
    'last_integer': reward_last_integer,
    'only_number': reward_only_number,
    'boxed': reward_boxed,
}


def write(out_dir: str, variant: str = DEFAULT_VARIANT, n_train: int = 2048, seed: int = 0, n_heldout: int = 128):
    """Write ``out_dir/train.jsonl`` (``n_train`` rows drawn from the train split) and ``out_dir/heldout.jsonl``."""
    import json
    import os

    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for which, n in (('train', n_train), ('heldout', n_heldout)):
        paths[which] = os.path.join(out_dir, f'{which}.jsonl')
        with open(paths[which], 'w') as f:
            for r in rows(variant, which, n, seed=seed, n_heldout=n_heldout):
                f.write(json.dumps(r) + '\n')
    return paths


def main(argv=None) -> int:
    import argparse
    import json

    p = argparse.ArgumentParser(prog='python -m cispo_swift.demo.arith', description='Write the arithmetic data set.')
    p.add_argument('--out', required=True, help='directory for train.jsonl and heldout.jsonl')
    p.add_argument('--variant', default=DEFAULT_VARIANT, choices=sorted(VARIANTS))
    p.add_argument('--rows', type=int, default=2048, help='training rows (drawn with replacement from the train split)')
    p.add_argument('--seed', type=int, default=0)
    a = p.parse_args(argv)
    print(json.dumps(write(a.out, a.variant, a.rows, a.seed)))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
