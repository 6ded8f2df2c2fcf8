"""`qwenvl-data`: data tools. `inspect` is ours; other packages add sub-commands through the
`qwenvl_train.data_commands` entry-point group (data_recipes adds `convert` and `demo`).

An entry point names a `register(subparsers)` callable that adds its sub-parsers, each
setting `func=handler(args) -> int`. Declared in the package's pyproject.toml, e.g.

    [project.entry-points."qwenvl_train.data_commands"]
    recipes = "data_recipes.cli:register"

The core never imports such a package: the dependency points from the recipes to the core.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

GROUP = "qwenvl_train.data_commands"


def command_plugins() -> list[EntryPoint]:
    """The installed entry points of the group; when the installed metadata has none (an
    editable install made before the group existed), those that the pyproject.toml of this
    source tree declares."""
    return list(entry_points(group=GROUP)) or _declared_in_source_tree()


def _declared_in_source_tree() -> list[EntryPoint]:
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: installed metadata only
        return []
    if not pyproject.is_file():
        return []
    tables = tomllib.loads(pyproject.read_text()).get("project", {}).get("entry-points", {})
    return [EntryPoint(name, value, GROUP) for name, value in tables.get(GROUP, {}).items()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwenvl-data", description="Data tools: look at shards as the model sees them, "
        "convert public data sets into shards, build the offline demo set.")
    sub = parser.add_subparsers(dest="command", required=True)
    from qwenvl_train.data import inspect as inspect_cmd

    inspect_cmd.register(sub)
    for plugin in command_plugins():
        try:
            register = plugin.load()
        except ImportError as e:  # e.g. a recipe's optional dependency is missing
            print(f"qwenvl-data: commands of {plugin.value} unavailable: {e}", file=sys.stderr)
            continue
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
