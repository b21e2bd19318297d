"""Synthetic tasks for the tiny CPU demo and their rewards.

Plain Python, no swift import: the ORM wrappers that swift calls, and their registration, are in
``cispo_swift/demo/reward_plugin.py`` (the ``--external_plugins`` file), under the names below.

Task ``letter``: the user asks for one letter repeated (``Write the letter b again and again.``); the row
carries that letter in the ``letter`` column. A randomly initialised model emits the letter now and then,
which is enough for group-relative advantages to find it.

    cispo_tiny_letter        partial credit: share of the completion's non-space characters equal to ``letter``
    cispo_tiny_letter_exact  1.0 when every non-space character is ``letter`` (at least one), else 0.0

Task ``rare`` (the sample-efficiency benchmark, ``scripts/bench_sample_efficiency.py``): the user asks for a letter
``count`` times (``Write the letter z 8 times.``); the reward counts that letter in the completion, capped. The
default letter ``z`` appears in only 5 of the tiny tokenizer's 600 tokens (``z zz zzz zzzz`` and `` z``), none of
them in the prompt or the chat scaffolding, so the random initial policy rarely samples the tokens the reward
depends on: the mechanism CISPO targets (MiniMax-M1 section 3.1: rare tokens whose ratio leaves PPO's trust region
on the first off-policy update, after which clipping gives them no gradient).

    cispo_rare_count         min(occurrences of ``letter``, ``count``) / ``count``: partial credit per rare character
"""

import random
from typing import Dict, List

LETTER_PROMPTS = (
    'Write the letter {letter} again and again.',
    'Repeat the letter {letter}.',
    'Say {letter} many times.',
    'Only write {letter}.',
)
DEFAULT_LETTERS = 'a'


def letter_fraction(completion: str, letter: str) -> float:
    """Share of the non-whitespace characters in ``completion`` equal to ``letter`` (0.0 if there are none).

    Whitespace is ignored so that ``a a a`` and ``aaa`` both score 1.0: the byte-level BPE has both
    ``a`` and `` a`` tokens, and either way of repeating the letter is a correct answer.
    """
    chars = ''.join(completion.split())
    if not chars:
        return 0.0
    return chars.count(letter) / len(chars)


def letter_exact(completion: str, letter: str) -> float:
    """1.0 when the completion has non-whitespace characters and all of them are ``letter``, else 0.0."""
    chars = ''.join(completion.split())
    return float(bool(chars) and chars == letter * len(chars))


def letter_rows(n: int, seed: int, letters: str = DEFAULT_LETTERS) -> List[Dict]:
    """``n`` rows in swift's ``messages`` format plus the ``letter`` column the rewards read."""
    if not letters:
        raise ValueError('letters is empty: give at least one target letter, e.g. letters="a".')
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        letter = rng.choice(letters)
        prompt = rng.choice(LETTER_PROMPTS).format(letter=letter)
        rows.append({'messages': [{'role': 'user', 'content': prompt}], 'letter': letter})
    return rows


RARE_PROMPTS = (
    'Write the letter {letter} {count} times.',
    'Repeat the letter {letter} {count} times.',
    'Say {letter} {count} times.',
)
RARE_LETTER = 'z'
RARE_COUNT = 8


def rare_count_reward(completion: str, letter: str, count: int) -> float:
    """``min(occurrences of letter in completion, count) / count``: 0.0 without the letter, 1.0 from ``count`` on.

    Other characters cost nothing: the reward measures only how often the policy emits the rare letter's tokens.
    """
    if count < 1:
        raise ValueError(f'count={count}: the reward is occurrences / count, so count must be >= 1.')
    return min(completion.count(letter), count) / count


def rare_rows(n: int, seed: int, letter: str = RARE_LETTER, count: int = RARE_COUNT) -> List[Dict]:
    """``n`` rows in swift's ``messages`` format plus the ``letter`` and ``count`` columns the reward reads."""
    if len(letter) != 1:
        raise ValueError(f'letter={letter!r}: give one character, e.g. letter="z".')
    if count < 1:
        raise ValueError(f'count={count}: ask for the letter at least once.')
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = rng.choice(RARE_PROMPTS).format(letter=letter, count=count)
        rows.append({'messages': [{'role': 'user', 'content': prompt}], 'letter': letter, 'count': count})
    return rows


TASKS = {'letter': letter_rows, 'rare': rare_rows}
