"""CLI subcommands; each module has `register(subparsers)`."""

from __future__ import annotations

import argparse


def add_resume_allow_change(p: argparse.ArgumentParser) -> None:
    """`--resume-allow-change FIELD,...` (= --checkpoint.resume_allow_change) for the commands that run training."""
    p.add_argument("--resume-allow-change", metavar="FIELD,...",
                   help="trajectory fields a resume may change (e.g. data.path,train.seed); same as "
                        "--checkpoint.resume_allow_change")
