"""Held-out accuracy of a checkpoint on the arithmetic task (``cispo_swift.demo.arith``), with batched HF generate.

    python -m cispo_swift.demo.evaluate MODEL_DIR [--variant add20] [--n 128] [--samples 0] [--temperature 1.0]
                                         [--max-new-tokens 16] [--json OUT.json]

Greedy decoding always; with ``--samples K`` also K sampled completions per problem at ``--temperature``, reporting
their mean accuracy and the share of problems whose K samples disagree (the groups that give GRPO-style advantages a
signal). Prompts are the rows' messages through the tokenizer's chat template; every row carries its system message,
so the text is the one swift's ``chatml`` template builds for training (tests/test_smollm2_task.py checks this).
MODEL_DIR is a checkpoint directory (``python -m cispo_swift model smollm2`` prints the base model's) or a swift
output directory's ``checkpoint-N``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

from cispo_swift.demo.arith import REWARDS, VARIANTS, get_variant, rows

N_HELDOUT = 128  # the held-out problems of every variant (`arith.rows`' n_heldout)


def load(model_dir: str, threads: Optional[int] = None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = 'left'
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, tokenizer


def generate(
    model,
    tokenizer,
    messages: Sequence[List[Dict]],
    max_new_tokens: int,
    temperature: float = 0.0,
    num_return_sequences: int = 1,
    batch_size: int = 32,
    seed: int = 0,
) -> List[List[str]]:
    """Completions (text up to the first EOS, special tokens removed) for each conversation: greedy when
    ``temperature`` is 0, else ``num_return_sequences`` samples each (no top-k/top-p, as swift's GRPO defaults)."""
    import torch

    texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    out: List[List[str]] = []
    # Sampling draws from a generator seeded here; fork_rng restores the caller's RNG state afterwards, so that an
    # evaluation inside a training run (cispo_swift.demo.heldout) leaves the run's own sampling unchanged.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(0, len(texts), batch_size):
            chunk = texts[i : i + batch_size]
            out.extend(
                _generate_batch(model, tokenizer, chunk, max_new_tokens, temperature, num_return_sequences, eos_ids)
            )
    return out


def _generate_batch(model, tokenizer, texts, max_new_tokens, temperature, num_return_sequences, eos_ids):
    """One left-padded batch through ``model.generate``; each prompt's completions cut at their first EOS."""
    import torch

    batch = tokenizer(texts, return_tensors='pt', padding=True, add_special_tokens=False)
    kwargs = {'do_sample': False} if temperature == 0 else {'do_sample': True, 'temperature': temperature}
    if temperature:
        kwargs.update(top_k=0, top_p=1.0, num_return_sequences=num_return_sequences)
    with torch.inference_mode():
        ids = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **kwargs)
    ids = ids[:, batch['input_ids'].shape[1] :].tolist()
    k = num_return_sequences if temperature else 1
    out: List[List[str]] = []
    for j in range(0, len(ids), k):
        group = []
        for seq in ids[j : j + k]:
            cut = next((t for t, tok in enumerate(seq) if tok in eos_ids), len(seq))
            group.append(tokenizer.decode(seq[:cut], skip_special_tokens=True))
        out.append(group)
    return out


def evaluate(
    model_dir: str,
    variant: str = 'add20',
    n: int = 128,
    max_new_tokens: int = 16,
    samples: int = 0,
    temperature: float = 1.0,
    reward: Optional[str] = None,
    threads: Optional[int] = 1,
    model_and_tokenizer=None,
) -> Dict:
    """Greedy accuracy on the first ``n`` held-out problems (and sampled statistics with ``samples`` > 0).

    Returns ``{'greedy_acc', 'greedy': [{'prompt', 'answer', 'completion', 'reward'}...], 'sampled_acc',
    'groups_with_signal', ...}`` plus the conditions. ``reward`` defaults to the variant's own."""
    if not 1 <= n <= N_HELDOUT or max_new_tokens < 1 or samples < 0 or (samples and not 0.0 < temperature < math.inf):
        raise ValueError(
            f'n={n}, max_new_tokens={max_new_tokens}, samples={samples}, temperature={temperature}: n must be in '
            f'[1, {N_HELDOUT}], max_new_tokens ≥ 1, samples ≥ 0, and with samples the temperature a finite number > 0.'
        )
    v = get_variant(variant)
    reward_name = reward or v.reward
    score = REWARDS[reward_name]
    data = rows(variant, 'heldout', n)
    model, tokenizer = model_and_tokenizer or load(model_dir, threads)
    t0 = time.time()
    greedy = [g[0] for g in generate(model, tokenizer, [r['messages'] for r in data], max_new_tokens)]
    result = {
        'model_dir': model_dir,
        'variant': variant,
        'reward': reward_name,
        'n': n,
        'max_new_tokens': max_new_tokens,
        'greedy_acc': sum(score(c, r['answer']) for c, r in zip(greedy, data)) / n,
        'greedy': [
            {'prompt': r['messages'][-1]['content'], 'answer': r['answer'], 'completion': c, 'reward': s}
            for c, r, s in zip(greedy, data, (score(c, r['answer']) for c, r in zip(greedy, data)))
        ],
        'greedy_seconds': round(time.time() - t0, 1),
    }
    if samples:
        t0 = time.time()
        groups = generate(model, tokenizer, [r['messages'] for r in data], max_new_tokens, temperature, samples)
        scores = [[score(c, r['answer']) for c in g] for g, r in zip(groups, data)]
        result.update(
            temperature=temperature,
            samples=samples,
            sampled_acc=sum(map(sum, scores)) / (n * samples),
            groups_with_signal=sum(len(set(s)) > 1 for s in scores) / n,
            sampled_examples=[g[:2] for g in groups[:8]],
            sampled_seconds=round(time.time() - t0, 1),
        )
    return result


