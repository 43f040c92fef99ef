"""The ``nestrnn`` command line. Each subcommand lives in ``nestrnn.commands.<name>``.

A command module provides ``HELP`` (one line), ``configure(parser)`` and ``run(args) -> int``.
A command raises :class:`nestrnn.errors.UserError` (or a subclass) for anything the user must
fix; :func:`main` prints it as one line, ``nestrnn <command>: error: ...``, and returns 2. Options
and ``KEY=VALUE`` arguments may come in any order.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from nestrnn.errors import UserError, one_line

COMMANDS = (
    "train",
    "eval",
    "sample",
    "tasks",
    "memories",
    "plugins",
    "viz",
    "plot",
    "sweep",
    "compare",
)


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
        sub.set_defaults(run=module.run, subparser=sub, command=name)
    return parser


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """The command and its arguments; a command's options and positional arguments (its
    ``KEY=VALUE`` overrides) may be interleaved."""
    args, extra = build_parser().parse_known_args(argv)
    if not extra:
        return args
    # argparse takes one run of positionals before the options: parse the command's own
    # arguments again, interleaved (the top-level parser has only --help and --version)
    rest = list(argv)[list(argv).index(args.command) + 1 :]
    return args.subparser.parse_intermixed_args(rest)


@contextlib.contextmanager
def concise_warnings() -> Iterator[None]:
    """Warnings as ``warning: <message>`` lines on stderr, without source locations."""

    def show(message: Any, *args: Any, **kwargs: Any) -> None:
        print(f"warning: {message}", file=sys.stderr)

    previous, warnings.showwarning = warnings.showwarning, show
    try:
        yield
    finally:
        warnings.showwarning = previous


def main(argv: Sequence[str] | None = None) -> int:
    from nestrnn.engine.distributed import is_main_process
    from nestrnn.registry import RegistryError

    args = parse(sys.argv[1:] if argv is None else argv)
    with concise_warnings():
        try:
            code = int(args.run(args) or 0)
            sys.stdout.flush()  # a reader that went away shows here, not at interpreter exit
            return code
        except BrokenPipeError:  # `nestrnn sample ... | head`: stop quietly, as Unix tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 128 + 13  # the status of a process ended by SIGPIPE
        except (UserError, RegistryError) as error:
            if is_main_process():  # under torchrun every rank fails alike: rank 0 tells
                print(f"nestrnn {args.command}: error: {one_line(error)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"nestrnn {args.command}: interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
