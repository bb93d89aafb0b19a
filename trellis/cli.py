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


def split_script(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[list[str], list[str] | None]:
    """torchrun's rule for `trellis launch|submit [opts] SCRIPT.py [args]`: everything after the script path
    belongs to the script. Returns (argv up to and including the script, the script's arguments), or
    (argv, None) when the subcommand takes no script or its first positional is not a `.py` (a config)."""
    sub = next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if not argv or argv[0] not in sub or not sub[argv[0]].get_default("takes_script"):
        return argv, None
    options = sub[argv[0]]._option_string_actions
    i = 1
    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            return argv, None
        if tok.startswith("-") and tok != "-":
            name = tok.split("=", 1)[0]
            action = options.get(name)
            # An option's separate value (`--hostfile hosts`, `--train.steps 3`) is not a positional.
            takes_value = action.nargs != 0 if action is not None else "." in name
            i += 2 if takes_value and "=" not in tok else 1
            continue
        if tok.endswith(".py"):
            return argv[:i + 1], argv[i + 1:]
        return argv, None
    return argv, None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    head, script_args = split_script(parser, sys.argv[1:] if argv is None else list(argv))
    args, extra = parser.parse_known_args(head)
    if args.command is None:
        parser.print_help()
        return 2
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    if getattr(args, "resume_allow_change", None):  # train, launch, submit: forwarded to every rank as an override
        args.overrides.append(f"--checkpoint.resume_allow_change={args.resume_allow_change}")
    args.script_args = script_args  # None unless the positional was a SCRIPT.py (split_script)
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
