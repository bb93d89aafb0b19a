"""Tokenizers: the model directory's own, or a byte-level BPE trained offline on local text."""

from __future__ import annotations

import sys
from pathlib import Path

from trellis.configs import PRESET_DIR
from trellis.errors import ConfigError

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2 (the shipped model configs rely on these)


def shipped_tokenizer_path() -> Path:
    return PRESET_DIR / "data" / "tokenizer.json"


def train_bpe_tokenizer(text_files: list[str], out_path: str, vocab_size: int = 512) -> None:
    """Byte-level BPE trained on local files (~1.5 s for a few MB); deterministic for the same input."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train(text_files, trainer)
    tok.save(out_path)


def load_tokenizer(path: str):
    """A `PreTrainedTokenizerFast` from a tokenizer.json file or a directory with tokenizer files."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    p = Path(path)
    if p.is_file() and p.suffix == ".json":
        tok = PreTrainedTokenizerFast(tokenizer_file=str(p), pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    elif p.is_dir() and any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        tok = AutoTokenizer.from_pretrained(str(p))
    else:
        raise ConfigError(f"model.tokenizer: no tokenizer at {path!r}; give a tokenizer.json file or a "
                          "directory with tokenizer files")
    return tok


def find_tokenizer(model_dir: Path | None, configured: str) -> str:
    """Configured path, else the model directory's tokenizer, else the shipped demo tokenizer."""
    if configured:
        return configured
    if model_dir is not None and any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return str(model_dir)
    return str(shipped_tokenizer_path())


if __name__ == "__main__":  # python -m trellis.engine.tokenizer CORPUS OUT [VOCAB]
    train_bpe_tokenizer([sys.argv[1]], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 512)
