"""Test-only `--external_plugins` file: swift never pushes the trainer's weights into vLLM (a stale engine), the
control of tests/test_vllm_e2e.py's weight-sync check."""

from swift.rlhf_trainers import rollout_mixin


def _no_sync(self, skip_async_check=False):
    return None


rollout_mixin.RolloutTrainerMixin._move_model_to_vllm = _no_sync
