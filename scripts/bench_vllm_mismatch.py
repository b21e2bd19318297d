"""Train/inference log-prob mismatch with vLLM on CPU, as MiniMax-M1 §3.1 measures it (their model: 0.987 → 0.997).

    .venv-vllm/bin/python scripts/bench_vllm_mismatch.py --model DIR [--prompts 32] [--max-tokens 48] [--out FILE.json]

vLLM samples completions (temperature 1) and returns the log-prob of each sampled token ("inference"); the
transformers model then scores the same tokens as swift's trainer does ("training"): a full forward (bf16 models
wrapped by accelerate's bf16 mixed precision, as swift trains them with --torch_dtype bfloat16: autocast, outputs in
float32), then `trl.trainer.utils.selective_log_softmax`. Over all completion tokens it reports the Pearson
correlation of the two token probabilities, the mean and max |Δ log p| and the mean Δ log p (training − inference),
for these settings:

| name | model dtype | trainer LM head | vLLM LM head |
|---|---|---|---|
| bf16 | bf16 | bf16 | bf16 |
| bf16 + CISPO_FP32_LM_HEAD | bf16 | fp32 (`cispo_swift.fused_head.fp32_lm_head`) | bf16 |
| bf16 + vLLM FP32 head | bf16 | bf16 | fp32 (vLLM `hf_overrides={'head_dtype': 'float32'}`) |
| bf16 + FP32 head both sides | bf16 | fp32 | fp32 |
| fp32 | fp32 | fp32 | fp32 |

Each vLLM engine runs in a child process of this script (one per vLLM setting). Prompts: "What is a + b? Answer
with just the number." for a, b drawn from 1..20 with a fixed seed, in the model's chat template.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

SETTINGS = [
    # name, model dtype, trainer fp32 head, vLLM fp32 head
    ('bf16', 'bfloat16', False, False),
    ('bf16 + CISPO_FP32_LM_HEAD', 'bfloat16', True, False),
    ('bf16 + vLLM FP32 head', 'bfloat16', False, True),
    ('bf16 + FP32 head both sides', 'bfloat16', True, True),
    ('fp32', 'float32', False, False),
]


def prompts(n: int, seed: int):
    rng = random.Random(seed)
    pairs = [(rng.randint(1, 20), rng.randint(1, 20)) for _ in range(n)]
    return [[{'role': 'user', 'content': f'What is {a} + {b}? Answer with just the number.'}] for a, b in pairs]


def generate(args) -> None:
    """Child process: vLLM samples, written as JSON (prompt ids, completion ids, log-probs)."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams, TokensPrompt

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    prompt_ids = [
        tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False)
        for m in prompts(args.prompts, args.seed)
    ]
    kwargs = {'hf_overrides': {'head_dtype': 'float32'}} if args.vllm_fp32_head else {}
    llm = LLM(model=args.model, dtype=args.dtype, enforce_eager=True, max_model_len=512, seed=args.seed, **kwargs)
    params = SamplingParams(temperature=1.0, max_tokens=args.max_tokens, logprobs=0, seed=args.seed)
    start = time.perf_counter()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params)
    seconds = time.perf_counter() - start
    samples = []
    for ids, out in zip(prompt_ids, outputs):
        completion = out.outputs[0]
        logps = [entry[token].logprob for entry, token in zip(completion.logprobs, completion.token_ids)]
        samples.append({'prompt': list(ids), 'completion': list(completion.token_ids), 'logps': logps})
    with open(args.samples, 'w') as f:
        json.dump({'samples': samples, 'generate_seconds': seconds}, f)


def training_logps(model, sample) -> list:
    """The completion tokens' log-probs as swift's trainer computes them (full logits, selective_log_softmax)."""
    import torch
    from trl.trainer.utils import selective_log_softmax

    ids = torch.tensor([sample['prompt'] + sample['completion']])
    n = len(sample['completion'])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, -n - 1 : -1, :]
    return selective_log_softmax(logits, ids[:, -n:])[0].float().tolist()


def mismatch(train: list, infer: list) -> dict:
    import torch

    t, i = torch.tensor(train, dtype=torch.float64), torch.tensor(infer, dtype=torch.float64)
    delta = t - i
    p_t, p_i = t.exp(), i.exp()
    corr = torch.corrcoef(torch.stack([p_t, p_i]))[0, 1].item()
    return {
        'tokens': len(train),
        'prob_correlation': corr,
        'mean_abs_dlogp': delta.abs().mean().item(),
        'max_abs_dlogp': delta.abs().max().item(),
        'mean_dlogp': delta.mean().item(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', required=True, help='HF model directory')
    parser.add_argument('--prompts', type=int, default=32)
    parser.add_argument('--max-tokens', type=int, default=48)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out', default=None, help='write the results as JSON here too')
    parser.add_argument('--only', default=None, help='comma-separated setting names (default: all)')
    # child-process mode
    parser.add_argument('--generate', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--dtype', default='bfloat16', help=argparse.SUPPRESS)
    parser.add_argument('--vllm-fp32-head', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--samples', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.generate:
        generate(args)
        return 0

    import torch
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from cispo_swift.fused_head import fp32_lm_head

    os.environ.setdefault('VLLM_CPU_KVCACHE_SPACE', '1')
    os.environ.setdefault('VLLM_PLUGINS', '')  # nothing that imports torchvision
    wanted = SETTINGS if args.only is None else [s for s in SETTINGS if s[0] in args.only.split(',')]
    results, cache = [], {}
    for name, dtype, trainer_fp32_head, vllm_fp32_head in wanted:
        key = (dtype, vllm_fp32_head)
        if key not in cache:
            with tempfile.NamedTemporaryFile(suffix='.json', delete=False) as f:
                path = f.name
            cmd = [sys.executable, __file__, '--generate', '--model', args.model, '--dtype', dtype]
            cmd += ['--prompts', str(args.prompts), '--max-tokens', str(args.max_tokens), '--seed', str(args.seed)]
            cmd += ['--samples', path] + (['--vllm-fp32-head'] if vllm_fp32_head else [])
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            with open(path) as f:
                cache[key] = json.load(f)
            os.unlink(path)
        samples = cache[key]['samples']
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, dtype)).eval()
        if trainer_fp32_head:
            fp32_lm_head(model)
        if dtype == 'bfloat16':
            model = Accelerator(mixed_precision='bf16', cpu=True).prepare_model(model)
        train, infer = [], []
        for sample in samples:
            train += training_logps(model, sample)
            infer += sample['logps']
        row = {'setting': name, 'model_dtype': dtype, 'trainer_fp32_head': trainer_fp32_head}
        row.update(vllm_fp32_head=vllm_fp32_head, **mismatch(train, infer))
        results.append(row)
        print(json.dumps(row), flush=True)
    report = {
        'model': os.path.abspath(args.model),
        'prompts': args.prompts,
        'max_tokens': args.max_tokens,
        'seed': args.seed,
        'torch_threads': torch.get_num_threads(),
        'results': results,
    }
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(report, f, indent=2)
    print('| setting | tokens | corr(p_train, p_vllm) | mean abs dlogp | max abs dlogp | mean dlogp |')
    print('|---|---|---|---|---|---|')
    for r in results:
        print(
            f'| {r["setting"]} | {r["tokens"]} | {r["prob_correlation"]:.5f} | {r["mean_abs_dlogp"]:.4g} | '
            f'{r["max_abs_dlogp"]:.4g} | {r["mean_dlogp"]:+.3g} |'
        )
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
