"""Registration of the trainer with swift's TrainerFactory, and what every plugin file needs at import."""

import os
import sys

from cispo_swift.compat import check_swift_version

TRAINER_PATH = 'cispo_swift.trainer.CISPOGRPOTrainer'


def detach_plugin_dir(plugin_file: str) -> None:
    """Undo swift's `sys.path.insert(0, dirname(plugin_file))` (swift/utils/utils.py::import_external_file, 4.6.0).

    Left there, the package's module names (config, loss, trainer, plot...) would shadow top-level modules of the
    same name for the rest of the run.
    """
    here = os.path.dirname(os.path.abspath(plugin_file))
    while here in sys.path:
        sys.path.remove(here)


def register() -> None:
    """Make `swift rlhf --rlhf_type grpo` build `CISPOGRPOTrainer` (it resolves this dotted path lazily).

    Refuses (`UnsupportedSwiftVersion`) on an ms-swift outside `compat.SUPPORTED_SWIFT`, before touching swift:
    the plugin file calls this at import, so `swift rlhf --external_plugins` stops at argument parsing.
    """
    check_swift_version()
    from swift.trainers import TrainerFactory

    TrainerFactory.TRAINER_MAPPING['grpo'] = TRAINER_PATH
