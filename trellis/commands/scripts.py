"""The SCRIPT.py form of `trellis launch` and `trellis submit`: a user's script run on every rank."""

from __future__ import annotations

from pathlib import Path

from trellis.errors import UserError


def user_script(args) -> str | None:
    """The script path when the positional was a `.py` (trellis/cli.py: split_script), else None (a config).
    Dotted overrides before the script would be silently meaningless for it, so they are refused."""
    if args.script_args is None:
        return None
    if args.overrides:
        raise UserError(f"{' '.join(args.overrides)}: dotted overrides apply to a trellis config, not to the script "
                        f"{args.config}; pass the script's own arguments after its path")
    if not Path(args.config).is_file():
        raise UserError(f"{args.config}: no such script (a `.py` positional is run on every rank)")
    return args.config
