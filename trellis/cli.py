"""`trellis` command line. Each subcommand lives in trellis/commands/<name>.py and exposes
`register(subparsers)`; user errors (UserError) print one report and exit 2, never a traceback."""

from __future__ import annotations

import argparse
import importlib
import sys

from trellis import __version__
from trellis.errors import UserError

# Order = order in `trellis --help`.
_COMMAND_MODULES = [
    "trellis.commands.train",
    "trellis.commands.data",
    "trellis.commands.config",
    "trellis.commands.checkpoint",
    "trellis.commands.memory",
    "trellis.commands.export",
    "trellis.commands.launch",
    "trellis.commands.submit",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trellis",
        description="Distributed training for Hugging Face causal LMs: DP x PP x TP, ZeRO, AMP, PEFT.",
    )
    parser.add_argument("--version", action="version", version=f"trellis {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def print_user_error(err: UserError) -> None:
    for msg in err.messages:
        print(f"error: {msg}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print_user_error(e)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
