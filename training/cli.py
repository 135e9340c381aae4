"""The `crystal-lm` command line: a thin adapter over the package's Python functions.

Each subcommand lives in its own module under ``training/commands/`` and exposes ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, str] = {
    "roundtrip": "training.commands.roundtrip",
    "decode": "training.commands.decode",
    "prepare-data": "training.commands.prepare_data",
    "train": "training.commands.train",
    "generate": "training.commands.generate",
    "csp": "training.commands.csp",
    "evaluate": "training.commands.evaluate",
    "finetune": "training.commands.finetune",
    "push": "training.commands.push",
    "inpaint": "training.commands.inpaint",
    "demo": "training.commands.demo",
}


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with one subparser per available command."""
    parser = argparse.ArgumentParser(prog="crystal-lm", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue
        sub = subparsers.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``crystal-lm`` console script."""
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
