"""The benchmark scripts: statistics (steps to threshold, censoring, quantiles) on made-up logs, the horizon
comparison's arms, and the trace plugin on a stub trainer. No training."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / 'scripts'


def _load_script(name):
    module_spec = importlib.util.spec_from_file_location(name, SCRIPTS / f'{name}.py')
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


bench = _load_script('bench_sample_efficiency')


def _rows(rewards, every=8, **metrics):
    """Logged rows as swift writes them with --num_iterations `every`: the reward only on generation steps."""
    rows = []
    for i, r in enumerate(rewards):
        for k in range(every):
            row = {'step': i * every + k + 1, **{key: v[i] for key, v in metrics.items()}}
            if k == 0:
                row['reward'] = r
            rows.append(row)
    return rows


def test_steps_to_threshold_uses_the_trailing_mean():
    curve = [[1, 0.0], [9, 0.9], [17, 0.1], [25, 0.3], [33, 0.8], [41, 0.9]]
    assert bench.steps_to_threshold(curve, 0.5, 1) == 9  # one lucky batch counts without smoothing
    assert bench.steps_to_threshold(curve, 0.5, 3) == 41  # (0.3 + 0.8 + 0.9) / 3, the first trailing mean ≥ 0.5
    assert bench.steps_to_threshold(curve, 0.95, 3) is None  # censored


def test_quantiles_with_censored_runs():
    inf = math.inf
    assert bench.quantile([3, 1, 2, 4], 0.5) == 2.5
    assert bench.quantile([10, 20, 30, inf], 0.25) == 17.5  # below the censored share: exact
    assert bench.quantile([10, 20, 30, inf], 0.75) == inf  # touches the censored run
    assert bench.quantile([10, 20, 30, inf, inf], 0.5) == 30
    assert bench.quantile([10, inf, inf], 0.5) == inf


def test_summaries_of_runs():
    other_keys = bench.summarize_run(_rows([0.0, 0.4], **{'cispo/clip_frac': [0.5, 0.3]}), 'grpo')
    assert other_keys['metrics'] == {} and other_keys['steps_to_threshold'] is None  # only the loss' own metrics
    rows = _rows([0.0, 0.4, 0.6, 0.7, 1.0], **{'clip_ratio/region_mean': [0.5, 0.3, 0.1, 0.0, 0.0]})
    run = bench.summarize_run(rows, 'grpo')
    assert run['steps_to_threshold'] == 25 and run['steps'] == 40  # (0.4 + 0.6 + 0.7) / 3 ≥ 0.5 at the 4th batch
    assert run['reward_final'] == pytest.approx((0.0 + 0.4 + 0.6 + 0.7 + 1.0) / 5)
    assert run['metrics']['clip_ratio/region_mean'] == pytest.approx(0.18)
    assert run['metrics_learning']['clip_ratio/region_mean'] == pytest.approx(0.3)  # steps 1-24
    never = bench.summarize_run(_rows([0.0, 0.1, 0.1], **{'clip_ratio/region_mean': [0.2, 0.2, 0.2]}), 'grpo')
    s = bench.summarize_loss([run, run, never])
    assert (s['n'], s['reached']) == (3, 2)
    assert s['steps_to_threshold'] == {'median': 25, 'q25': 25, 'q75': math.inf}
    table = bench.markdown_table({'grpo': s}, max_steps=40)
    assert '| grpo | 2/3 | 25 [25, >40] |' in table
    assert bench.finite_json({'a': [math.inf, 1.0]}) == {'a': ['inf', 1.0]}


def test_shared_rank_test_against_a_brute_force_count_and_scipy():
    from scipy.stats import mannwhitneyu

    from cispo_swift.demo import bench as harness

    a, b = [0.61, 0.55, 0.7, 0.4, 0.66], [0.1, 0.45, 0.2, 0.05, 0.3]
    t = harness.rank_test(a, b)
    assert t['U'] == 24.0  # every pair but (0.4, 0.45) has a > b
    # Exact: 2 of the 252 splits give |U − 12.5| ≥ 11.5 with U = 24 or more, 2 with U = 1 or less.
    assert t['p'] == pytest.approx(4 / 252)
    assert t['p'] == pytest.approx(mannwhitneyu(a, b, method='exact').pvalue)
    tied = harness.rank_test([math.inf, math.inf, 3.0], [math.inf, 1.0, 2.0])  # censored runs tie among themselves
    assert tied['U'] == 7.0  # 2 · 0.5 (inf vs inf) + 4 (inf vs 1, 2) + 2 (3 vs 1, 2)
    big = harness.rank_test(list(range(15)), [x + 0.5 for x in range(15)])
    assert big['method'] == 'normal approximation' and 0.5 < big['p'] <= 1.0


def test_longest_run_and_run_loop_skips_finished_and_records_failures(tmp_path):
    from cispo_swift.demo import bench as harness

    assert harness.longest_run([1, 0, 0, 0, 1, 0, 0], lambda v: v == 0) == 3
    assert harness.longest_run([], lambda v: True) == 0
    calls = []

    def run_one(job):
        calls.append(job['name'])
        if job['name'] == 'bad':
            raise RuntimeError('swift rlhf exited with 1')
        return {'value': job['name']}

    jobs = [{'name': n, 'run_dir': str(tmp_path / n)} for n in ('a', 'bad', 'c')]
    first = harness.run_all(jobs, run_one, parallel=2)
    assert first[0] == {'value': 'a'} and first[2] == {'value': 'c'}
    assert first[1] == {'failed': 'RuntimeError: swift rlhf exited with 1'}
    again = harness.run_all(jobs, run_one)
    assert again == first and sorted(calls) == ['a', 'bad', 'c']  # nothing ran twice


def _last_value(cmd, flag):
    return [cmd[i + 1] for i, x in enumerate(cmd) if x == flag][-1]


def test_horizon_demo_arms_keep_their_registered_sampling(monkeypatch):
    """The demo script samples dynamically by default; the horizon comparison's other arms must still run without."""
    script = (SCRIPTS.parent / 'examples' / 'smollm2_arith_cpu.sh').read_text()
    assert '--dynamic_sample true' in script
    monkeypatch.syspath_prepend(str(SCRIPTS))
    horizon = _load_script('bench_cispo_horizon')
    for arm in horizon.ARMS:
        cmd = horizon.demo_command(arm, 42, 40)
        want = 'true' if arm == 'cispo_kl_dyn' else 'false'
        assert _last_value(cmd, '--dynamic_sample') == want, (arm, cmd)
    assert _last_value(horizon.demo_command('cispo_kl_dyn', 42, 40), '--max_resample_times') == '3'


