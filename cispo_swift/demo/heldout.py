"""Held-out greedy accuracy during a `swift rlhf` run: a swift trainer callback (`--callbacks cispo_heldout`).

The demo's reward plugin (``cispo_swift/demo/reward_plugin.py``) registers it in ``swift.callbacks.callbacks_map``.
swift parses its command line before plugins load, so the callback is configured through environment variables
(none of them starts with ``CISPO_``, which the trainer reserves for its own options):

    CISPOSWIFT_HELDOUT                  held-out rows (jsonl with ``messages`` and ``answer``, e.g. the heldout.jsonl
                                        that ``python -m cispo_swift.demo.arith`` writes); required
    CISPOSWIFT_HELDOUT_STEPS            when to evaluate: comma-separated optimizer steps, ``0`` = before training,
                                        ``last`` = after the last step (default ``0,last``); ``every:K`` = 0, K, 2K, ...
                                        and the last step
    CISPOSWIFT_HELDOUT_MAX_NEW_TOKENS   generation budget (default 16)
    CISPOSWIFT_HELDOUT_REWARD           grading rule of ``cispo_swift.demo.arith.REWARDS`` (default last_integer)

Each evaluation greedy-decodes every held-out row with the live policy (``model.generate``, evaluation mode, no
gradient; the model goes back to training mode afterwards), and appends ``{"step", "greedy_acc", "n", "seconds",
"completions"}`` to ``OUTPUT_DIR/heldout.jsonl``. Greedy decoding draws no random numbers, so training is unchanged.
"""

from __future__ import annotations

import json
import os
import time
from typing import List, Optional, Set

from swift.callbacks import TrainerCallback

from cispo_swift.demo.arith import REWARDS

ENV_DATA = 'CISPOSWIFT_HELDOUT'
ENV_STEPS = 'CISPOSWIFT_HELDOUT_STEPS'
ENV_MAX_NEW_TOKENS = 'CISPOSWIFT_HELDOUT_MAX_NEW_TOKENS'
ENV_REWARD = 'CISPOSWIFT_HELDOUT_REWARD'
RESULT_FILE = 'heldout.jsonl'


def parse_steps(spec: str, max_steps: int) -> Set[int]:
    """``'0,8,last'`` or ``'every:8'`` -> the set of optimizer steps to evaluate after (0: before training)."""
    spec = spec.strip()
    if spec.startswith('every:'):
        try:
            k = int(spec.split(':', 1)[1])
        except ValueError:
            k = 0
        if k < 1:
            raise ValueError(f'{ENV_STEPS}={spec!r}: every:K needs a positive integer K, e.g. every:8.')
        return set(range(0, max_steps + 1, k)) | {max_steps}
    steps = set()
    for part in filter(None, (p.strip() for p in spec.split(','))):
        if part == 'last':
            steps.add(max_steps)
        elif part.isdigit():
            steps.add(int(part))
        else:
            raise ValueError(
                f'{ENV_STEPS}={spec!r}: use comma-separated step numbers, 0 (before training) and last, '
                'e.g. "0,16,last", or every:K.'
            )
    return steps


def load_rows(path: str) -> List[dict]:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f'{ENV_DATA}={path!r}: no such file. Point it at held-out rows, e.g. the heldout.jsonl written by '
            '`python -m cispo_swift.demo.arith --out DIR`.'
        )
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows or any('messages' not in r or 'answer' not in r for r in rows):
        raise ValueError(f'{path}: every row needs "messages" and "answer" (see cispo_swift.demo.arith.rows).')
    return rows


