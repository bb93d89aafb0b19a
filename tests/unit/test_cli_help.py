"""People-facing CLI text: every flag and positional of every subcommand has help, and `trellis train --help`
says where the config keys are listed."""

from __future__ import annotations

import argparse

from trellis import cli


def _undocumented(parser: argparse.ArgumentParser, path: list[str]) -> list[str]:
    out = []
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                out += _undocumented(sub, path + [name])
        elif not isinstance(a, argparse._HelpAction) and not (a.help or "").strip():
            out.append(f"{' '.join(path)} {'/'.join(a.option_strings) or a.dest}")
    return out


def test_every_flag_has_help_text():
    assert _undocumented(cli.build_parser(), ["trellis"]) == []


def test_train_help_points_to_config_keys(capsys):
    parser = cli.build_parser()
    try:
        parser.parse_args(["train", "--help"])
    except SystemExit:
        pass
    text = " ".join(capsys.readouterr().out.split())  # argparse rewraps to the terminal width
    assert "trellis config keys" in text and "--deepspeed" in text
