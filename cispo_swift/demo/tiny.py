"""Build a tiny Qwen2-architecture model and a synthetic data set, entirely in code (no hub access).

    python -m cispo_swift.demo.tiny --out DIR [--vocab-size N] [--seed S] [--hidden-size H] [--num-layers L] ...

writes

    DIR/model/                 save_pretrained output: config.json, model.safetensors, generation_config.json,
                               tokenizer.json, tokenizer_config.json, chat_template.jinja,
                               and cispo_tiny.json (the build options, used to reuse the model)
    DIR/data/train.jsonl       one row per line: {"messages": [{"role": "user", ...}], "letter": "a"}

and loads in swift with ``--model DIR/model --model_type qwen2 --template qwen --torch_dtype float32``.
The tokenizer is a byte-level BPE (Qwen's pre-tokenizer family) trained on a fixed in-code corpus, with
Qwen's special tokens and ChatML chat template. ``--vocab-size`` larger than the tokenizer pads the
embedding and LM head (real Qwen2 checkpoints do the same: 151936 rows for ~151.6k tokens); ids beyond the
tokenizer decode to nothing, so a padded model is for memory measurements, not for the reward curve.

A second call with the same options reuses DIR/model; different options for an existing DIR/model are an
error rather than a silent rebuild. The data file is rewritten each call (cheap and deterministic).
Everything is deterministic given ``--seed``.
"""

import argparse
import json
import os
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

from cispo_swift.demo.tasks import TASKS

