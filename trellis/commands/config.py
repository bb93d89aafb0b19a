"""`trellis config show FILE [overrides]` and `trellis config keys`."""

from __future__ import annotations

import argparse

from trellis import configs


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="show the resolved config or list every key")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = csub.add_parser("show", help="print the resolved config (file + overrides) as TOML")
    show.add_argument("config", help="config file or preset name")
    show.add_argument("--deepspeed", metavar="JSON", help="map a stock DeepSpeed ds_config.json")
    show.set_defaults(func=_show, accepts_overrides=True)
    keys = csub.add_parser("keys", help="list every config key")
    keys.set_defaults(func=_keys)


def _show(args) -> int:
    cfg = configs.load(args.config, args.overrides, deepspeed_json=args.deepspeed)
    print(f"# resolved from {cfg.source}" + (f" + {args.deepspeed}" if args.deepspeed else ""))
    print(configs.to_toml(cfg), end="")
    return 0


def _keys(args) -> int:
    for k in configs.all_keys():
        print(k)
    return 0
