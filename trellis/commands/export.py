"""`trellis export adapter CHECKPOINT OUT_DIR` | `trellis export merged CHECKPOINT OUT_DIR`."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a PEFT checkpoint as a peft adapter or a merged HF model")
    c = p.add_subparsers(dest="export_command", metavar="KIND", required=True)
    for kind, help_ in (("adapter", "adapter_config.json + adapter_model.safetensors (PeftModel.from_pretrained)"),
                        ("merged", "a full Hugging Face model directory with the adapters merged")):
        e = c.add_parser(kind, help=help_)
        e.add_argument("checkpoint", help="a step-N directory, or a checkpoint directory (its latest valid step)")
        e.add_argument("out_dir", help="output directory (created; existing files of the same name are replaced)")
        e.set_defaults(func=_export, kind=kind)


def _export(args) -> int:
    from trellis.engine.peft.export import export_adapter, export_merged, merged_dtype_note

    fn = export_adapter if args.kind == "adapter" else export_merged
    out = fn(Path(args.checkpoint), Path(args.out_dir))
    what = f"merged model, {merged_dtype_note(out)}," if args.kind == "merged" else args.kind
    print(f"wrote {what} to {out}")
    return 0
