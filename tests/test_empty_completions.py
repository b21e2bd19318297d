"""Empty completions (EOS sampled first): swift 4.6.0's crash and the repair (cispo_swift/empty_completions.py).

The fast tests run swift's own collate (`collate_to_grpo_micro_batch`) on hand-made encoded samples; the slow ones run
`swift rlhf` on the tiny model with `tests/force_eos_plugin.py`, which makes every 4th completion empty.
"""

import json
from types import SimpleNamespace

import pytest
import torch
from swift.rlhf_trainers.utils import collate_to_grpo_micro_batch
from swift_run import check_ok, logged_steps, run_swift

from cispo_swift.empty_completions import completion_window, narrow_completion_frame

PAD = 0


class _Template:
    """What `collate_to_grpo_micro_batch` needs of a template: right padding with -100 labels, no padding-free."""

    padding_free = False
    padding_side = 'right'

    def data_collator(self, encoded, padding_to=None):
        width = max(len(e['input_ids']) for e in encoded)

        def pad(x, value):
            return x + [value] * (width - len(x))

        return {
            'input_ids': torch.tensor([pad(e['input_ids'], PAD) for e in encoded]),
            'attention_mask': torch.tensor([pad([1] * len(e['input_ids']), 0) for e in encoded]),
            'labels': torch.tensor([pad(e['labels'], -100) for e in encoded]),
        }


def _sample(prompt_len, completion_len, rollout_logprobs=None):
    ids = list(range(1, prompt_len + completion_len + 1))
    labels = [-100] * prompt_len + ids[prompt_len:]
    return SimpleNamespace(
        encoded={'input_ids': ids, 'labels': labels, 'length': len(ids)},
        is_truncated=False,
        rollout_logprobs=rollout_logprobs,
        routed_experts=None,
    )


def _collate(samples):
    return collate_to_grpo_micro_batch(samples, _Template(), device=torch.device('cpu'), use_logits_to_keep=True)


def _expected_window(prompt_and_completion_lengths, width):
    """Independently: the widest completion region, measured from the end of the padded batch (right padding)."""
    return max(width - p for p, c in prompt_and_completion_lengths if c > 0)


def test_swift_widens_the_window_to_the_whole_sequence_and_the_repair_narrows_it():
    lengths = [(5, 3), (4, 0), (6, 2), (3, 4)]  # (prompt, completion) tokens; row 1 sampled EOS first
    model_inputs, batch = _collate([_sample(p, c) for p, c in lengths])
    T = model_inputs['input_ids'].shape[-1]
    assert T == 8
    assert batch.logits_to_keep == T  # swift 4.6.0: argmax of the empty row's all-False labels is 0
    # The shapes swift's _get_logps_via_local_forward then compares: logits[:, -(T + 1):-1] vs input_ids[:, -T:].
    assert torch.empty(4, T)[:, -(T + 1) : -1].shape[1] == T - 1

    assert narrow_completion_frame(batch, T)
    width = _expected_window(lengths, T)
    assert batch.logits_to_keep == width == 5
    labels = model_inputs['labels']
    assert torch.equal(batch.completion_mask, labels[:, -width:] != -100)
    assert batch.completion_mask.sum(-1).tolist() == [3, 0, 2, 4]  # the empty row: no token
    assert batch.seq_lengths.tolist() == [width] * 4
    # swift's own window for the same batch without the empty row is the same.
    _, without = _collate([_sample(p, c) for p, c in lengths if c > 0])
    assert without.logits_to_keep == width


def test_batches_without_empty_rows_are_left_alone():
    model_inputs, batch = _collate([_sample(5, 3), _sample(3, 4)])
    mask, seq_lengths, window = batch.completion_mask, batch.seq_lengths, batch.logits_to_keep
    assert not narrow_completion_frame(batch, model_inputs['input_ids'].shape[-1])
    assert batch.completion_mask is mask and batch.seq_lengths is seq_lengths and batch.logits_to_keep == window == 5


def test_all_rows_empty_keeps_a_one_token_window_with_no_completion_token():
    model_inputs, batch = _collate([_sample(5, 0), _sample(3, 0)])
    T = model_inputs['input_ids'].shape[-1]
    assert narrow_completion_frame(batch, T)
    assert batch.logits_to_keep == 1 and batch.completion_mask.shape == (2, 1)
    assert not batch.completion_mask.any()


def test_rollout_logprobs_follow_the_narrowed_window():
    # swift builds the rollout log-probs in the (wrong) whole-sequence frame; each token keeps its value.
    samples = [_sample(5, 3, [[-0.1, -0.2, -0.3]]), _sample(4, 0, [[]]), _sample(3, 4, [[-1.0, -2.0, -3.0, -4.0]])]
    model_inputs, batch = _collate(samples)
    assert batch.rollout_per_token_logps is not None
    assert narrow_completion_frame(batch, model_inputs['input_ids'].shape[-1])
    got = [batch.rollout_per_token_logps[i][batch.completion_mask[i]].tolist() for i in range(3)]
    assert got == [pytest.approx([-0.1, -0.2, -0.3]), [], pytest.approx([-1.0, -2.0, -3.0, -4.0])]


def test_completion_window():
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 0, 0, 0, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    assert completion_window(mask) == 3
    assert completion_window(torch.zeros(2, 4, dtype=torch.bool)) == 1


# ---- end to end ---------------------------------------------------------------------------------------------------


@pytest.fixture
def force_eos():
    from pathlib import Path

    return str(Path(__file__).resolve().parent / 'force_eos_plugin.py')


@pytest.mark.slow
def test_swift_crashes_on_an_empty_completion(tiny, tmp_path, force_eos):
    """swift 4.6.0's built-in cispo (no cispo-swift plugin) stops at the first batch holding an empty completion."""
    result = run_swift(tiny, tmp_path / 'builtin', plugin=False, extra_plugins=[force_eos])
    assert result.returncode != 0
    err = result.stderr
    assert 'Size does not match at dimension 1' in err
    assert '_prepare_batch_inputs' in err and '_get_logps_via_local_forward' in err


@pytest.mark.slow
def test_cispo_trains_through_empty_completions_and_counts_them_as_zero_tokens(tiny, tmp_path, force_eos):
    record = tmp_path / 'normaliser.jsonl'
    out = tmp_path / 'ours'
    result = run_swift(
        tiny, out, '--log_completions', 'true', extra_plugins=[force_eos], env={'FORCE_EOS_RECORD': str(record)}
    )
    check_ok(result)
    rows = logged_steps(out)
    assert len(rows) == 4 and all(torch.isfinite(torch.tensor([r['loss'], r['grad_norm']])).all() for r in rows)
    batches = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(batches) == 2  # 4 steps, num_iterations 2
    for b in batches:
        tokens = [t for micro in b['row_tokens'] for t in micro]
        assert len(tokens) == 4 and tokens[0] == 0  # row 0 of each generate call was forced to EOS first
        assert all(t > 0 for t in tokens[1:])
        assert b['num_items_in_batch'] == sum(tokens)  # the loss's normaliser counts the empty completion as 0
    completions = [json.loads(line) for line in (out / 'completions.jsonl').read_text().splitlines()]
    assert all(c['completion'][0] == '' for c in completions)
    generated = [r for r in rows if 'completions/min_length' in r]
    assert generated and all(r['completions/min_length'] == 0.0 for r in generated)
