"""The tiny model/tokenizer builder, the synthetic task data and its rewards."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cispo_swift.demo import reward_plugin, tasks
from cispo_swift.demo.tiny import CHAT_TEMPLATE, TinyConfig, build, main

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = {'MODELSCOPE_OFFLINE': '1', 'HF_HUB_OFFLINE': '1'}


@pytest.fixture(scope='module')
def built(tmp_path_factory):
    return build(str(tmp_path_factory.mktemp('tiny')), n_rows=32)


def _chat(user):
    return f'<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n'


# --- model and tokenizer -------------------------------------------------------------------------------------------


def test_layout(built):
    model_dir = Path(built['model'])
    assert built['train'] == str(model_dir.parent / 'data' / 'train.jsonl')
    for name in ('config.json', 'model.safetensors', 'tokenizer.json', 'generation_config.json', 'cispo_tiny.json'):
        assert (model_dir / name).is_file(), name


def test_tokenizer_chat_template_and_round_trip(built):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(built['model'])
    assert len(tok) == 600
    assert tok.chat_template == CHAT_TEMPLATE
    text = tok.apply_chat_template([{'role': 'user', 'content': 'Say a many times.'}], tokenize=False,
                                   add_generation_prompt=True)  # fmt: skip
    assert text == _chat('Say a many times.') + '<|im_start|>assistant\n'
    with_system = tok.apply_chat_template(
        [{'role': 'system', 'content': 'S'}, {'role': 'user', 'content': 'u'}, {'role': 'assistant', 'content': 'aa'}],
        tokenize=False,
    )
    turns = ('system\nS', 'user\nu', 'assistant\naa')
    assert with_system == ''.join(f'<|im_start|>{t}<|im_end|>\n' for t in turns)
    ids = tok(text)['input_ids']
    assert tok.decode(ids) == text
    for special in ('<|im_start|>', '<|im_end|>', '<|endoftext|>'):
        assert len(tok(special)['input_ids']) == 1, special
    # Byte-level: any text round-trips, including characters the BPE never saw.
    odd = 'Ünïcödé ✓ 漢字 \t\n'
    assert tok.decode(tok(odd)['input_ids']) == odd
    assert tok.eos_token == '<|im_end|>' and tok.pad_token == '<|endoftext|>'


def test_model_loads_and_runs(built):
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(built['model'])
    cfg = model.config
    assert (cfg.model_type, cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == ('qwen2', 600, 64, 2)
    assert not cfg.tie_word_embeddings
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 600)
    gen = GenerationConfig.from_pretrained(built['model'])
    assert gen.min_new_tokens == 1 and sorted(gen.eos_token_id) == [0, 2]


def test_swift_loads_it_with_the_qwen_template(built):
    os.environ.update(OFFLINE)
    from swift.model.register import get_model_processor
    from swift.template import get_template

    model, processor = get_model_processor(built['model'], model_type='qwen2', torch_dtype=torch.float32)
    assert model.config.vocab_size == 600
    template = get_template(processor, template_type='qwen')
    encoded = template.encode({'messages': [{'role': 'user', 'content': 'Repeat the letter a.'}]})
    assert processor.decode(encoded['input_ids']) == _chat('Repeat the letter a.') + '<|im_start|>assistant\n'


def test_padded_vocab_and_tied_embeddings(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    paths = build(str(tmp_path), TinyConfig(vocab_size=1000, tie_word_embeddings=True), n_rows=4)
    model = AutoModelForCausalLM.from_pretrained(paths['model'])
    assert len(AutoTokenizer.from_pretrained(paths['model'])) == 600
    assert model.config.vocab_size == 1000 and model.config.tie_word_embeddings
    assert model.get_input_embeddings().weight.shape == (1000, 64)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_vocab_smaller_than_tokenizer_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r'vocab_size=500 is smaller than the tokenizer \(600 tokens\)'):
        build(str(tmp_path), TinyConfig(vocab_size=500), n_rows=4)


def test_rebuild_reuses_the_model_and_refuses_other_options(built):
    out = str(Path(built['model']).parent)
    weights = Path(built['model']) / 'model.safetensors'
    before = weights.stat().st_mtime_ns
    assert build(out, n_rows=32) == built
    assert weights.stat().st_mtime_ns == before
    with pytest.raises(ValueError, match='hidden_size'):
        build(out, TinyConfig(hidden_size=32), n_rows=32)


def test_same_seed_same_model_and_tokenizer(built, tmp_path):
    from safetensors.torch import load_file

    again = build(str(tmp_path / 'again'), n_rows=32)
    other = build(str(tmp_path / 'other'), TinyConfig(seed=1), n_rows=32)
    a, b, c = (load_file(os.path.join(p['model'], 'model.safetensors')) for p in (built, again, other))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a['model.embed_tokens.weight'], c['model.embed_tokens.weight'])
    read = lambda p: Path(p['model'], 'tokenizer.json').read_text()  # noqa: E731
    assert read(built) == read(again) == read(other)


def test_cli(tmp_path, capsys):
    assert main(['--out', str(tmp_path), '--rows', '5', '--letters', 'xy', '--seed', '3']) == 0
    paths = json.loads(capsys.readouterr().out)
    rows = [json.loads(line) for line in Path(paths['train']).read_text().splitlines()]
    assert rows == tasks.letter_rows(5, 3, letters='xy')


# --- data ----------------------------------------------------------------------------------------------------------


def test_dataset_is_deterministic_and_well_formed(built):
    rows = [json.loads(line) for line in Path(built['train']).read_text().splitlines()]
    assert rows == tasks.letter_rows(32, 0)
    assert tasks.letter_rows(32, 0) != tasks.letter_rows(32, 1)
    mixed = tasks.letter_rows(200, 0, letters='abc')
    assert {r['letter'] for r in mixed} == {'a', 'b', 'c'}
    for r in mixed:
        assert r['messages'][0]['role'] == 'user' and len(r['messages']) == 1
        assert r['messages'][0]['content'] in {p.format(letter=r['letter']) for p in tasks.LETTER_PROMPTS}
    with pytest.raises(ValueError, match='letters is empty'):
        tasks.letter_rows(3, 0, letters='')


# --- rewards -------------------------------------------------------------------------------------------------------


def test_letter_reward_values():
    completions = ['aaaa', ' a a a', 'a a b', 'ab', 'xyz', '', '  \n', 'Aa', 'bbb']
    letter = ['a'] * 8 + ['b']
    assert reward_plugin.TinyLetter()(completions, letter=letter) == [1.0, 1.0, 2 / 3, 0.5, 0.0, 0.0, 0.0, 0.5, 1.0]
    assert reward_plugin.TinyLetterExact()(completions, letter=letter) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]


def test_rare_count_reward_values():
    completions = ['', 'abc', 'z', ' z z', 'zzzz', 'zzzzzzz', 'zzzzzzzz', 'z' * 20, 'Zz', 'a z b zz c zzz', 'zzz']
    letter = ['z'] * 10 + ['q']
    count = [8] * 10 + [2]
    expected = [0.0, 0.0, 1 / 8, 2 / 8, 4 / 8, 7 / 8, 1.0, 1.0, 1 / 8, 6 / 8, 0.0]
    assert reward_plugin.RareCount()(completions, letter=letter, count=count) == expected
    # Other characters cost nothing; only the capped count of the letter matters.
    assert tasks.rare_count_reward('zz' + 'x' * 50, 'z', 4) == tasks.rare_count_reward('zz', 'z', 4) == 0.5
    assert tasks.rare_count_reward('zzz', 'z', 1) == 1.0
    with pytest.raises(ValueError, match='count must be >= 1'):
        tasks.rare_count_reward('z', 'z', 0)


def test_rare_count_needs_its_columns():
    with pytest.raises(ValueError, match='"letter" and "count" columns'):
        reward_plugin.RareCount()(['z'], letter=['z'])
    with pytest.raises(ValueError, match='"letter" and "count" columns'):
        reward_plugin.RareCount()(['z'], count=[8])


def test_rare_rows():
    rows = tasks.rare_rows(50, 0)
    assert rows == tasks.rare_rows(50, 0) and rows != tasks.rare_rows(50, 1)
    prompts = {p.format(letter='z', count=8) for p in tasks.RARE_PROMPTS}
    for r in rows:
        assert (r['letter'], r['count']) == ('z', 8) and len(r['messages']) == 1
        assert r['messages'][0]['role'] == 'user' and r['messages'][0]['content'] in prompts
    assert {r['messages'][0]['content'] for r in rows} == prompts
    assert tasks.rare_rows(3, 0, letter='q', count=2)[0]['messages'][0]['content'].endswith('q 2 times.')
    with pytest.raises(ValueError, match='give one character'):
        tasks.rare_rows(3, 0, letter='zz')
    with pytest.raises(ValueError, match='at least once'):
        tasks.rare_rows(3, 0, count=0)


def test_rare_letter_is_rare_for_the_tiny_tokenizer(built):
    """The premise of the benchmark task: few tokens contain the letter, and neither prompt nor scaffolding does."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(built['model'])
    with_letter = [t for t in tok.get_vocab() if tasks.RARE_LETTER in tok.convert_tokens_to_string([t])]
    assert 0 < len(with_letter) <= 8, with_letter
    row = tasks.rare_rows(1, 0)[0]
    prompt = tok.apply_chat_template(row['messages'], tokenize=False, add_generation_prompt=True)
    assert prompt.count(tasks.RARE_LETTER) == 1  # the request itself, once


