"""The multi-GPU launch examples, run with a stand-in `swift` that records its arguments and environment: every
flag must be one swift 4.6's `swift rlhf` parser knows (with a valid value), the plugin path must resolve, and
the launch variables must be set. (No GPU here: the training itself is not run.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FAKE_SWIFT = """#!/bin/sh
exec "{python}" -c 'import json, os, sys; json.dump({{"argv": sys.argv[1:], "env": dict(os.environ)}}, sys.stdout)' "$@"
"""


def _run_example(name, tmp_path, **env):
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    (bin_dir / 'swift').write_text(FAKE_SWIFT.format(python=sys.executable))
    (bin_dir / 'swift').chmod(0o755)
    (bin_dir / 'python').symlink_to(sys.executable)
    full_env = {k: v for k, v in os.environ.items() if k not in ('NODE_RANK', 'MASTER_ADDR', 'MASTER_PORT')}
    full_env.update(PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}', PYTHONPATH=str(ROOT), **env)
    return subprocess.run(
        ['bash', str(ROOT / 'examples' / name), '--max_steps', '1'], env=full_env, capture_output=True, text=True
    )


def _parse_rlhf_flags(argv):
    """swift's own parser for `swift rlhf`, at the argparse level (no model or data loaded)."""
    from swift.arguments import RLHFArguments
    from swift.utils.utils import _patch_get_type_hints
    from transformers import HfArgumentParser

    with _patch_get_type_hints():
        parser = HfArgumentParser([RLHFArguments])
    return parser.parse_known_args(argv)


@pytest.mark.parametrize(
    'name, env',
    [('zero3.sh', {}), ('multinode.sh', {'NODE_RANK': '1', 'MASTER_ADDR': '10.0.0.1'})],
)
def test_example_flags_are_swift_flags(name, env, tmp_path):
    result = _run_example(name, tmp_path, **env)
    assert result.returncode == 0, result.stderr
    recorded = json.loads(result.stdout)
    assert recorded['argv'][0] == 'rlhf'
    args, unknown = _parse_rlhf_flags(recorded['argv'][1:])
    assert unknown == []
    assert (args.rlhf_type, args.loss_type, args.epsilon_high, args.beta) == ('grpo', ['cispo'], 5.0, 0.0)
    assert args.deepspeed == 'zero3' and args.max_steps == 1  # "$@" comes last
    assert args.external_plugins == [str(ROOT / 'cispo_swift' / 'plugin.py')]
    # Resumes are exact only from checkpoints at generation-batch boundaries.
    assert args.save_steps % (args.steps_per_generation * args.num_iterations) == 0
    assert recorded['env']['NPROC_PER_NODE'] == '8'
    if name == 'multinode.sh':
        launch = {k: recorded['env'][k] for k in ('NNODES', 'NODE_RANK', 'MASTER_ADDR', 'MASTER_PORT')}
        assert launch == {'NNODES': '2', 'NODE_RANK': '1', 'MASTER_ADDR': '10.0.0.1', 'MASTER_PORT': '29500'}


def test_multinode_example_requires_node_rank_and_master_address(tmp_path):
    result = _run_example('multinode.sh', tmp_path, MASTER_ADDR='10.0.0.1')
    assert result.returncode != 0 and 'set NODE_RANK to 0 on the master node' in result.stderr
