"""Registration of the trainer with swift's TrainerFactory (shared by the plugin file and the Python API)."""

from cispo_swift.compat import check_swift_version

TRAINER_PATH = 'cispo_swift.trainer.CISPOGRPOTrainer'


def register() -> None:
    """Make `swift rlhf --rlhf_type grpo` build `CISPOGRPOTrainer` (it resolves this dotted path lazily).

    Refuses (`UnsupportedSwiftVersion`) on an ms-swift outside `compat.SUPPORTED_SWIFT`, before touching swift:
    the plugin file calls this at import, so `swift rlhf --external_plugins` stops at argument parsing.
    """
    check_swift_version()
    from swift.trainers import TrainerFactory

    TrainerFactory.TRAINER_MAPPING['grpo'] = TRAINER_PATH
