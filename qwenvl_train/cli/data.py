"""`qwenvl-data`: data tools (inspect shards, convert public formats, build the demo set,
evaluate an export)."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwenvl-data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    from qwenvl_train.data import inspect as inspect_cmd

    inspect_cmd.register(sub)
    from data_recipes import cli as recipes_cli

    recipes_cli.register(sub)
    from qwenvl_train.eval import run_eval

    run_eval.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
