"""The file to hand to swift's `--external_plugins`: it points swift's GRPO trainer at cispo-swift's.

swift imports this file by path (under a hashed module name) in every process, before it looks the trainer class
up, so imports here are absolute. `python -m cispo_swift plugin-path` prints this file's path.
"""

from cispo_swift.registry import detach_plugin_dir, register

detach_plugin_dir(__file__)
register()