def test_build_writes_the_rare_task(tmp_path):
    paths = build(str(tmp_path), task='rare', n_rows=6, count=3)
    rows = [json.loads(line) for line in Path(paths['train']).read_text().splitlines()]
    assert rows == tasks.rare_rows(6, 0, count=3)


def test_rewards_need_the_letter_column():
    for orm in (reward_plugin.TinyLetter(), reward_plugin.TinyLetterExact()):
        with pytest.raises(ValueError, match='"letter" column'):
            orm(['a'], solution=['a'])


def test_plugin_file_registers_rewards_and_leaves_sys_path_alone(monkeypatch):
    from swift.rewards import orms
    from swift.utils import import_external_file

    # Imported the way swift imports --external_plugins: by path, under a hashed module name, after putting the
    # file's directory first on sys.path. Put the registry and sys.path back afterwards.
    for name in reward_plugin.ORMS:
        monkeypatch.setitem(orms, name, None)
    monkeypatch.setattr(sys, 'path', list(sys.path))
    module = import_external_file(str(ROOT / 'cispo_swift' / 'demo' / 'reward_plugin.py'))
    monkeypatch.delitem(sys.modules, module.__name__)
    assert module.__name__ != 'cispo_swift.demo.reward_plugin'
    assert orms['cispo_tiny_letter'] is module.TinyLetter
    assert orms['cispo_tiny_letter_exact'] is module.TinyLetterExact
    assert orms['cispo_rare_count'] is module.RareCount
    assert str(ROOT / 'cispo_swift' / 'demo') not in sys.path


