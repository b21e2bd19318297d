"""`python -m cispo_swift COMMAND`: plugin-path, options."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog='python -m cispo_swift', description=__doc__)
    sub = parser.add_subparsers(dest='command', required=True)
    path = sub.add_parser('plugin-path', help='print the absolute path of the file for --external_plugins')
    path.add_argument('--tasks', action='store_true', help="the synthetic demo tasks' reward plugin instead")
    sub.add_parser('options', help='print the CISPO_* options as a Markdown table')
    args = parser.parse_args(argv)
    here = os.path.dirname(os.path.abspath(__file__))
    if args.command == 'plugin-path':
        print(os.path.join(here, 'tasks.py' if args.tasks else 'plugin.py'))
    elif args.command == 'options':
        from cispo_swift.config import options_table

        print(options_table())
    return 0


if __name__ == '__main__':
    sys.exit(main())
