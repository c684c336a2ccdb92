"""`prism`: the command line. Thin: every command is a call into the layers below (see commands/)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from prism_moe import __version__

# Command modules, in the order `prism --help` lists them.
COMMAND_MODULES = [
    "demo",
    "place",
    "simulate",
    "experiment",
    "serve",
    "coordinator",
    "data",
    "tiny",
]


class UserError(Exception):
    """An error caused by the user's input; printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prism", description="prism-moe: collaborative MoE serving on edge servers")
    parser.add_argument("--version", action="version", version=f"prism-moe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"prism_moe.commands.{name}").register(sub)
    return parser


# Set PRISM_DEBUG=1 to see the traceback of an input error.
def main(argv: list[str] | None = None) -> int:
    from prism_moe.config import ConfigError
    from prism_moe.runtime.launcher import LaunchError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (UserError, ConfigError, FileNotFoundError, ValueError, LaunchError) as e:
        if os.environ.get("PRISM_DEBUG"):
            raise
        print(f"prism {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"prism {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