# --- the example run (slow) ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize('loss', ['builtin', 'plugin'])
def test_example_raises_the_reward(loss, tmp_path):
    """examples/tiny_cpu.sh as shipped (200 steps, about 40 s): the letter reward climbs from near 0.1."""
    from cispo_swift.demo.plot import summarize_run

    if loss == 'plugin' and not (ROOT / 'cispo_swift' / 'plugin.py').is_file():
        pytest.skip('cispo_swift/plugin.py is not in this tree')
    paths = build(str(tmp_path / 'tiny'))
    env = {k: v for k, v in os.environ.items() if not k.startswith('CISPO_')}  # the plugin's options: defaults
    env = {
        **env,
        **OFFLINE,
        'PATH': os.path.dirname(sys.executable) + os.pathsep + os.environ.get('PATH', ''),
        'PYTHONPATH': str(ROOT),
        'MODEL_DIR': paths['model'],
        'DATA': paths['train'],
        'OUTPUT_DIR': str(tmp_path / 'out'),
        'TASKS_PLUGIN': str(ROOT / 'cispo_swift' / 'demo' / 'reward_plugin.py'),
        'PLUGIN': 'none' if loss == 'builtin' else str(ROOT / 'cispo_swift' / 'plugin.py'),
    }
    proc = subprocess.run(['bash', str(ROOT / 'examples' / 'tiny_cpu.sh')], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s = summarize_run(str(tmp_path / 'out'), k=5)
    assert s['steps'] == 200
    assert s['reward_first'] < 0.3 and s['reward_last'] > s['reward_first'] + 0.5, s
