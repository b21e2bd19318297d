"""Curves and summaries from a logging.jsonl written here in swift's format."""

import json

import pytest

from cispo_swift.__main__ import main
from cispo_swift.demo import plot

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
REWARDS = [0.1, 0.2, 0.3, 0.5, 0.7, 0.9]  # logged on odd steps only, as with --num_iterations 2


def _rows(n_steps=12, cispo=True):
    rows = []
    for step in range(1, n_steps + 1):
        row = {'loss': 0.01 * step, 'grad_norm': 1.0 + step, 'learning_rate': 0.001}
        if step % 2 == 1:
            row.update({'reward': REWARDS[step // 2], 'reward_std': 0.1, 'rewards/TinyLetter/mean': REWARDS[step // 2]})
        if cispo:
            row.update({
                'cispo/clip_frac': step / 100, 'cispo/clip_frac_pos': step / 200, 'cispo/clip_frac_neg': step / 200,
                'cispo/ratio_mean': 1.0, 'cispo/ratio_min': 1.0 - step / 100, 'cispo/ratio_max': 1.0 + step,
                'cispo/weight_mean': 0.99, 'cispo/ppo_zero_grad_frac': step / 50, 'cispo/approx_kl': step / 1000,
                'cispo/kl_budget_skipped': float(step > 10),
            })  # fmt: skip
        row.update({'cispo_clip_ratio': 0.0, 'global_step/max_steps': f'{step}/{n_steps}', 'elapsed_time': '1s'})
        rows.append(row)
    rows.append({'train_runtime': 1.0, 'train_loss': 0.1, 'global_step/max_steps': f'{n_steps}/{n_steps}'})
    # swift's end-of-training summary: no step key, a nested log_history.
    rows.append({'last_model_checkpoint': None, 'global_step': n_steps, 'log_history': rows[:2], 'memory': 0})
    return rows


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    return path


@pytest.fixture
def run(tmp_path):
    """An output_dir laid out like swift's: an older and a newer vN-TIMESTAMP run."""
    _write(tmp_path / 'out' / 'v0-20250101-000000' / 'logging.jsonl', _rows(4, cispo=False))
    _write(tmp_path / 'out' / 'v1-20250101-000100' / 'logging.jsonl', _rows())
    return tmp_path / 'out'


def test_find_logging_jsonl(run, tmp_path):
    newest = run / 'v1-20250101-000100' / 'logging.jsonl'
    assert plot.find_logging_jsonl(str(run)) == str(newest)
    assert plot.find_logging_jsonl(str(newest.parent)) == str(newest)
    assert plot.find_logging_jsonl(str(newest)) == str(newest)
    # Versions compare as numbers: v10 is newer than v9.
    _write(run / 'v10-20250101-000000' / 'logging.jsonl', _rows(2))
    _write(run / 'v9-20250101-000000' / 'logging.jsonl', _rows(2))
    assert plot.find_logging_jsonl(str(run)).endswith('v10-20250101-000000/logging.jsonl')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(FileNotFoundError, match='no logging.jsonl'):
        plot.find_logging_jsonl(str(tmp_path / 'empty'))


def test_load_log_and_series(run):
    rows = plot.load_log(str(run))
    assert [r['step'] for r in rows] == list(range(1, 13)) + [12]  # the train_runtime row has a step, the summary not
    steps, values = plot.series(rows, 'reward')
    assert steps == [1, 3, 5, 7, 9, 11] and values == REWARDS
    assert plot.series(rows, 'absent') == ([], [])


def test_summarize_run(run):
    s = plot.summarize_run(str(run), k=2)
    assert s['logging_jsonl'] == str(run / 'v1-20250101-000100' / 'logging.jsonl')
    assert s['steps'] == 12 and s['k'] == 2
    assert s['reward_first'] == pytest.approx((0.1 + 0.2) / 2)
    assert s['reward_last'] == pytest.approx((0.7 + 0.9) / 2)
    assert s['last'] == {
        'cispo/clip_frac': 0.12, 'cispo/clip_frac_pos': 0.06, 'cispo/clip_frac_neg': 0.06, 'cispo_clip_ratio': 0.0,
        'cispo/ratio_mean': 1.0, 'cispo/ratio_min': 1.0 - 0.12, 'cispo/ratio_max': 13.0, 'cispo/weight_mean': 0.99,
        'cispo/ppo_zero_grad_frac': 12 / 50, 'grad_norm': 13.0, 'cispo/approx_kl': 0.012,
        'cispo/kl_budget_skipped': 1.0,
    }  # fmt: skip
    assert s['mean']['grad_norm'] == pytest.approx(sum(1.0 + i for i in range(1, 13)) / 12)
    # Fewer logged rewards than k: the whole run on both sides.
    s = plot.summarize_run(str(run), k=50)
    assert s['reward_first'] == s['reward_last'] == pytest.approx(sum(REWARDS) / 6)


def test_summarize_run_errors(tmp_path, run):
    with pytest.raises(ValueError, match='k must be >= 1'):
        plot.summarize_run(str(run), k=0)
    no_reward = _write(tmp_path / 'nr' / 'logging.jsonl', [{'loss': 1.0, 'global_step/max_steps': '1/1'}])
    with pytest.raises(ValueError, match='no "reward"'):
        plot.summarize_run(str(no_reward))


def _is_png(path):
    with open(path, 'rb') as f:
        head = f.read(24)
    assert head[:8] == PNG_MAGIC and head[12:16] == b'IHDR'
    width, height = int.from_bytes(head[16:20], 'big'), int.from_bytes(head[20:24], 'big')
    return width > 100 and height > 100


def test_plot_runs_panels(run, tmp_path):
    out = tmp_path / 'png' / 'curves.png'
    panels = plot.plot_runs([str(run)], str(out))
    assert panels == [t for t, _ in plot.PANELS]
    assert _is_png(out)


def test_plot_skips_absent_panels_and_overlays_runs(run, tmp_path):
    builtin = _write(tmp_path / 'builtin' / 'logging.jsonl', _rows(cispo=False))
    out = tmp_path / 'two.png'
    # A panel is drawn when any run has one of its keys; swift's built-in run has only cispo_clip_ratio.
    assert plot.plot_runs([str(run), str(builtin)], str(out), labels=['plugin', 'builtin'], smooth=3) == [
        t for t, _ in plot.PANELS
    ]
    assert _is_png(out)
    assert plot.plot_runs([str(builtin)], str(tmp_path / 'one.png')) == [
        'reward',
        'clipped tokens, and tokens PPO would give no gradient',
        'grad norm',
    ]
    with pytest.raises(ValueError, match='1 labels for 2 runs'):
        plot.plot_runs([str(run), str(builtin)], str(out), labels=['x'])


def test_the_drift_and_the_skipped_steps_are_drawn_and_swifts_clip_key_only_without_the_plugin(run, tmp_path):
    """The real-model recipe rests on approx_kl and the skipped steps; swift's `cispo_clip_ratio` repeats
    `cispo/clip_frac_pos` in a plugin run, so it is drawn only for a run of swift's built-in loss."""
    rows = plot.load_log(str(run))
    assert plot._drawn(rows, 'cispo/approx_kl')[1][-1] == pytest.approx(0.012)
    assert plot._drawn(rows, 'cispo/kl_budget_skipped')[1][-2:] == [1.0, 1.0]
    assert plot._drawn(rows, 'cispo_clip_ratio') == ([], [])
    builtin = plot.load_log(str(_write(tmp_path / 'builtin' / 'logging.jsonl', _rows(cispo=False))))
    assert plot._drawn(builtin, 'cispo_clip_ratio')[0] == list(range(1, 13))
    no_signal = [{**r, 'cispo/no_signal_skipped': 1.0} for r in _rows(4)]
    panels = plot.plot_runs([str(_write(tmp_path / 'ns' / 'logging.jsonl', no_signal))], str(tmp_path / 'ns.png'))
    assert panels[:3] == ['reward', 'drift from the sampling policy (approx KL)', 'optimizer steps skipped (share)']
    assert 'cispo/no_signal_skipped' in plot.PANELS[2][1] and 'cispo/no_signal_skipped' in plot.CISPO_KEYS


def test_a_json_document_is_not_taken_for_a_damaged_log(tmp_path):
    state = tmp_path / 'checkpoint-2' / 'trainer_state.json'
    state.parent.mkdir()
    state.write_text(json.dumps({'global_step': 2, 'log_history': [{'loss': 1.0}]}, indent=2))
    with pytest.raises(ValueError, match="is one JSON document, not swift's logging.jsonl") as err:
        plot.load_log(str(state))
    assert 'damaged' not in str(err.value)


def test_reward_panel_adds_per_function_means_only_when_several():
    one = [[{'rewards/A/mean': 1.0}]]
    two = [[{'rewards/A/mean': 1.0}], [{'rewards/B/mean': 0.0}]]
    assert plot._panels(one)[0] == ('reward', ('reward',))
    assert plot._panels(two)[0] == ('reward', ('reward', 'rewards/A/mean', 'rewards/B/mean'))


def test_smooth():
    assert plot._smooth([1.0, 2.0, 3.0, 4.0], 1) == [1.0, 2.0, 3.0, 4.0]
    assert plot._smooth([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]


def test_cli_entry_points(run, tmp_path, capsys):
    out = tmp_path / 'cli.png'
    assert plot.main([str(run), '-o', str(out), '--label', 'mine']) == 0
    assert _is_png(out)
    assert capsys.readouterr().out.startswith(f'wrote {out} (reward, drift from the sampling policy (approx KL), ')
    assert plot.summary_main([str(run), '-k', '2', '--json']) == 0
    s = json.loads(capsys.readouterr().out)
    assert s['run'] == str(run) and s['reward_first'] == pytest.approx(0.15) and s['reward_last'] == pytest.approx(0.8)
    assert plot.summary_main([str(run), '-k', '2']) == 0
    text = capsys.readouterr().out
    assert 'reward: first 2 logged 0.150 -> last 2 logged 0.800' in text
    assert 'cispo/ratio_max' in text


def test_missing_matplotlib_is_a_clear_error(run, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith('matplotlib'):
            raise ImportError(f'No module named {name!r}')
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, '__import__', no_matplotlib)
    with pytest.raises(ImportError, match=r'pip install "cispo-swift\[plot\]"'):
        plot.plot_runs([str(run)], str(tmp_path / 'x.png'))


def test_cut_off_last_line_is_skipped_with_a_warning(run, capsys):
    """A run killed while swift wrote a row leaves a partial last line."""
    path = run / 'v1-20250101-000100' / 'logging.jsonl'
    text = path.read_text()
    lines = text.splitlines()
    path.write_text(text + '{"loss": 0.5, "global_step/max_steps": "13/1')  # no newline, cut mid-row
    rows = plot.load_log(str(run))
    assert [r['step'] for r in rows][-1] == 12
    assert f'{path}, line {len(lines) + 1} (the last) is cut off; skipping it.' in capsys.readouterr().err
    assert main(['summary', str(run)]) == 0


def test_damaged_line_in_the_middle_is_an_error_naming_file_and_line(run):
    path = run / 'v1-20250101-000100' / 'logging.jsonl'
    lines = path.read_text().splitlines()
    lines[2] = lines[2][:10]
    path.write_text('\n'.join(lines) + '\n')
    with pytest.raises(ValueError, match=f'{path}, line 3: not JSON'):
        plot.load_log(str(run))


@pytest.mark.parametrize('command', ['summary', 'plot'])
def test_missing_directory_is_one_line_not_a_traceback(command, tmp_path, capsys):
    args = [command, str(tmp_path / 'nope')] + (['-o', str(tmp_path / 'x.png')] if command == 'plot' else [])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.strip() == f'python -m cispo_swift {command}: {tmp_path / "nope"} does not exist: pass a swift ' + (
        'output_dir, its vN-* dir or a logging.jsonl.'
    )
