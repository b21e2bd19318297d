"""Base SmolLM2-135M-Instruct accuracy on each arithmetic variant: which one gives RL a learning signal?

    PYTHONPATH=. python scripts/smollm2_task_candidates.py [--variants add20 add99 ...] [--out OUT]

For each variant of `cispo_swift.demo.arith.VARIANTS`: greedy accuracy on the first N held-out problems, and for each
temperature in TEMPERATURES the mean accuracy of SAMPLES sampled completions per problem and the share of problems
whose samples disagree (a group of completions with mixed rewards is what gives group-relative advantages a signal).
The greedy completions are also graded with every reward of `arith.REWARDS`, and, when the math_verify package is
importable, with swift's own `accuracy` ORM (MathAccuracy, against the rows' `solution` column). Prints one line per
variant and writes
OUT.json (default runs/smollm2_task_candidates.json) after each. The model is the Q4_1 GGUF checkpoint, dequantised
(`python -m cispo_swift model smollm2`); one torch thread (fastest on a shared 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cispo_swift.demo import arith, evaluate
from cispo_swift.demo.smollm2 import ensure_smollm2

N = 128
SAMPLES = 4
TEMPERATURES = (1.0, 0.7)
MAX_NEW_TOKENS = 16
ROOT = Path(__file__).resolve().parents[1]


def swift_accuracy():
    """swift's `accuracy` ORM (math_verify), or None when math_verify is not installed."""
    import importlib.util

    if importlib.util.find_spec('math_verify') is None:
        return None
    from swift.rewards import orms

    orm = orms['accuracy']()
    return lambda completions, data: orm(completions, solution=[r['solution'] for r in data])


def measure(name: str, model_and_tokenizer, n: int, max_new_tokens: int = MAX_NEW_TOKENS, temperatures=TEMPERATURES):
    v = arith.get_variant(name)
    data = arith.rows(name, 'heldout', n)
    messages = [r['messages'] for r in data]
    greedy = [g[0] for g in evaluate.generate(*model_and_tokenizer, messages, max_new_tokens)]
    accuracy = swift_accuracy()
    entry = {
        'variant': vars(v),
        'greedy_acc': sum(arith.REWARDS[v.reward](c, r['answer']) for c, r in zip(greedy, data)) / n,
        'greedy_by_reward': {
            k: sum(fn(c, r['answer']) for c, r in zip(greedy, data)) / n for k, fn in arith.REWARDS.items()
        },
        'greedy_examples': greedy[:6],
        'max_new_tokens': max_new_tokens,
        'by_temperature': {},
    }
    if accuracy is not None:
        entry['greedy_by_reward']['swift_accuracy'] = sum(accuracy(greedy, data)) / n
    for temp in temperatures:
        groups = evaluate.generate(*model_and_tokenizer, messages, max_new_tokens, temp, SAMPLES)
        scores = [[arith.REWARDS[v.reward](c, r['answer']) for c in g] for g, r in zip(groups, data)]
        entry['by_temperature'][temp] = {
            'sampled_acc': sum(map(sum, scores)) / (n * SAMPLES),
            'groups_with_signal': sum(len(set(s)) > 1 for s in scores) / n,
            'examples': groups[:3],
        }
        if accuracy is not None:
            acc = [accuracy(g, [r] * len(g)) for g, r in zip(groups, data)]
            entry['by_temperature'][temp]['swift_accuracy'] = {
                'sampled_acc': sum(map(sum, acc)) / (n * SAMPLES),
                'groups_with_signal': sum(len(set(s)) > 1 for s in acc) / n,
            }
    return entry


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--variants', nargs='+', default=list(arith.VARIANTS), choices=list(arith.VARIANTS))
    p.add_argument('--out', default=str(ROOT / 'runs' / 'smollm2_task_candidates'))
    p.add_argument('--n', type=int, default=N)
    p.add_argument('--max-new-tokens', type=int, default=MAX_NEW_TOKENS)
    p.add_argument('--temperatures', type=float, nargs='+', default=list(TEMPERATURES))
    a = p.parse_args()
    mt = evaluate.load(str(ensure_smollm2()), threads=1)
    results = {}
    for name in a.variants:
        t0 = time.time()
        entry = measure(name, mt, a.n, a.max_new_tokens, a.temperatures)
        entry['seconds'] = round(time.time() - t0)
        results[name] = entry
        temps = ', '.join(
            f'T={t}: sampled {v["sampled_acc"]:.3f}, mixed {v["groups_with_signal"]:.0%}'
            for t, v in entry['by_temperature'].items()
        )
        print(f'{name}: greedy {entry["greedy_acc"]:.3f} {entry["greedy_by_reward"]}; {temps}', flush=True)
        Path(a.out + '.json').write_text(json.dumps(results, indent=1))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
