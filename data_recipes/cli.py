"""`qwenvl-data convert <recipe> ...` and `qwenvl-data demo ...`.

Each recipe's options are read off its converter's constructor, so the command line and
the Python API cannot drift apart: `RefCOCO(src, instances=None, split="train")` becomes
`convert refcoco --src ... [--instances ...] [--split train]`.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import sys
from typing import Any

from data_recipes import RECIPES


def _type_of(default: Any) -> type:
    return type(default) if isinstance(default, int | float) and default is not True else str


def _add_recipe(sub: Any, name: str, cls: type) -> None:
    doc = cls.__dict__.get("__doc__") or inspect.getmodule(cls).__doc__ or ""
    p = sub.add_parser(name, help=doc.strip().splitlines()[0], description=doc,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    for pname, param in inspect.signature(cls.__init__).parameters.items():
        if pname == "self":
            continue
        flag, meta = "--" + pname.replace("_", "-"), pname.upper()
        choices = getattr(cls, "option_choices", {}).get(pname)
        if param.default is inspect.Parameter.empty:
            p.add_argument(flag, dest=f"opt_{pname}", metavar=meta, required=True)
        else:
            p.add_argument(flag, dest=f"opt_{pname}", type=_type_of(param.default),
                           default=param.default, choices=choices,
                           metavar=meta if choices is None else None,
                           help=f"default: {param.default}")
    p.add_argument("--out", required=True, help="output directory for the shards")
    p.add_argument("--prefix", default=None, help=f"shard name prefix (default: {name})")
    p.add_argument("--workers", type=int, default=1, help="parallel processes")
    p.add_argument("--max-samples-per-shard", type=int, default=1000)
    p.add_argument("--max-shard-bytes", type=int, default=256 << 20)
    p.set_defaults(func=_convert, recipe_cls=cls)


def _convert(args: argparse.Namespace) -> int:
    from data_recipes.runner import run_conversion

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    opts = {k[4:]: v for k, v in vars(args).items() if k.startswith("opt_")}
    try:
        conv = args.recipe_cls(**opts)
        manifest = run_conversion(conv, args.out, prefix=args.prefix, workers=args.workers,
                                  max_samples=args.max_samples_per_shard,
                                  max_bytes=args.max_shard_bytes)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"convert {conv_name(args)}: {e}", file=sys.stderr)
        return 2
    summary = {k: manifest[k] for k in ("num_samples", "tasks", "skipped", "units")}
    print(json.dumps(summary, indent=1))
    return 0


def conv_name(args: argparse.Namespace) -> str:
    return getattr(args.recipe_cls, "name", "?")


def _demo(args: argparse.Namespace) -> int:
    from data_recipes.demo import build_demo

    manifest = build_demo(args.out, small=args.small)
    print(json.dumps({t: m["num_samples"] for t, m in manifest["tasks"].items()}, indent=1))
    return 0


def register(subparsers: Any) -> None:
    """Add `convert` (one sub-command per recipe) and `demo` to the `qwenvl-data` CLI."""
    conv = subparsers.add_parser("convert", help="convert a public data set into shards")
    sub = conv.add_subparsers(dest="recipe", metavar="RECIPE", required=True)
    for name, cls in RECIPES.items():
        _add_recipe(sub, name, cls)
    demo = subparsers.add_parser("demo", help="build the offline demo shards")
    demo.add_argument("--out", required=True, help="output directory")
    demo.add_argument("--small", action="store_true", help="the reduced set used by tests")
    demo.set_defaults(func=_demo)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m data_recipes.cli`), same commands as `qwenvl-data`."""
    parser = argparse.ArgumentParser(prog="qwenvl-data")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
