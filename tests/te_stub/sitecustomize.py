"""Transformer Engine stubbed for import, for the Megatron tests on CPU (tests/test_megatron.py): this directory goes
on PYTHONPATH for those tests only (scripts/test_megatron.sh), so that every process they start, swift's Megatron
CLI and the one it spawns included, loads this file at start-up.

transformer_engine needs CUDA to install and to import. mcore-bridge 1.6.5 imports it unguarded and patches
megatron-core's Transformer Engine layer classes at import (`mcore_bridge/patcher.py::apply_patch`), and swift
4.6.0's Megatron trainers import mcore_bridge, so on CPU those modules cannot be imported without it. Here every
`transformer_engine...` module is an empty stand-in whose attributes are placeholder classes: enough for the
modules to import (megatron-core subclasses them, mcore-bridge patches the subclasses). Nothing here can run:
calling a placeholder raises. The tests only parse arguments and call the GRPO loss on given tensors.
"""

import importlib
import importlib.abc
import importlib.machinery
import sys
import types

STUBBED = ('transformer_engine', 'transformer_engine_torch')
VERSION = '2.9.0'  # a recent release, so that megatron-core takes its current code paths


def _cannot_run(name):
    def call(*args, **kwargs):
        raise RuntimeError(f'{name} is a transformer_engine stub (tests/te_stub): it cannot run.')

    return call


class _PlaceholderType(type):
    def __getattr__(cls, name):  # class attributes read at import (`_SplitAlongDim.apply`)
        if name.startswith('__'):
            raise AttributeError(name)
        return _cannot_run(f'{cls.__module__}.{cls.__name__}.{name}')


class _Placeholder(metaclass=_PlaceholderType):
    def __init__(self, *args, **kwargs):
        _cannot_run(type(self).__name__)()


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith('__'):
            raise AttributeError(name)
        if name[0].islower():  # a submodule (te.pytorch.ops), or a function: neither is called here
            value = importlib.import_module(f'{self.__name__}.{name}')
        else:
            value = type(name, (_Placeholder,), {'__module__': self.__name__})
        setattr(self, name, value)
        return value


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split('.')[0] in STUBBED:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        module.__version__ = VERSION
        return module

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _Finder())
