"""`python -m cispo_swift COMMAND`: plugin-path, options, plot, summary, model."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ('plot', 'summary'):
        from cispo_swift.demo import plot

        return plot.main(argv[1:]) if argv[0] == 'plot' else plot.summary_main(argv[1:])
    if argv[:2] == ['model', 'smollm2']:
        from cispo_swift.demo import smollm2

        return smollm2.main(argv[2:])
    parser = argparse.ArgumentParser(prog='python -m cispo_swift', description=__doc__)
    sub = parser.add_subparsers(dest='command', required=True)
    path = sub.add_parser('plugin-path', help='print the absolute path of the file for --external_plugins')
    which = path.add_mutually_exclusive_group()
    which.add_argument('--tasks', action='store_true', help="the synthetic demo tasks' reward plugin instead")
    which.add_argument(
        '--vllm-cpu', action='store_true', help='the plugin that makes vLLM generation (colocate) train on CPU instead'
    )
    sub.add_parser('options', help='print the CISPO_* options as a Markdown table')
    sub.add_parser('plot', help='plot swift logging.jsonl of one or more runs: plot RUN_DIR... -o out.png')
    sub.add_parser('summary', help='first-vs-last reward and the CISPO metrics of a run: summary RUN_DIR')
    model = sub.add_parser('model', help='fetch and convert a real model once, print its path (model smollm2 -h)')
    model.add_argument('name', choices=['smollm2'])
    args = parser.parse_args(argv)
    here = os.path.dirname(os.path.abspath(__file__))
    if args.command == 'plugin-path':
        if args.tasks:
            print(os.path.join(here, 'demo', 'reward_plugin.py'))
        elif args.vllm_cpu:
            print(os.path.join(here, 'vllm_cpu_plugin.py'))
        else:
            print(os.path.join(here, 'plugin.py'))
    elif args.command == 'options':
        from cispo_swift.config import options_table

        print(options_table())
    return 0


if __name__ == '__main__':
    sys.exit(main())
