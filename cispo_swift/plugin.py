"""The file to hand to swift's `--external_plugins`: it checks the run's CISPO settings and points swift's GRPO
trainer at cispo-swift's.

swift imports this file by path (under a hashed module name) in every process while it parses its arguments,
before it loads a model or looks the trainer class up, so imports here are absolute.
`python -m cispo_swift plugin-path` prints this file's path.
"""

from cispo_swift.registry import detach_plugin_dir, load_plugin

detach_plugin_dir(__file__)
load_plugin()
