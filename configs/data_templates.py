"""The prompt and chat templates trellis ships, by name. Here (standard library only) so that config validation
knows the names; engine/data/records.py renders them.

A prompt template (`data.prompt_template`) is a Python `str.format` string over a record's fields. A named
template may have variants chosen by the record: "alpaca" uses its no-input form when `input` is missing or
empty, as the Stanford Alpaca training code does.
"""

from __future__ import annotations

from pathlib import Path

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
# name -> (template, template when the record's `input` is missing or empty)
PROMPT_TEMPLATES: dict[str, tuple[str, str]] = {"alpaca": (ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT)}

CHAT_TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"


def shipped_chat_templates() -> list[str]:
    """Names accepted as `data.chat_template` besides a path: the .jinja files under configs/templates/."""
    return sorted(p.stem for p in CHAT_TEMPLATE_DIR.glob("*.jinja"))