class HeldoutAccuracy(TrainerCallback):
    """Greedy held-out accuracy of the live policy at the steps ``CISPOSWIFT_HELDOUT_STEPS`` names."""

    def __init__(self, args, trainer):
        super().__init__(args, trainer)
        path = os.environ.get(ENV_DATA)
        if not path:
            raise ValueError(
                f'--callbacks cispo_heldout needs {ENV_DATA}=FILE (held-out rows, e.g. the heldout.jsonl written by '
                '`python -m cispo_swift.demo.arith --out DIR`).'
            )
        self.rows = load_rows(path)
        self.max_new_tokens = int(os.environ.get(ENV_MAX_NEW_TOKENS, '16'))
        reward = os.environ.get(ENV_REWARD, 'last_integer')
        if reward not in REWARDS:
            raise ValueError(f'{ENV_REWARD}={reward!r}: known rules are {sorted(REWARDS)}.')
        self.score = REWARDS[reward]
        self.spec = os.environ.get(ENV_STEPS, '0,last')
        parse_steps(self.spec, 1)  # fail on a bad spec now, before the model is trained
        self.steps: Optional[Set[int]] = None
        self.tokenizer = None
        self.done: Set[int] = set()

    def _evaluate(self, state, model) -> None:
        from transformers import AutoTokenizer

        from cispo_swift.demo.evaluate import generate

        step = state.global_step
        if step in self.done:
            return
        self.done.add(step)
        model = self.trainer.accelerator.unwrap_model(model)
        if self.tokenizer is None:
            self.tokenizer = AutoTokenizer.from_pretrained(model.config.name_or_path)
            self.tokenizer.padding_side = 'left'
        was_training = model.training
        model.eval()
        t0 = time.time()
        try:
            completions = generate(model, self.tokenizer, [r['messages'] for r in self.rows], self.max_new_tokens)
        finally:
            model.train(was_training)
        scores = [self.score(c[0], r['answer']) for c, r in zip(completions, self.rows)]
        record = {
            'step': step,
            'greedy_acc': sum(scores) / len(scores),
            'n': len(scores),
            'max_new_tokens': self.max_new_tokens,
            'seconds': round(time.time() - t0, 1),
            'problems': [r['messages'][-1]['content'] for r in self.rows],
            'answers': [r['answer'] for r in self.rows],
            'completions': [c[0] for c in completions],
            'rewards': scores,
        }
        if state.is_world_process_zero:
            with open(os.path.join(self.args.output_dir, RESULT_FILE), 'a') as f:
                f.write(json.dumps(record) + '\n')
            print(f'cispo-swift: held-out greedy accuracy at step {step}: {record["greedy_acc"]:.3f} '
                  f'({len(scores)} problems, {record["seconds"]} s)', flush=True)  # fmt: skip

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.steps = parse_steps(self.spec, state.max_steps)
        beyond = sorted(s for s in self.steps if s > state.max_steps)
        if beyond and state.is_world_process_zero:
            print(f'cispo-swift: {ENV_STEPS}={self.spec!r}: step(s) {beyond} come after the last step '
                  f'({state.max_steps}); no evaluation there.', flush=True)  # fmt: skip
        if state.global_step in self.steps:
            self._evaluate(state, model or self.trainer.model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.steps is not None and state.global_step in self.steps:
            self._evaluate(state, model or self.trainer.model)


def read_results(run_dir: str) -> List[dict]:
    """The evaluations of a run, by step: ``run_dir`` is swift's output_dir (its newest vN-* is read), a vN-* directory
    or the heldout.jsonl file itself."""
    from cispo_swift.demo.plot import find_logging_jsonl

    path = (
        run_dir if os.path.isfile(run_dir) else os.path.join(os.path.dirname(find_logging_jsonl(run_dir)), RESULT_FILE)
    )
    if not os.path.isfile(path):
        raise FileNotFoundError(f'no {RESULT_FILE} beside the run\'s logging.jsonl ({path}): was it run with '
                                f'--callbacks cispo_heldout and {ENV_DATA} set?')  # fmt: skip
    with open(path) as f:
        return sorted((json.loads(line) for line in f if line.strip()), key=lambda r: r['step'])


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog='python -m cispo_swift.demo.heldout', description='Held-out greedy accuracy of a run, first vs last.'
    )
    p.add_argument('run_dir', help='swift output_dir, vN-* directory or heldout.jsonl')
    p.add_argument(
        '--examples', type=int, default=6, help='show this many problems of each kind (became right, became wrong)'
    )
    a = p.parse_args(argv)
    results = read_results(a.run_dir)
    first, last = results[0], results[-1]
    print(f'held-out greedy accuracy ({first["n"]} problems never trained on, {first["max_new_tokens"]} new tokens):')
    for r in results:
        print(f'  step {r["step"]:>4}: {r["greedy_acc"]:.3f}  ({round(r["greedy_acc"] * r["n"])}/{r["n"]})')
    if len(results) >= 3 and first['step'] == 0:  # steadier than one evaluation: the policy swings between them
        late = results[-2:]
        mean = sum(r['greedy_acc'] for r in late) / len(late)
        print(f'mean of the last {len(late)} evaluations (steps {", ".join(str(r["step"]) for r in late)}): '
              f'{mean:.3f}, {mean - first["greedy_acc"]:+.3f} against step 0')  # fmt: skip
    if len(results) > 1 and 'rewards' in first and 'rewards' in last:
        pairs = list(zip(first['rewards'], last['rewards']))
        fixed = [i for i, (x, y) in enumerate(pairs) if x < y]
        broken = [i for i, (x, y) in enumerate(pairs) if x > y]
        print(f'step {first["step"]} -> {last["step"]}: {len(fixed)} problems became right, {len(broken)} became wrong')
        for label, idx in (('became right', fixed), ('became wrong', broken)):
            for i in idx[: a.examples]:
                print(f'  {label}: {last["problems"][i]!r} (answer {last["answers"][i]}): '
                      f'{first["completions"][i]!r} -> {last["completions"][i]!r}')  # fmt: skip
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
