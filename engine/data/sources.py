"""Where records come from: data.path (a file, a directory, a glob, a `datasets.save_to_disk` directory or
"builtin:demo") → the source files, and each file → (record, location) pairs.

A location names the record exactly, for errors: "file:line" for JSON Lines, "file#row N" (0-based) for JSON
arrays, parquet, arrow and `datasets` directories, "file" for a whole text file. Storage formats are read with
the libraries that own them (json, pyarrow, `datasets`); nothing is ever read as bytes-as-text: an extension
that is not a supported format is an error.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from pathlib import Path

from trellis.configs import PRESET_DIR
from trellis.errors import ConfigError

# extension -> storage format; ".json" holds JSON Lines or one JSON array of records (sniffed)
EXTENSIONS = {".txt": "text", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".arrow": "arrow"}
# the files `datasets` writes: Dataset.save_to_disk (both) and DatasetDict.save_to_disk
_DATASET_MARKERS, _DATASET_DICT_MARKER = ("state.json", "dataset_info.json"), "dataset_dict.json"
_ROWS_PER_BATCH = 1024

Record = dict | str


def builtin_corpus_path() -> Path:
    return PRESET_DIR / "data" / "corpus.txt"


def _supported() -> str:
    return ", ".join(EXTENSIONS)


def is_datasets_dir(p: Path) -> bool:
    return (p / _DATASET_DICT_MARKER).is_file() or all((p / m).is_file() for m in _DATASET_MARKERS)


def _sources(data_cfg, path: str) -> list[Path]:
    """The units read one by one: files, and `datasets` directories (read whole, by `datasets`)."""
    if path == "builtin:demo":
        return [builtin_corpus_path()]
    p = Path(path)
    if is_datasets_dir(p):
        return [p]
    if p.is_file():
        units = [p]
    elif p.is_dir():
        units = _walk(p)
        if not units:
            raise ConfigError(f"data.path={path!r}: the directory holds no data files; supported: {_supported()} "
                              "or a datasets.save_to_disk directory")
    elif glob.has_magic(path):
        units = [Path(m) for m in sorted(glob.glob(path, recursive=True))]
        units = [u for u in units if u.is_file() or is_datasets_dir(u)]
        if not units:
            raise ConfigError(f"data.path={path!r}: the glob matches no files")
    else:
        raise ConfigError(f"data.path={path!r}: no such file or directory (use 'builtin:demo' for the shipped corpus)")
    if data_cfg.format == "auto":
        for u in units:
            if u.is_file() and u.suffix not in EXTENSIONS:
                raise ConfigError(f"data.path: {u} has an unsupported extension {u.suffix!r} (supported: "
                                  f"{_supported()}); convert or remove it, or set data.format to the format it holds")
    return units


def _walk(root: Path) -> list[Path]:
    """Every non-hidden file under `root` (sorted); a `datasets` directory below it is one unit."""
    units = []
    for d, subdirs, files in os.walk(root):
        subdirs[:] = sorted(s for s in subdirs if not s.startswith("."))
        for s in list(subdirs):
            if is_datasets_dir(Path(d) / s):
                units.append(Path(d) / s)
                subdirs.remove(s)
        units.extend(Path(d) / f for f in files if not f.startswith("."))
    return sorted(units)


def source_files(data_cfg, path: str | None = None) -> list[Path]:
    """Every file the records are read from (a `datasets` directory contributes all its files): what a prepared
    corpus's manifest lists with sizes and mtimes."""
    out = []
    for u in _sources(data_cfg, data_cfg.path if path is None else path):
        out.extend(sorted(f for f in u.rglob("*") if f.is_file()) if u.is_dir() else [u])
    return out


def iter_records(data_cfg, path: str | None = None) -> Iterator[tuple[Record, str]]:
    """(record, location) for every record of data.path (or `path`), in a fixed order: files sorted by path,
    records in file order. A text file is one record (str); every other format yields dicts."""
    for u in _sources(data_cfg, data_cfg.path if path is None else path):
        if u.is_dir():
            yield from _datasets_dir(u)
            continue
        fmt = data_cfg.format if data_cfg.format != "auto" else EXTENSIONS[u.suffix]
        yield from _READERS[fmt](u)


