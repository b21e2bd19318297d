"""The arithmetic task of the SmolLM2 demo: split, rewards, ORMs, the held-out evaluation and its swift callback."""

import json
import os
from pathlib import Path

import pytest

from cispo_swift.demo import arith
from cispo_swift.demo.heldout import parse_steps

ROOT = Path(__file__).resolve().parents[1]


# ---- problems and split -------------------------------------------------------------------------------------------


@pytest.mark.parametrize('name', sorted(arith.VARIANTS))
def test_split_is_disjoint_keeps_mirror_pairs_together_and_is_fixed(name):
    v = arith.get_variant(name)
    train, heldout = arith.split(v, 128)
    assert len(heldout) >= 128 and train
    assert not set(train) & set(heldout)
    assert sorted(train + heldout) == sorted(arith.all_problems(v))
    unordered = {(min(a, b), max(a, b)) for a, b in heldout}
    assert not {(min(a, b), max(a, b)) for a, b in train} & unordered
    assert arith.split(v, 128) == (train, heldout)  # no hidden randomness


def test_rows_carry_the_answer_and_the_system_prompt():
    rows = arith.rows('add20', 'train', 50, seed=3)
    assert rows == arith.rows('add20', 'train', 50, seed=3) and rows != arith.rows('add20', 'train', 50, seed=4)
    _, heldout = arith.split(arith.get_variant('add20'), 128)
    for r in rows:
        system, user = r['messages']
        assert system == {'role': 'system', 'content': arith.SMOLLM_SYSTEM}
        a, b = (int(x) for x in user['content'].removeprefix('What is ').split('?')[0].split(' + '))
        assert r['answer'] == str(a + b) and (a, b) not in heldout
    first = arith.rows('add20', 'heldout', 100)
    assert first == arith.rows('add20', 'heldout', 128)[:100]  # the first n held-out problems are always the same
    with pytest.raises(ValueError, match='only 128 are held out'):
        arith.rows('add20', 'heldout', 200)
    with pytest.raises(ValueError, match="unknown arithmetic variant 'add2'"):
        arith.rows('add2', 'train', 1)


def test_write_and_cli(tmp_path):
    paths = arith.write(str(tmp_path), n_train=16)
    train = [json.loads(x) for x in Path(paths['train']).read_text().splitlines()]
    held = [json.loads(x) for x in Path(paths['heldout']).read_text().splitlines()]
    assert len(train) == 16 and held == arith.rows('add20', 'heldout', 128)


# ---- rewards ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    'completion, last, only',
    [
        ('7 + 12 = 19', 1.0, 0.0),
        ('19', 1.0, 1.0),
        (' 19\n', 1.0, 1.0),
        ('The answer is 19.', 1.0, 0.0),
        ('19 is the sum of 7 and 12', 0.0, 0.0),  # the last integer decides
        ('7 + 12 = 1,9', 1.0, 0.0),  # thousands separators are removed
        ('-19', 0.0, 0.0),
        ('', 0.0, 0.0),
        ('nineteen', 0.0, 0.0),
    ],
)
def test_rewards(completion, last, only):
    assert arith.reward_last_integer(completion, '19') == last
    assert arith.reward_only_number(completion, '19') == only


def test_boxed_reward():
    assert arith.reward_boxed('so \\boxed{19}', '19') == 1.0
    assert arith.reward_boxed('\\boxed{18} no, \\boxed{ 19 }', '19') == 1.0
    assert arith.reward_boxed('19', '19') == 0.0


def test_orms_are_registered_and_read_the_answer_column():
    from swift.rewards import orms

    import cispo_swift.demo.reward_plugin  # noqa: F401  (registers)

    assert orms['cispo_arith']()(['3 + 4 = 7', '8'], answer=['7', '7']) == [1.0, 0.0]
    assert orms['cispo_arith_only_number']()(['7', '= 7'], answer=['7', '7']) == [1.0, 0.0]
    with pytest.raises(ValueError, match='needs an "answer" column'):
        orms['cispo_arith']()(['7'])


# ---- held-out evaluation ------------------------------------------------------------------------------------------


def test_parse_steps():
    assert parse_steps('0,last', 40) == {0, 40}
    assert parse_steps('every:16', 40) == {0, 16, 32, 40}
    assert parse_steps(' 8, 24 ,last', 24) == {8, 24}
    for bad in ('every:0', 'sometimes', '8;16'):
        with pytest.raises(ValueError, match='CISPOSWIFT_HELDOUT_STEPS'):
            parse_steps(bad, 10)