def test_trace_plugin_records_what_the_trainer_used(monkeypatch, tmp_path):
    """scripts/cispo_trace_plugin.py reads the trainer's micro-batch internals: they must still be where it looks."""
    from stubs import attach_logps, make_batch, make_trainer

    from cispo_swift.trainer import CISPOGRPOTrainer

    trace = tmp_path / 'trace.jsonl'
    monkeypatch.setenv('CISPOSWIFT_TRACE', str(trace))
    monkeypatch.setattr(CISPOGRPOTrainer, '_policy_step', CISPOGRPOTrainer._policy_step)  # restored afterwards
    _load_script('cispo_trace_plugin')
    logits, ids, batch, entropies = make_batch()
    trainer = attach_logps(make_trainer(), logits, ids, entropies)
    trainer._compute_loss_and_metrics(None, {'input_ids': ids}, batch)
    (record,) = [json.loads(x) for x in trace.read_text().splitlines()]
    mask = batch.completion_mask
    logps = torch.log_softmax(logits.detach(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    assert record['mask'] == mask.int().tolist() and record['ids'] == ids.tolist()
    assert torch.allclose(torch.tensor(record['anchor']), batch.old_per_token_logps, atol=1e-5)
    assert torch.allclose(torch.tensor(record['logp']), logps, atol=1e-5)
    assert record['advantages'] == [round(float(a), 5) for a in batch.advantages[:, 0]]