def _decode(raw: bytes, f: Path, line: int | None = None) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        if line is None:
            line, offset = raw.count(b"\n", 0, err.start) + 1, f"byte {err.start}"
        else:
            offset = f"byte {err.start} of the line"
        raise ConfigError(f"data.path: {f}:{line} ({offset}) is not valid UTF-8; re-encode the file as UTF-8 "
                          "(e.g. iconv -f latin1 -t utf-8 IN > OUT)") from None


def _text(f: Path) -> Iterator[tuple[Record, str]]:
    yield _decode(f.read_bytes(), f), str(f)


def _json(f: Path) -> Iterator[tuple[Record, str]]:
    """JSON Lines, or (a .json file) one JSON array of records: its first non-blank character is '['."""
    if f.suffix == ".json" and _first_byte(f) == b"[":
        try:
            records = json.loads(_decode(f.read_bytes(), f))
        except json.JSONDecodeError as err:
            raise ConfigError(f"data.path: {f}:{err.lineno} is not valid JSON ({err.msg}); fix the file, or use "
                              "data.format='text' for plain text") from None
        for i, rec in enumerate(records):
            yield _record(rec, f"{f}#row {i}"), f"{f}#row {i}"
        return
    with open(f, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            line = _decode(raw, f, lineno)
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"data.path: {f}:{lineno} is not valid JSON ({err.msg}); fix the line, or use "
                                  "data.format='text' for plain text") from None
            yield _record(rec, f"{f}:{lineno}"), f"{f}:{lineno}"


def _first_byte(f: Path) -> bytes:
    with open(f, "rb") as fh:
        while chunk := fh.read(1 << 16):
            if head := chunk.lstrip():
                return head[:1]
    return b""


def _record(rec, loc: str) -> dict:
    if not isinstance(rec, dict):
        raise ConfigError(f"data.path: {loc} is a JSON {type(rec).__name__}, not an object with fields; write one "
                          'object per record, e.g. {"text": "..."}')
    return rec


def _rows(table_batches, name: str) -> Iterator[tuple[Record, str]]:
    i = 0
    for batch in table_batches:
        for row in batch.to_pylist():
            yield row, f"{name}#row {i}"
            i += 1


def _parquet(f: Path) -> Iterator[tuple[Record, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
    except pa.ArrowInvalid as err:
        raise ConfigError(f"data.path: {f} is not a parquet file ({err}); fix it or set data.format") from None
    yield from _rows(pf.iter_batches(batch_size=_ROWS_PER_BATCH), str(f))


def _arrow(f: Path) -> Iterator[tuple[Record, str]]:
    """An Arrow IPC stream (what `datasets` writes) or an Arrow IPC file, memory-mapped."""
    import pyarrow as pa

    with pa.memory_map(str(f)) as source:
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            source.seek(0)
            try:
                file_reader = pa.ipc.open_file(source)
            except pa.ArrowInvalid as err:
                raise ConfigError(f"data.path: {f} is not an Arrow stream or file ({err}); fix it or set "
                                  "data.format") from None
            reader = (file_reader.get_batch(i) for i in range(file_reader.num_record_batches))
        yield from _rows(reader, str(f))


def _datasets_dir(d: Path) -> Iterator[tuple[Record, str]]:
    """A `save_to_disk` directory through `datasets.load_from_disk`; a DatasetDict gives its "train" split."""
    import datasets

    ds = datasets.load_from_disk(str(d))
    name = str(d)
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ConfigError(f"data.path={name!r} is a DatasetDict with splits {sorted(ds)} and no 'train'; point "
                              f"data.path at one split's directory, e.g. {d / sorted(ds)[0]}")
        ds, name = ds["train"], f"{d}[train]"
    i = 0
    for batch in ds.iter(batch_size=_ROWS_PER_BATCH):
        for values in zip(*batch.values()):
            yield dict(zip(batch, values)), f"{name}#row {i}"
            i += 1

_READERS = {"text": _text, "jsonl": _json, "parquet": _parquet, "arrow": _arrow}
