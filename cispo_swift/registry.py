"""Registration of the trainer with swift's TrainerFactory (shared by the plugin file and the Python API)."""

TRAINER_PATH = 'cispo_swift.trainer.CISPOGRPOTrainer'


def register() -> None:
    """Make `swift rlhf --rlhf_type grpo` build `CISPOGRPOTrainer` (it resolves this dotted path lazily)."""
    from swift.trainers import TrainerFactory

    TrainerFactory.TRAINER_MAPPING['grpo'] = TRAINER_PATH
