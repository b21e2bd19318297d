"""CISPO for ms-swift GRPO: `swift rlhf --loss_type cispo --external_plugins "$(python -m cispo_swift plugin-path)"`.

Python API: `cispo_swift.configure(norm='prompt', ...)` before `swift.pipelines.rlhf_main(args)`. Importing the
package imports nothing else (`python -m cispo_swift plugin-path` needs only the standard library).
"""

__all__ = ['CISPOConfig', 'configure']


def __getattr__(name):
    if name in __all__:
        from cispo_swift import config

        return getattr(config, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


if __name__ != 'cispo_swift':
    # Loaded by path, i.e. handed to --external_plugins (swift imports such files under a hashed name): act as
    # plugin.py.
    from cispo_swift.registry import detach_plugin_dir, load_plugin

    detach_plugin_dir(__file__)
    load_plugin()
