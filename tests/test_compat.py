"""The supported ms-swift range: refusal at import outside it, and the adapter for what differs inside it."""

import os
import runpy

import pytest
import torch
from stubs import make_trainer

from cispo_swift import compat

PLUGIN = os.path.join(os.path.dirname(compat.__file__), 'plugin.py')


@pytest.mark.parametrize('version', ['4.5.3', '4.5.10', '4.6.0', '4.6.2', '4.6.1.dev0', '4.6.0.post1'])
def test_supported_versions_pass(version):
    assert compat.check_swift_version(version) == version


@pytest.mark.parametrize('version', ['3.12.6', '4.4.2', '4.5.0', '4.5.2', '4.5.3rc1', '4.7.0', '4.7.0.dev0', '5.0.0'])
def test_unsupported_versions_are_refused_with_range_and_version(version):
    with pytest.raises(compat.UnsupportedSwiftVersion) as err:
        compat.check_swift_version(version)
    message = str(err.value)
    assert f'ms-swift{compat.SUPPORTED_SWIFT}' in message and f'ms-swift {version} is installed' in message
    assert "pip install 'ms-swift>=4.5.3,<4.7'" in message


def test_installed_version_is_detected_and_supported():
    from swift.version import __version__

    assert compat.installed_swift_version() == __version__
    assert compat.check_swift_version() == __version__


def test_plugin_refuses_at_import_on_unsupported_swift(monkeypatch):
    from swift.trainers import TrainerFactory

    monkeypatch.setitem(TrainerFactory.TRAINER_MAPPING, 'grpo', 'swift.rlhf_trainers.GRPOTrainer')
    monkeypatch.setattr(compat, 'installed_swift_version', lambda: '4.4.2')
    with pytest.raises(compat.UnsupportedSwiftVersion, match=r'supports ms-swift>=4\.5\.3,<4\.7, but ms-swift 4\.4\.2'):
        runpy.run_path(PLUGIN)
    assert TrainerFactory.TRAINER_MAPPING['grpo'] == 'swift.rlhf_trainers.GRPOTrainer'

    monkeypatch.setattr(compat, 'installed_swift_version', lambda: None)
    with pytest.raises(compat.UnsupportedSwiftVersion, match='which is not installed'):
        runpy.run_path(PLUGIN)

    monkeypatch.setattr(compat, 'installed_swift_version', lambda: '4.6.0')
    runpy.run_path(PLUGIN)
    assert TrainerFactory.TRAINER_MAPPING['grpo'] == 'cispo_swift.trainer.CISPOGRPOTrainer'


def test_pyproject_declares_the_same_range():
    root = os.path.dirname(os.path.dirname(compat.__file__))
    with open(os.path.join(root, 'pyproject.toml')) as f:
        assert f"'ms-swift{compat.SUPPORTED_SWIFT}'" in f.read()


# ---- gradient-accumulation scaling ------------------------------------------------------------------------------


@pytest.mark.parametrize('native', [True, False], ids=['swift-4.6-method', 'swift-4.5-fallback'])
def test_ga_scaling_is_undone_only_where_the_trainer_divides(native):
    trainer = make_trainer(gradient_accumulation_steps=4)
    if not native:
        trainer._undo_gradient_accumulation_scaling = None  # as on ms-swift 4.5, which lacks the method
    elif not hasattr(trainer, '_undo_gradient_accumulation_scaling'):
        pytest.skip('the installed ms-swift (4.5) has no native method')
    loss = torch.tensor(1.5)
    assert compat.undo_gradient_accumulation_scaling(trainer, loss).item() == 6.0
    trainer.current_gradient_accumulation_steps = 3  # the last, shorter window of an epoch
    assert compat.undo_gradient_accumulation_scaling(trainer, loss).item() == 4.5
    trainer.model.training = False
    assert compat.undo_gradient_accumulation_scaling(trainer, loss).item() == 1.5  # eval: no Trainer division
    trainer.model.training = True
    trainer.compute_loss_func = lambda *a: None  # the Trainer does not divide then either
    assert compat.undo_gradient_accumulation_scaling(trainer, loss).item() == 1.5


# ---- rollout-correction metrics ---------------------------------------------------------------------------------


class _TwoRanks:
    """gather_for_metrics of a 1-row tensor as if a second rank had sent `other`."""

    def __init__(self, other):
        self.other = other

    def gather_for_metrics(self, values):
        return torch.cat([values, self.other.unsqueeze(0)])


def test_rollout_metrics_tensors_are_gathered_floats_passed_through():
    trainer = make_trainer()
    keys = ['kl', 'log_ppl_diff_max', 'log_ppl_diff_min']
    trainer.accelerator = _TwoRanks(torch.tensor([3.0, 5.0, -7.0]))
    gathered = compat.gather_rollout_metrics(trainer, dict(zip(keys, torch.tensor([1.0, 2.0, -1.0]).unbind())))
    assert {k: v.item() for k, v in gathered.items()} == {'kl': 2.0, 'log_ppl_diff_max': 5.0, 'log_ppl_diff_min': -7.0}
    # ms-swift 4.5's helpers return floats averaged over ranks already: nothing to gather (and no collective call).
    trainer.accelerator = None
    floats = {'kl': 2.0, 'log_ppl_diff_max': 5.0}
    assert compat.gather_rollout_metrics(trainer, floats) is floats
