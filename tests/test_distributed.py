"""Two real processes over gloo: the trainer's loss, gradients and `cispo/*` metrics equal one process on the
whole batch, with very uneven token counts per rank.

Each rank runs `CISPOGRPOTrainer._compute_loss_and_metrics` (stub trainer from stubs.py, but with a real
`accelerate.Accelerator` of 2 CPU processes, so every gather goes through gloo) on its half of the sequences,
back-propagates into a shared weight and all-reduce-averages the gradient, as DDP does. The reference is one
process with the whole batch. swift's own metrics average per-rank means; with uneven counts they differ from
the whole-batch value, which the last test shows.
"""

import os
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from linear_problem import B, T, linear_problem
from stubs import make_trainer, swift_loss
from swift.rl_core.data import GRPOBatch
from swift_run import _free_port

from cispo_swift import norm as norm_module
from cispo_swift.config import CISPOConfig

pytestmark = pytest.mark.slow  # two spawned processes import swift: ~40 s

WORLD = 2
# Rank 0 gets rows 0-3 (9 tokens), rank 1 rows 4-7 (26 tokens); prompt group 1 spans both ranks.
PROMPT_IDS = [0, 0, 1, 1, 1, 1, 2, 2]
NORMS = ('token', 'sequence', 'prompt')
TRAINER_ARGS = {'beta': 0.04, 'steps_per_generation': 1}


def _run(problem, rows, norm, accelerator=None, builtin=False):
    """Loss, gradient of W and recorded metrics of one process holding `rows` of the batch."""
    world = 1 if accelerator is None else accelerator.num_processes
    trainer = make_trainer(CISPOConfig(norm=norm), world_size=world, **TRAINER_ARGS)
    if accelerator is not None:
        trainer.accelerator = accelerator
    weight = problem.weight.clone().requires_grad_(True)

    def logps_of(model, model_inputs, grpo_batch, compute_entropy=False, origin_data=None):
        logits = problem.hidden[rows] @ weight
        return torch.log_softmax(logits, -1).gather(-1, problem.ids[rows].unsqueeze(-1)).squeeze(-1), None

    trainer._get_per_token_logps_and_entropies = logps_of
    mask = problem.mask[rows]
    batch = GRPOBatch(
        completion_mask=mask,
        truncated_mask=torch.zeros(mask.shape[0], dtype=torch.bool),
        seq_lengths=mask.sum(-1),
        old_per_token_logps=problem.old[rows],
        ref_per_token_logps=problem.ref[rows],
        advantages=problem.adv[rows],
        # swift counts the completion tokens of the generation batch on all ranks.
        num_items_in_batch=problem.mask.sum().double(),
        logits_to_keep=T,
    )
    if builtin:
        loss, metrics = swift_loss(trainer, batch)
        return {'clip_ratio': metrics['clipping']['cispo_clip_ratio'], 'kl': metrics['kl']}
    samples = [SimpleNamespace(prompt_id=PROMPT_IDS[i]) for i in range(B)[rows]]
    norm_module.attach_group_counts(trainer, samples, [{'grpo_batch': batch}])
    loss, metrics = trainer._compute_loss_and_metrics(None, {}, batch)
    loss.backward()
    trainer._update_metrics(metrics)
    recorded = {k: v[-1] for k, v in trainer._metrics['train'].items() if k.startswith('cispo') or k == 'kl'}
    recorded.update({f'cispo/{k}': v for k, v in trainer.cispo_recorder.extrema['train'].items()})
    return {'loss': loss.detach(), 'grad': weight.grad.clone(), 'metrics': recorded}


def _worker(rank, port, out_dir):
    os.environ.update(
        MASTER_ADDR='127.0.0.1',
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_WORLD_SIZE=str(WORLD),
    )
    torch.set_num_threads(1)
    import torch.distributed as dist
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)  # initialises the gloo process group from the variables above
    assert accelerator.num_processes == WORLD and dist.get_backend() == 'gloo'
    problem = linear_problem()
    rows = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
    results = {}
    for norm in NORMS:
        out = _run(problem, rows, norm, accelerator)
        # DDP: every rank ends with the mean of the rank gradients (the logged loss is the mean too).
        for key in ('loss', 'grad'):
            dist.all_reduce(out[key], op=dist.ReduceOp.SUM)
            out[key] /= WORLD
        results[norm] = out
    results['builtin'] = _run(problem, rows, 'token', accelerator, builtin=True)
    # A trainer that believes it is alone while 2 processes were launched (torchrun on CPU without --use_cpu).
    try:
        make_trainer(world_size=1)
    except RuntimeError as error:
        results['launch_error'] = str(error)
    torch.save(results, os.path.join(out_dir, f'rank{rank}.pt'))
    dist.destroy_process_group()


@pytest.fixture(scope='module')
def two_ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp('gloo')
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f'rank{r}.pt', weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize('norm', NORMS)
def test_two_gloo_ranks_give_the_whole_batch_gradient(two_ranks, norm):
    whole = _run(linear_problem(), slice(None), norm)
    for rank in two_ranks:
        torch.testing.assert_close(rank[norm]['grad'], whole['grad'], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(rank[norm]['loss'], whole['loss'], rtol=1e-10, atol=1e-12)
    assert whole['grad'].abs().sum() > 0


@pytest.mark.parametrize('norm', NORMS)
def test_two_gloo_ranks_log_the_whole_batch_metrics(two_ranks, norm):
    whole = _run(linear_problem(), slice(None), norm)['metrics']
    assert 0 < whole['cispo/clip_frac'] < 1, 'the batch must clip some tokens, not all'
    for rank in two_ranks:
        assert rank[norm]['metrics'].keys() == whole.keys()
        for key, value in whole.items():
            if key != 'kl':  # swift's meaning: the mean of per-rank means (last test)
                assert rank[norm]['metrics'][key] == pytest.approx(value, rel=1e-12, abs=1e-15), key


def test_swift_metrics_average_per_rank_means_ours_count_tokens(two_ranks):
    """swift's `cispo_clip_ratio` and `kl` over two ranks are the mean of the two ranks' own values; with 9 and
    26 tokens that is not the whole-batch value, which ours report (`cispo_clip_ratio`, `cispo/kl`). Our `kl` keeps
    swift's meaning, as for every other loss type."""
    whole = _run(linear_problem(), slice(None), 'token')['metrics']
    # What each rank's half gives on its own.
    per_rank = [_run(linear_problem(), slice(r * B // WORLD, (r + 1) * B // WORLD), 'token')['metrics'] for r in (0, 1)]
    ours = two_ranks[0]['token']['metrics']
    for key, ours_key in (('clip_ratio', 'cispo_clip_ratio'), ('kl', 'cispo/kl')):
        mean_of_means = (per_rank[0][ours_key] + per_rank[1][ours_key]) / 2
        assert two_ranks[0]['builtin'][key] == pytest.approx(mean_of_means, rel=1e-6)
        assert whole[ours_key] > 0 and mean_of_means != pytest.approx(whole[ours_key], rel=1e-3)
        assert ours[ours_key] == pytest.approx(whole[ours_key], rel=1e-12)
    assert ours['kl'] == pytest.approx(two_ranks[0]['builtin']['kl'], rel=1e-12)


def test_launch_without_data_parallel_trainer_is_refused(two_ranks):
    message = two_ranks[0]['launch_error']
    assert '2 processes were launched' in message and 'world size 1' in message and '--use_cpu true' in message
