"""`trellis data prepare CONFIG [--out DIR] [--num-proc N] [--section.key=value ...]`: tokenize a config's data
once into a memory-mapped prepared corpus (engine/data/corpus.py) that `trellis train` maps in O(1)."""

from __future__ import annotations

import argparse
import sys
import time

from trellis import configs


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="prepare training data (tokenize once into a memory-mapped corpus)")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    pp = dsub.add_parser(
        "prepare", help="tokenize data.path into a prepared corpus",
        description="Without --out the corpus goes where `trellis train` looks for it (data.cache_dir); with --out "
                    "give that directory to training as data.path. Dotted overrides follow the config.")
    pp.add_argument("config", help="config file (TOML) or preset name")
    pp.add_argument("--out", metavar="DIR", help="write the prepared corpus here (replaced if present)")
    pp.add_argument("--num-proc", type=int, default=0, metavar="N", help="tokenizer processes (0 = automatic)")
    pp.set_defaults(func=_prepare, accepts_overrides=True)


def _prepare(args) -> int:
    cfg = configs.load(args.config, list(args.overrides))
    from trellis.engine.data import CorpusDataset, load_corpus, prepare, resolve_packing
    from trellis.engine.model import resolve_model_dir
    from trellis.engine.tokenizer import find_tokenizer, load_tokenizer

    tok = load_tokenizer(find_tokenizer(resolve_model_dir(cfg.model.path), cfg.model.tokenizer))
    t0 = time.perf_counter()
    if args.out:
        corpus = prepare(cfg.data, tok, args.out, args.num_proc)
    else:
        corpus = load_corpus(cfg.data, tok, cfg.data.path, num_proc=args.num_proc,
                             log=lambda m: print(m, file=sys.stderr))
    dt = time.perf_counter() - t0
    packing = resolve_packing(cfg.data, corpus.record_type)
    rows = CorpusDataset(corpus, seq_len=cfg.data.seq_len, packing=packing,
                         truncation=getattr(cfg.data, "truncation", "right"), seed=cfg.train.seed, shuffle=False)
    c = corpus.manifest["counts"]
    mb = sum(s["size"] for s in corpus.manifest["sources"]) / 1e6
    print(f"prepared {corpus.dir}\n  {c['records']} records, {c['tokens']} tokens ({c['targets']} targets) from "
          f"{mb:.2f} MB in {dt:.2f} s\n  data.seq_len={cfg.data.seq_len} packing={packing}: {len(rows)} rows, "
          f"{rows.stats.truncated} records truncated, {rows.stats.dropped} dropped")
    return 0