@pytest.mark.slow
def test_heldout_callback_in_swift_matches_the_standalone_evaluation(tiny, tmp_path):
    """`--callbacks cispo_heldout` in a real `swift rlhf` run (tiny model: its accuracy is ~0, the mechanics are
    tested): it evaluates at the steps asked for, its step-0 greedy answers are those of `cispo_swift.demo.evaluate`
    on the same model, and the run trains exactly as without the callback."""
    from swift_run import check_ok, logged_steps, run_swift

    from cispo_swift.demo import evaluate
    from cispo_swift.demo.heldout import read_results

    data = arith.write(str(tmp_path / 'data'), n_train=8)
    held = tmp_path / 'held16.jsonl'
    held.write_text(''.join(json.dumps(r) + '\n' for r in arith.rows('add20', 'heldout', 16)))
    env = {
        'CISPOSWIFT_HELDOUT': str(held),
        'CISPOSWIFT_HELDOUT_STEPS': '0,2,last',
        'CISPOSWIFT_HELDOUT_MAX_NEW_TOKENS': '6',
    }
    out, plain = tmp_path / 'run', tmp_path / 'plain'
    flags = ('--dataset', data['train'], '--reward_funcs', 'cispo_arith')
    result = run_swift(tiny, out, '--callbacks', 'cispo_heldout', *flags, env=env)
    check_ok(result)
    records = read_results(str(out))
    assert [r['step'] for r in records] == [0, 2, 4] and all(r['n'] == 16 for r in records)
    # The evaluations leave the run's random state alone: the same run without them logs the same steps.
    check_ok(run_swift(tiny, plain, *flags))
    with_eval, without = logged_steps(out), logged_steps(plain)
    assert len(with_eval) == len(without) == 4
    for a, b in zip(with_eval, without):
        assert (a['loss'], a['grad_norm'], a.get('reward')) == (b['loss'], b['grad_norm'], b.get('reward'))
    assert 'held-out greedy accuracy at step 0' in result.stdout + result.stderr
    standalone = evaluate.evaluate(tiny['model'], 'add20', 16, max_new_tokens=6)
    assert records[0]['completions'] == [g['completion'] for g in standalone['greedy']]
    assert records[0]['greedy_acc'] == standalone['greedy_acc']


def test_callback_without_its_data_says_what_to_set(monkeypatch):
    from cispo_swift.demo.heldout import HeldoutAccuracy

    monkeypatch.delenv('CISPOSWIFT_HELDOUT', raising=False)
    with pytest.raises(ValueError, match='needs CISPOSWIFT_HELDOUT=FILE'):
        HeldoutAccuracy(args=None, trainer=None)
    monkeypatch.setenv('CISPOSWIFT_HELDOUT', os.devnull + '.missing')
    with pytest.raises(FileNotFoundError, match='no such file'):
        HeldoutAccuracy(args=None, trainer=None)


@pytest.mark.slow
def test_evaluation_prompts_are_swifts_chatml_prompts(smollm2_dir):
    """The held-out evaluation formats prompts with the tokenizer's chat template; training uses swift's `chatml`
    template. With the system message in every row they give the same tokens."""
    from swift.model import get_processor
    from swift.template import get_template
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    template = get_template(get_processor(smollm2_dir, model_type='llama'), template_type='chatml')
    template.set_mode('transformers')
    for r in arith.rows('add20', 'heldout', 4) + arith.rows('add20', 'train', 4):
        text = tok.apply_chat_template(r['messages'], tokenize=False, add_generation_prompt=True)
        assert (
            tok(text, add_special_tokens=False)['input_ids']
            == template.encode({'messages': r['messages']})['input_ids']
        )


