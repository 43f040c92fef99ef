"""The ``nestrnn`` command line. Each subcommand lives in ``nestrnn.commands.<name>``.

A command module provides ``HELP`` (one line), ``configure(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMANDS = ("train", "eval", "sample", "tasks", "memories", "plugins", "viz", "plot")


class CommandError(Exception):
    """A user error: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    from nestrnn import __version__

    parser = argparse.ArgumentParser(
        prog="nestrnn", description="Nested LSTMs and pluggable memory functions."
    )
    parser.add_argument("--version", action="version", version=f"nestrnn {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"nestrnn.commands.{name}")
        sub = subparsers.add_parser(name, help=module.HELP, description=module.HELP)
        module.configure(sub)
        sub.set_defaults(run=module.run, subparser=sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # reported by the command's parser: "nestrnn train: error: ..."
        args.subparser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.run(args) or 0)
    except CommandError as error:
        message = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
        print(f"nestrnn {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nestrnn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # ``python -m nestrnn.cli`` runs this file as __main__, a second copy of the module: call the
    # real one, so that the commands' CommandError is the class main() catches
    from nestrnn.cli import main as _main

    sys.exit(_main())