def _int_in(low: int, high: Optional[int] = None, what: str = 'a count'):
    """argparse type: an integer in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not an integer ({what})') from None
        if value < low or (high is not None and value > high):
            bound = f'≥ {low}' if high is None else f'in [{low}, {high}]'
            raise argparse.ArgumentTypeError(f'{value}: it must be {bound} ({what})')
        return value

    return parse


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None
    if not 0.0 < value < math.inf:  # NaN fails too
        raise argparse.ArgumentTypeError(
            f'{text}: the sampling temperature divides the logits, so it must be a finite number > 0 (e.g. 0.7)'
        )
    return value


def problem_with_model_dir(path: str) -> Optional[str]:
    """Why `path` is not a checkpoint directory that ``from_pretrained`` can load (None if it looks like one)."""
    if not os.path.isdir(path):
        return 'no such directory' if not os.path.exists(path) else 'not a directory'
    if not os.path.isfile(os.path.join(path, 'config.json')):
        return (
            'no config.json in it: pass a checkpoint directory (python -m cispo_swift model smollm2 prints the base '
            "model's; a training run's are OUTPUT_DIR/.../checkpoint-N)"
        )
    return None


def problem_with_output(path: str) -> Optional[str]:
    """Why the result cannot be written to `path` (None if it can), checked before the evaluation runs."""
    if os.path.isdir(path):
        return 'is a directory: name the JSON file to write'
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        return f'its directory {parent} does not exist: create it first or choose another path'
    if not os.access(parent, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        return 'is not writable: choose another path'
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog='python -m cispo_swift.demo.evaluate', description=__doc__.split('\n\n')[0])
    p.add_argument('model_dir')
    p.add_argument('--variant', default='add20', choices=sorted(VARIANTS), help='arithmetic variant')
    p.add_argument('--reward', default=None, choices=sorted(REWARDS), help="grading rule (default: the variant's)")
    p.add_argument('--n', type=_int_in(1, N_HELDOUT, 'held-out problems'), default=N_HELDOUT,
                   help=f'held-out problems (the first n, always the same ones; at most {N_HELDOUT})')  # fmt: skip
    p.add_argument('--max-new-tokens', type=_int_in(1, what='tokens generated per answer'), default=16)
    p.add_argument('--samples', type=_int_in(0, what='samples per problem'), default=0,
                   help='sampled completions per problem (0: greedy only)')  # fmt: skip
    p.add_argument('--temperature', type=_temperature, default=1.0, help='sampling temperature for --samples')
    p.add_argument('--threads', type=_int_in(1, what='torch threads'), default=1,
                   help='torch threads (1 is fastest on a shared 2-core machine)')  # fmt: skip
    p.add_argument('--json', default=None, help='write the full result (every completion) to this file')
    a = p.parse_args(argv)
    # Before anything loads: a bad path would otherwise fail in from_pretrained, or after the whole evaluation.
    problem = problem_with_model_dir(a.model_dir)
    if problem:
        p.error(f'MODEL_DIR {a.model_dir}: {problem}.')
    if a.json is not None and problem_with_output(a.json):
        p.error(f'--json {a.json}: {problem_with_output(a.json)}.')
    res = evaluate(a.model_dir, a.variant, a.n, a.max_new_tokens, a.samples, a.temperature, a.reward, a.threads)
    line = f'{a.variant} ({res["reward"]}): greedy {res["greedy_acc"]:.3f} on {a.n} held-out problems'
    if a.samples:
        line += (
            f'; sampled (T={a.temperature}, {a.samples} each) {res["sampled_acc"]:.3f}, '
            f'{res["groups_with_signal"]:.0%} of problems with mixed rewards'
        )
    print(line)
    if a.json:
        with open(a.json, 'w') as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