def test_plot_and_report_read_the_heldout_evaluations(tmp_path, capsys):
    from cispo_swift.demo import heldout, plot

    run = tmp_path / 'v0-1'
    run.mkdir()
    logged = [{'loss': 0.1, 'reward': r, 'global_step/max_steps': f'{i + 1}/3'} for i, r in enumerate((0.2, 0.4, 0.5))]
    (run / 'logging.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in logged))
    evals = [
        {'step': s, 'greedy_acc': sum(r) / 2, 'n': 2, 'max_new_tokens': 16, 'answers': ['3', '4'],
         'problems': ['What is 1 + 2?', 'What is 2 + 2?'], 'completions': c, 'rewards': r}
        for s, c, r in ((3, ['3', '4'], [1.0, 1.0]), (0, ['3', '5'], [1.0, 0.0]))
    ]  # fmt: skip
    (run / 'heldout.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in evals))
    rows = plot.load_log(str(tmp_path))
    assert [r['step'] for r in rows] == [0, 1, 2, 3, 3]
    assert plot.series(rows, 'heldout/greedy_acc') == ([0, 3], [0.5, 1.0])
    assert plot.plot_runs([str(tmp_path)], str(tmp_path / 'c.png'))[-1] == 'held-out greedy accuracy'
    assert plot.summarize_run(str(tmp_path))['reward_last'] == pytest.approx((0.2 + 0.4 + 0.5) / 3)
    assert heldout.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert 'step    0: 0.500  (1/2)' in out and 'step    3: 1.000  (2/2)' in out
    assert (
        "step 0 -> 3: 1 problems became right, 0 became wrong\n  became right: 'What is 2 + 2?' (answer 4): '5' -> '4'"
        in out
    )


def test_heldout_summary_gives_the_mean_of_the_last_two_evaluations(tmp_path, capsys):
    from cispo_swift.demo import heldout

    path = tmp_path / 'heldout.jsonl'
    records = [
        {'step': s, 'greedy_acc': acc, 'n': 4, 'max_new_tokens': 16, 'rewards': rewards,
         'problems': ['p0', 'p1', 'p2', 'p3'], 'answers': ['1', '2', '3', '4'], 'completions': ['a', 'b', 'c', 'd']}
        for s, acc, rewards in ((0, 0.25, [1, 0, 0, 0]), (10, 0.75, [1, 1, 1, 0]), (20, 0.5, [0, 1, 1, 0]))
    ]  # fmt: skip
    path.write_text(''.join(json.dumps(r) + '\n' for r in records))
    assert heldout.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert 'mean of the last 2 evaluations (steps 10, 20): 0.625, +0.375 against step 0' in out
    assert 'step 0 -> 20: 2 problems became right, 1 became wrong' in out


@pytest.mark.parametrize(
    'args, message',
    [
        (['--n', '0'], 'argument --n: 0: it must be in [1, 128] (held-out problems)'),
        (['--n', '-3'], 'argument --n: -3: it must be in [1, 128]'),
        (['--n', '129'], 'argument --n: 129: it must be in [1, 128]'),
        (['--temperature', '-1'], 'argument --temperature: -1: the sampling temperature divides the logits'),
        (['--temperature', 'nan'], 'must be a finite number > 0'),
        (['--max-new-tokens', '0'], 'argument --max-new-tokens: 0: it must be ≥ 1'),
        (['--samples', '-1'], 'argument --samples: -1: it must be ≥ 0'),
        (['--variant', 'add21'], "argument --variant: invalid choice: 'add21'"),
        (['--json', '{tmp}/nodir/x.json'], 'nodir does not exist: create it first'),
        (['--json', '{tmp}'], 'is a directory: name the JSON file to write'),
    ],
)
def test_evaluate_refuses_bad_arguments_before_loading_anything(tmp_path, monkeypatch, capsys, args, message):
    from cispo_swift.demo import evaluate

    def no_load(*a, **k):
        raise AssertionError('loaded a model despite a bad argument')

    monkeypatch.setattr(evaluate, 'load', no_load)
    model = tmp_path / 'model'
    model.mkdir()
    (model / 'config.json').write_text('{}')
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([str(model), *(a.format(tmp=tmp_path) for a in args)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and 'Traceback' not in err


def test_evaluate_refuses_a_missing_or_non_model_directory(tmp_path, monkeypatch, capsys):
    from cispo_swift.demo import evaluate

    monkeypatch.setattr(evaluate, 'load', lambda *a, **k: pytest.fail('loaded a model'))
    for path, message in [(tmp_path / 'missing', 'no such directory'), (tmp_path, 'no config.json in it')]:
        with pytest.raises(SystemExit):
            evaluate.main([str(path)])
        assert f'MODEL_DIR {path}: {message}' in capsys.readouterr().err
    with pytest.raises(ValueError, match='n must be in'):
        evaluate.evaluate(str(tmp_path), n=0)
