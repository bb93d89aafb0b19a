"""Where records come from (PROVISIONAL: data.type="text" only, today's .txt / single-field JSONL reading; the
full sources module with parquet, `datasets` directories and globs replaces this file)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from trellis.configs import PRESET_DIR
from trellis.errors import ConfigError


def builtin_corpus_path() -> Path:
    return PRESET_DIR / "data" / "corpus.txt"


def source_files(data_cfg, path: str | None = None) -> list[Path]:
    """The files a data path names, in a fixed order (what a prepared corpus's manifest lists)."""
    path = data_cfg.path if path is None else path
    if path == "builtin:demo":
        return [builtin_corpus_path()]
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".jsonl", ".json") and f.is_file())
        if files:
            return files
        raise ConfigError(f"data.path={path!r}: directory holds no .txt or .jsonl files")
    raise ConfigError(f"data.path={path!r}: no such file or directory (use 'builtin:demo' for the shipped corpus)")


def iter_records(data_cfg, path: str | None = None) -> Iterator[tuple[dict | str, str]]:
    """(record, location) pairs: a whole .txt file is one text record, a JSONL line one record."""
    for f in source_files(data_cfg, path):
        kind = data_cfg.format if data_cfg.format != "auto" else ("jsonl" if f.suffix in (".jsonl", ".json") else "text")
        if kind == "text":
            yield f.read_text(encoding="utf-8", errors="replace"), str(f)
            continue
        for lineno, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise ConfigError(f"data.path: {f}:{lineno} is not valid JSON; use data.format='text' for plain text") from None
            if not isinstance(rec, dict) or data_cfg.text_field not in rec:
                raise ConfigError(f"data.text_field={data_cfg.text_field!r}: missing in {f}:{lineno}; set data.text_field")
            yield rec, f"{f}:{lineno}"
