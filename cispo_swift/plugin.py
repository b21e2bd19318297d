"""The file to hand to swift's `--external_plugins`: it points swift's GRPO trainer at cispo-swift's.

swift imports this file by path (under a hashed module name) in every process, before it looks the trainer class
up, so imports here are absolute. `python -m cispo_swift plugin-path` prints this file's path.
"""

import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
# swift puts the plugin's directory first on sys.path; our module names (config, loss, trainer...) would then
# shadow top-level modules of the same name for the rest of the run.
while _here in sys.path:
    sys.path.remove(_here)

from cispo_swift.registry import register  # noqa: E402

register()
