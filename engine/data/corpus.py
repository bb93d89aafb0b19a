"""Prepared corpora: records tokenized once, in parallel processes, into memory-mapped shards + manifest.json.

A prepared directory holds flat binary shards written with numpy and read back with `np.memmap` (never pickle):

- tokens.bin      uint16 (vocab < 65536) or uint32: every document's tokens, back to back;
- loss_mask.bin   uint8, 1 where the token is a training target;
- doc_offsets.bin int64 [documents + 1]: document d is tokens[off[d]:off[d+1]]. Preference records are two
  consecutive documents (chosen, rejected);
- doc_targets.bin int64 [documents]: each document's counted targets alone (loss_mask[1:].sum()), so the packing
  index can drop target-less samples without reading the tokens.

manifest.json names what the tokens depend on (sources with size, mtime and a content hash, the tokenizer's hash,
the record type and every token-affecting data.* field) and nothing seq_len-dependent: one preparation serves every
seq_len and packing mode. Opening a corpus reads the manifest and maps the shards: O(1) in the corpus size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from trellis.errors import ConfigError

from .records import PreferenceSample, encode_batch
from .sources import iter_records, source_files

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARDS = {"tokens": "tokens.bin", "loss_mask": "loss_mask.bin", "doc_offsets": "doc_offsets.bin",
          "doc_targets": "doc_targets.bin"}
# data.* fields that do not change the tokens (seq_len-dependent, order or split choices, the source's location,
# which the manifest records as files): everything else in DataConfig goes into the manifest.
_LAYOUT_FIELDS = {"path", "seq_len", "shuffle", "packing", "truncation", "cache_dir", "eval_path", "eval_fraction"}
_FULL_HASH_BYTES = 4 << 20  # sources up to this size are hashed whole; larger ones by their first and last MiB
_CHUNK_BYTES = 1 << 20  # records per worker task: about this much text
_CHUNK_RECORDS = 2048
# How long ranks other than 0 wait for rank 0 to prepare a corpus (a 10 GB corpus takes minutes on many cores).
PREPARE_WAIT_S = float(os.environ.get("TRELLIS_PREPARE_WAIT_S", 4 * 3600))


def record_type(data_cfg) -> str:
    return getattr(data_cfg, "type", "text")


def token_fields(data_cfg) -> dict:
    """The data.* fields that change tokens or masks (the manifest's identity, besides sources and tokenizer)."""
    return {k: v for k, v in dataclasses.asdict(data_cfg).items() if k not in _LAYOUT_FIELDS}


def tokenizer_identity(tokenizer) -> dict:
    """Hash of the tokenizer's serialized state (tokenizer.json), its special tokens and chat template."""
    h = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    h.update(json.dumps([type(tokenizer).__name__, tokenizer.special_tokens_map, tokenizer.eos_token_id,
                         tokenizer.pad_token_id, getattr(tokenizer, "chat_template", None)],
                        sort_keys=True, default=str).encode())
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {"hash": h.hexdigest(), "vocab_size": len(tokenizer), "eos_id": tokenizer.eos_token_id, "pad_id": pad}


def _file_hash(f: Path, size: int) -> str:
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        if size <= _FULL_HASH_BYTES:
            h.update(fh.read())
        else:
            h.update(fh.read(1 << 20))
            fh.seek(size - (1 << 20))
            h.update(fh.read())
    return h.hexdigest()


def describe_sources(data_cfg, path: str | None = None) -> list[dict]:
    out = []
    for f in source_files(data_cfg, path):
        st = f.stat()
        out.append({"path": str(f.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                    "hash": _file_hash(f, st.st_size)})
    return out


def identity(data_cfg, tokenizer, path: str | None = None) -> dict:
    """What a manifest must say for a corpus to be reused for this config."""
    return {"format_version": FORMAT_VERSION, "record_type": record_type(data_cfg), "data": token_fields(data_cfg),
            "tokenizer": tokenizer_identity(tokenizer), "sources": describe_sources(data_cfg, path)}


def mismatch(manifest: dict, want: dict, *, check_sources: bool = True) -> str | None:
    """Why a manifest does not match `want` (None when it does), in words for the user."""
    if manifest.get("format_version") != want["format_version"]:
        return f"format version {manifest.get('format_version')} (this trellis writes {want['format_version']})"
    if manifest.get("record_type") != want["record_type"]:
        return f"record type {manifest.get('record_type')!r} (the config asks for {want['record_type']!r})"
    if manifest.get("tokenizer", {}).get("hash") != want["tokenizer"]["hash"]:
        return "another tokenizer (its tokenizer hash differs from model.tokenizer's)"
    if manifest.get("data") != want["data"]:
        diff = sorted(k for k in set(manifest.get("data", {})) | set(want["data"])
                      if manifest.get("data", {}).get(k) != want["data"].get(k))
        return "other data settings (" + ", ".join(f"data.{k}" for k in diff) + ")"
    if check_sources:
        old = {s["path"]: s for s in manifest.get("sources", [])}
        new = {s["path"]: s for s in want["sources"]}
        if set(old) != set(new):
            return "other source files (" + ", ".join(sorted(set(old) ^ set(new))[:3]) + ")"
        for p, s in new.items():
            o = old[p]
            big = s["size"] > _FULL_HASH_BYTES
            if o["size"] != s["size"] or o["hash"] != s["hash"] or (big and o["mtime_ns"] != s["mtime_ns"]):
                return f"source {p} changed since it was prepared"
    return None


class Corpus:
    """A prepared directory, memory-mapped: nothing is read until a row is materialised."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        mpath = self.dir / MANIFEST
        try:
            self.manifest = json.loads(mpath.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{mpath}: unreadable prepared-corpus manifest ({e}); prepare it again with "
                              "`trellis data prepare CONFIG --out DIR`") from None
        m = self.manifest
        dtypes = {"tokens": m.get("token_dtype", "uint32"), "loss_mask": "uint8", "doc_offsets": "int64",
                  "doc_targets": "int64"}
        for key, name in SHARDS.items():
            f = self.dir / name
            want = m.get("files", {}).get(name)
            have = f.stat().st_size if f.is_file() else None
            if want is None or have != want:
                raise ConfigError(f"{f}: {'missing' if have is None else f'{have} bytes'}, the manifest says {want} "
                                  "(a truncated or corrupt prepared corpus); delete the directory and prepare it again "
                                  "with `trellis data prepare CONFIG --out DIR`")
            arr = np.memmap(f, dtype=dtypes[key], mode="r") if want else np.zeros(0, dtype=dtypes[key])
            setattr(self, key, arr)
        self.num_docs = len(self.doc_offsets) - 1
        self.record_type = m["record_type"]

    @property
    def pad_id(self) -> int:
        return int(self.manifest["tokenizer"]["pad_id"] or 0)

    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.doc_offsets)

    @property
    def num_units(self) -> int:
        """Records: documents, or pairs for preference."""
        return self.num_docs // 2 if self.record_type == "preference" else self.num_docs


# ---- preparation ---------------------------------------------------------------------------------------------
_worker_state: dict = {}


def _init_worker(data_cfg, tokenizer) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process = one core, like the other workers
    _worker_state.update(cfg=data_cfg, tok=tokenizer)


def _encode_chunk(records: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One task: (tokens, loss mask, document lengths) of a chunk of records, flat arrays (cheap to send back)."""
    samples = encode_batch(_worker_state["cfg"], _worker_state["tok"], records)
    docs = []
    for s in samples:
        docs.extend((s.chosen, s.rejected) if isinstance(s, PreferenceSample) else (s,))
    if not docs:
        return np.zeros(0, np.int64), np.zeros(0, np.uint8), np.zeros(0, np.int64)
    return (np.concatenate([d.input_ids for d in docs]).astype(np.int64, copy=False),
            np.concatenate([d.loss_mask for d in docs]).astype(np.uint8, copy=False),
            np.asarray([len(d.input_ids) for d in docs], dtype=np.int64))


def _chunks(records: Iterator) -> Iterator[list]:
    chunk, size = [], 0
    for rec in records:
        chunk.append(rec)
        size += len(rec[0]) if isinstance(rec[0], str) else 256
        if size >= _CHUNK_BYTES or len(chunk) >= _CHUNK_RECORDS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _context():
    """fork where there is one: a worker then starts in milliseconds instead of re-importing torch and
    transformers (seconds each). The forked child runs only the tokenizer (its own thread pool is off,
    TOKENIZERS_PARALLELISM=false), never the parent's process-group or OpenMP threads."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def default_num_proc(sources: list[dict]) -> int:
    """One process for small corpora (starting workers costs more than it saves), else every core."""
    total = sum(s["size"] for s in sources)
    return 1 if total < 8 * _CHUNK_BYTES else max(1, os.cpu_count() or 1)


def prepare(data_cfg, tokenizer, out_dir: str | Path, num_proc: int = 0, path: str | None = None) -> Corpus:
    """Tokenize `path` (default data.path) into `out_dir` with `num_proc` processes (0 = automatic). Written into a
    temporary directory beside `out_dir` and renamed into place, so a reader sees a whole corpus or none."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir / MANIFEST).is_file() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"--out {out_dir}: exists and is not a prepared corpus (no {MANIFEST}); it is replaced "
                          "when preparing, so give a new or empty directory")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # before any fork: a used Rust thread pool does not survive it
    want = identity(data_cfg, tokenizer, path)
    num_proc = num_proc or default_num_proc(want["sources"])
    dtype = np.uint16 if want["tokenizer"]["vocab_size"] < 65536 else np.uint32
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    t0 = time.perf_counter()
    n_tokens = n_targets = 0
    lengths: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    try:
        records = iter_records(data_cfg, path)
        with open(tmp / SHARDS["tokens"], "wb") as ft, open(tmp / SHARDS["loss_mask"], "wb") as fm:
            if num_proc == 1:
                _init_worker(data_cfg, tokenizer)
                results = map(_encode_chunk, _chunks(records))
                pool = None
            else:
                pool = _context().Pool(num_proc, _init_worker, (data_cfg, tokenizer))
                results = pool.imap(_encode_chunk, _chunks(records))
            try:
                for ids, mask, lens in results:
                    ft.write(ids.astype(dtype).tobytes())
                    fm.write(mask.tobytes())
                    lengths.append(lens)
                    ends = np.cumsum(lens)
                    # per-document counted targets: loss_mask[1:] of each document
                    csum = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
                    starts = ends - lens
                    targets.append(csum[ends] - csum[np.minimum(starts + 1, ends)])
                    n_tokens += len(ids)
            finally:
                if pool is not None:
                    pool.terminate()
        lens = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        tgt = np.concatenate(targets) if targets else np.zeros(0, np.int64)
        n_targets = int(tgt.sum())
        np.concatenate([[0], np.cumsum(lens)]).astype(np.int64).tofile(tmp / SHARDS["doc_offsets"])
        tgt.astype(np.int64).tofile(tmp / SHARDS["doc_targets"])
        n_docs = len(lens)
        if n_docs == 0 or n_targets == 0:
            what = "records" if n_docs == 0 else "target tokens"
            raise ConfigError(f"data.path={path or data_cfg.path!r}: no {what} to train on (empty after filtering); "
                              "add data or check data.type and its fields")
        manifest = dict(want, token_dtype=np.dtype(dtype).name,
                        counts={"documents": n_docs, "records": n_docs // 2 if want["record_type"] == "preference"
                                else n_docs, "tokens": n_tokens, "targets": n_targets},
                        files={name: (tmp / name).stat().st_size for name in SHARDS.values()},
                        prepare={"num_proc": num_proc, "seconds": round(time.perf_counter() - t0, 3)})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _install(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Corpus(out_dir)


def _install(tmp: Path, out_dir: Path) -> None:
    """Rename `tmp` to `out_dir`, moving a previous (stale) corpus aside first. Readers that mapped the old shards
    keep reading them (unlinked files live while mapped); a concurrent preparer that won the race is kept."""
    if out_dir.exists():
        trash = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{time.monotonic_ns()}"
        try:
            os.rename(out_dir, trash)
        except FileNotFoundError:
            pass
        else:
            shutil.rmtree(trash, ignore_errors=True)
    try:
        os.rename(tmp, out_dir)
    except OSError:  # another process installed one in the meantime: theirs is the same corpus
        if not (out_dir / MANIFEST).is_file():
            raise


# ---- the corpus a run trains on ----------------------------------------------------------------------------
def default_cache_root() -> Path:
    """data.cache_dir = "": $TRELLIS_CACHE, else $XDG_CACHE_HOME/trellis/data, else ~/.cache/trellis/data."""
    if os.environ.get("TRELLIS_CACHE"):
        return Path(os.environ["TRELLIS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "trellis" / "data"


def cache_dir_for(data_cfg, want: dict, path: str) -> Path:
    """<cache root>/<source name>-<key>: the key hashes the source location, tokenizer, record type and token
    fields, so runs with another tokenizer or template never share (or thrash) one directory."""
    root = Path(data_cfg.cache_dir) if data_cfg.cache_dir else default_cache_root()
    src = path if path.startswith("builtin:") else str(Path(path).resolve())
    key = hashlib.sha256(json.dumps([src, want["record_type"], want["data"], want["tokenizer"]["hash"]],
                                    sort_keys=True, default=str).encode()).hexdigest()[:16]
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(src.replace(":", "_")).name)[:40]
    return root / f"{name}-{key}"


def is_prepared(path: str) -> bool:
    return Path(path).is_dir() and (Path(path) / MANIFEST).is_file()


def open_prepared(data_cfg, tokenizer, path: str, field: str = "data.path") -> Corpus:
    """A directory the user prepared: it must match the tokenizer, record type and token fields (its sources
    need not be present)."""
    corpus = Corpus(path)
    want = {"format_version": FORMAT_VERSION, "record_type": record_type(data_cfg), "data": token_fields(data_cfg),
            "tokenizer": tokenizer_identity(tokenizer), "sources": []}
    why = mismatch(corpus.manifest, want, check_sources=False)
    if why:
        raise ConfigError(f"{field}={path!r}: this prepared corpus was made with {why}; prepare it again for this "
                          "config with `trellis data prepare CONFIG --out DIR`, or use the config it was prepared with")
    return corpus


def load_corpus(data_cfg, tokenizer, path: str, *, rank: int = 0, num_proc: int = 0, field: str = "data.path",
                log=print) -> Corpus:
    """The corpus for `path`: a prepared directory as-is, else the cache (prepared by rank 0 when missing or
    stale; the other ranks wait for its manifest to appear on the shared file system)."""
    if is_prepared(path):
        return open_prepared(data_cfg, tokenizer, path, field)
    want = identity(data_cfg, tokenizer, path)
    target = cache_dir_for(data_cfg, want, path)
    if rank == 0:
        why = _cache_problem(target, want)
        if why is None:
            return Corpus(target)
        if why != "missing":
            log(f"data: the prepared cache {target} is stale ({why}); preparing it again")
        else:
            log(f"data: preparing {path} into {target} (once; later runs reuse it)")
        return prepare(data_cfg, tokenizer, target, num_proc, path)
    deadline = time.monotonic() + PREPARE_WAIT_S
    while _cache_problem(target, want) is not None:
        if time.monotonic() > deadline:
            raise ConfigError(f"{field}: rank {rank} waited {PREPARE_WAIT_S:.0f} s for rank 0 to prepare {target}; "
                              "put data.cache_dir on a file system every rank sees, or run `trellis data prepare "
                              "CONFIG --out DIR` first and set data.path=DIR")
        time.sleep(0.2)
    return Corpus(target)


def _cache_problem(target: Path, want: dict) -> str | None:
    """None when `target` holds a whole corpus matching `want`, else why not ("missing" when absent)."""
    if not (target / MANIFEST).is_file():
        return "missing"
    try:
        manifest = json.loads((target / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return "unreadable manifest"
    why = mismatch(manifest, want)
    if why is None:
        for name, size in manifest.get("files", {}).items():
            f = target / name
            if not f.is_file() or f.stat().st_size != size:
                return f"{name} is truncated"
    return why
