"""`trellis checkpoint list DIR | inspect DIR/step-N | convert DIR/step-N --to fp32|hf --out OUT`."""

from __future__ import annotations

import argparse
from pathlib import Path

from trellis.errors import CheckpointError, UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("checkpoint", help="list, inspect and convert checkpoints")
    c = p.add_subparsers(dest="checkpoint_command", metavar="ACTION", required=True)
    ls = c.add_parser("list", help="checkpoints in a directory, newest last, each verified against its checksums")
    ls.add_argument("dir", help="a checkpoint.dir (holding step-N directories)")
    ls.add_argument("--no-verify", action="store_true", help="skip reading every file (says 'not verified')")
    ls.set_defaults(func=_list)
    ins = c.add_parser("inspect", help="layout, step, sizes and checksum validity of one checkpoint")
    ins.add_argument("path", help="one step-N directory")
    ins.set_defaults(func=_inspect)
    cv = c.add_parser("convert", help="write full fp32 weights or a Hugging Face model directory")
    cv.add_argument("path", help="one step-N directory (native backend, full fine-tuning)")
    cv.add_argument("--to", required=True, choices=["fp32", "hf"],
                    help="fp32: one model.safetensors; hf: a from_pretrained directory with tokenizer files")
    cv.add_argument("--out", required=True, help="output directory")
    cv.set_defaults(func=_convert)


def _list(args) -> int:
    from trellis.engine.checkpoint import io
    from trellis.engine.metrics import fmt_bytes

    root = Path(args.dir)
    if not root.is_dir():
        raise UserError(f"{root}: no such directory")
    rows = io.list_checkpoints(root)
    states: dict[Path, str] = {}
    latest = None
    for step, path, meta in reversed(rows):  # newest first: what --resume auto would pick
        if meta is None:
            states[path] = "INCOMPLETE (ignored)"
        elif args.no_verify:
            states[path] = "not verified"
            latest = latest or path
        else:
            try:
                io.verify(path, meta)
                states[path] = "valid"
                latest = latest or path
            except CheckpointError as e:
                states[path] = f"INVALID: {e.messages[0]}"
    for step, path, meta in rows:
        mark = "  <- latest" if path == latest else ""
        print(f"{path.name:<14} {fmt_bytes(io.dir_bytes(path)):>10}  {states[path]}{mark}")
    for p in sorted(root.glob("step-*.tmp")):
        print(f"{p.name:<14} {fmt_bytes(io.dir_bytes(p)):>10}  INCOMPLETE (ignored)")
    if not rows:
        print(f"no checkpoints in {root}")
    return 0


def _inspect(args) -> int:
    from trellis.engine.checkpoint import io
    from trellis.engine.metrics import fmt_bytes

    path = Path(args.path)
    meta = io.read_metadata(path)
    if meta is None:
        raise CheckpointError(f"{path}: not a valid checkpoint (no readable metadata.json)")
    try:
        io.verify(path, meta)
        validity = "valid (all checksums match)"
    except CheckpointError as e:
        validity = f"INVALID: {e}"
    lay = meta["layout"]
    print(f"checkpoint  {path}")
    print(f"step        {meta['step']}  (tokens seen {meta['tokens_seen']})")
    print(f"model       {meta['model']}")
    print(f"layout      dp={lay['dp']} pp={lay['pp']} tp={lay['tp']} world={lay['world_size']} "
          f"zero={meta['zero']['stage']} backend={meta['zero']['backend']} precision={meta['precision']} "
          f"peft={meta['peft']}")
    print(f"batch       global {meta['global_batch_size']} sequences")
    print(f"versions    {meta['versions']}")
    print(f"size        {fmt_bytes(io.dir_bytes(path))} in {len(meta['files'])} files")
    print(f"validity    {validity}")
    return 0 if validity.startswith("valid") else 2


def _convert(args) -> int:
    from trellis.engine.checkpoint.convert import to_fp32_safetensors, to_hf

    out = Path(args.out)
    written = to_fp32_safetensors(Path(args.path), out) if args.to == "fp32" else to_hf(Path(args.path), out)
    print(f"wrote {written}")
    return 0