SPECIAL_TOKENS = ['<|endoftext|>', '<|im_start|>', '<|im_end|>']
DEFAULT_SYSTEM = 'You are a helpful assistant.'  # swift's `qwen` template default system prompt
# Qwen2-Instruct's template without the tool-calling branches.
CHAT_TEMPLATE = (
    '{%- for message in messages %}'
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    '{%- endif %}'
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    '{%- endfor %}'
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
BUILD_INFO = 'cispo_tiny.json'


@dataclass(frozen=True)
class TinyConfig:
    tokenizer_vocab: int = 600
    vocab_size: Optional[int] = None  # model rows; None = the tokenizer's size
    hidden_size: int = 64
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 1024
    tie_word_embeddings: bool = False
    seed: int = 0


def tokenizer_corpus() -> List[str]:
    """Fixed text the BPE is trained on: the chat scaffolding, the task prompts, letter runs and digits.

    No general word list: short words such as ``at`` become tokens that earn the letter reward half-way,
    and the demo policy then settles on them instead of the letter.
    """
    from cispo_swift.demo.tasks import LETTER_PROMPTS

    letters = 'abcdefghijklmnopqrstuvwxyz'
    corpus = [f'<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n'] * 20
    corpus += ['<|im_start|>assistant\n'] * 20
    for c in letters + letters.upper():
        corpus += [p.format(letter=c) for p in LETTER_PROMPTS]
        corpus += [c * n for n in range(1, 9)] + [' '.join(c * n) for n in range(1, 9)]
    corpus += [' '.join(str(k) for k in range(s, s + 20)) for s in range(0, 200, 20)]
    return corpus


def build_tokenizer(vocab: int = 600):
    """Byte-level BPE with Qwen's special tokens and chat template, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, so any text encodes
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token='<|im_end|>',
        pad_token='<|endoftext|>',
        model_max_length=32768,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def build_model(cfg: TinyConfig, tokenizer):
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    n_tok = len(tokenizer)
    vocab_size = n_tok if cfg.vocab_size is None else cfg.vocab_size
    if vocab_size < n_tok:
        raise ValueError(
            f'vocab_size={vocab_size} is smaller than the tokenizer ({n_tok} tokens): every token needs an '
            f'embedding row. Pass vocab_size >= {n_tok}, or leave it unset to match the tokenizer.'
        )
    eos = tokenizer.convert_tokens_to_ids('<|im_end|>')
    pad = tokenizer.convert_tokens_to_ids('<|endoftext|>')
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=pad,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    torch.manual_seed(cfg.seed)
    model = Qwen2ForCausalLM(config)
    # min_new_tokens=1: the random model would stop at once about once per 300 samples, and swift 4.6.0's GRPO
    # crashes on an empty completion (its labels are all -100, so logits_to_keep spans the whole sequence).
    model.generation_config = GenerationConfig(
        bos_token_id=pad, eos_token_id=[eos, pad], pad_token_id=pad, min_new_tokens=1
    )
    return model


def build(out: str, cfg: TinyConfig = TinyConfig(), task: str = 'letter', n_rows: int = 256, **task_kwargs) -> Dict:
    """Build (or reuse) ``out/model`` and write ``out/data/train.jsonl``. Returns the paths."""
    model_dir = os.path.join(out, 'model')
    data_path = os.path.join(out, 'data', 'train.jsonl')
    info_path = os.path.join(model_dir, BUILD_INFO)
    want = asdict(cfg)
    if os.path.exists(info_path):
        with open(info_path) as f:
            have = json.load(f)
        if have != want:
            diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
            raise ValueError(
                f'{model_dir} was built with other options (existing, requested): {diff}. '
                f'Use another --out directory or delete {model_dir}.'
            )
    else:
        tokenizer = build_tokenizer(cfg.tokenizer_vocab)
        model = build_model(cfg, tokenizer)
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        with open(info_path, 'w') as f:
            json.dump(want, f, indent=2)  # written last: its presence marks a complete build

    if task not in TASKS:
        raise ValueError(f'unknown task {task!r}; known tasks: {sorted(TASKS)}')
    rows = TASKS[task](n_rows, cfg.seed, **task_kwargs)
    os.makedirs(os.path.dirname(data_path), exist_ok=True)
    with open(data_path, 'w') as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + '\n')
    return {'model': model_dir, 'train': data_path}


def main(argv: Optional[List[str]] = None) -> int:
    d = TinyConfig()
    p = argparse.ArgumentParser(prog='python -m cispo_swift.demo.tiny', description=__doc__.split('\n')[0])
    p.add_argument('--out', required=True, help='output directory (gets model/ and data/train.jsonl)')
    p.add_argument('--vocab-size', type=int, default=d.vocab_size, help='model vocab rows (default: tokenizer size)')
    p.add_argument('--tokenizer-vocab', type=int, default=d.tokenizer_vocab, help='BPE vocabulary to train')
    p.add_argument('--hidden-size', type=int, default=d.hidden_size)
    p.add_argument('--intermediate-size', type=int, default=d.intermediate_size)
    p.add_argument('--num-layers', type=int, default=d.num_layers)
    p.add_argument('--num-heads', type=int, default=d.num_heads)
    p.add_argument('--num-kv-heads', type=int, default=d.num_kv_heads)
    p.add_argument('--tie-word-embeddings', action='store_true')
    p.add_argument('--seed', type=int, default=d.seed)
    p.add_argument('--task', default='letter', choices=sorted(TASKS))
    p.add_argument('--rows', type=int, default=256, help='number of training rows')
    p.add_argument('--letters', default=None, help='target letters for the letter task (default: tasks default)')
    a = p.parse_args(argv)
    if a.letters is not None and a.task != 'letter':
        p.error(f'--letters applies to --task letter only (got --task {a.task}).')
    cfg = TinyConfig(
        tokenizer_vocab=a.tokenizer_vocab,
        vocab_size=a.vocab_size,
        hidden_size=a.hidden_size,
        intermediate_size=a.intermediate_size,
        num_layers=a.num_layers,
        num_heads=a.num_heads,
        num_kv_heads=a.num_kv_heads,
        tie_word_embeddings=a.tie_word_embeddings,
        seed=a.seed,
    )
    task_kwargs = {} if a.letters is None else {'letters': a.letters}
    paths = build(a.out, cfg, task=a.task, n_rows=a.rows, **task_kwargs)
    print(json.dumps(paths))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
