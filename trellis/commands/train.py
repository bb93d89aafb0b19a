"""`trellis train CONFIG [--deepspeed JSON] [--resume auto|PATH] [--resume-allow-change FIELD,...]
[--section.key=value ...]`."""

from __future__ import annotations

import argparse

from trellis import configs
from trellis.commands import add_resume_allow_change


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a model (starts its own ranks, or runs as one rank under a launcher)",
        description="Dotted overrides follow the config, e.g. --train.micro_batch_size=4 --parallel.dp=2. "
                    "Every key is listed by `trellis config keys` (documented in configs/schema.py); "
                    "the resolved config: `trellis config show CONFIG [overrides]`. Precedence: defaults < TOML < --deepspeed JSON < "
                    "overrides.",
    )
    p.add_argument("config", help="config file (TOML) or preset name, e.g. configs/tiny-llama.toml")
    p.add_argument("--deepspeed", metavar="JSON", help="a stock DeepSpeed ds_config.json (implies zero.backend=deepspeed)")
    p.add_argument("--resume", metavar="auto|PATH", help="same as --checkpoint.resume")
    add_resume_allow_change(p)
    p.set_defaults(func=_train, accepts_overrides=True)


def _train(args) -> int:
    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"--checkpoint.resume={args.resume}")
    cfg = configs.load(args.config, overrides, deepspeed_json=args.deepspeed)
    from trellis.engine.run import run_training

    return run_training(cfg, argv=["train", args.config, *([f"--deepspeed={args.deepspeed}"] if args.deepspeed else []), *overrides])
