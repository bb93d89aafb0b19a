"""Records → tokenized samples with a loss mask, by data.type (docs/DATA.md "Record types").

A sample's loss_mask is 1 on the tokens the model is trained to produce: every token of a text document, the
response (+ EOS) of a prompt/response record, the assistant turns of a chat. The prompt and the response are
tokenized separately, so the mask boundary is exact. A chat is rendered once with its template and tokenized
once with character offsets; each assistant turn's characters are located by rendering the conversation up to
that turn (with and without the turn), which needs no marker in the template and catches templates that rewrite
earlier turns. Encoding is batched: one tokenizer call per list of texts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trellis.configs.data_templates import CHAT_TEMPLATE_DIR, PROMPT_TEMPLATES, shipped_chat_templates
from trellis.errors import ConfigError

__all__ = ["ROLES", "PreferenceSample", "Sample", "chat_template", "encode_batch"]

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Sample:
    input_ids: np.ndarray  # int32 [n]: prompt + response tokens (EOS appended where the record type ends with one)
    loss_mask: np.ndarray  # uint8 [n]: 1 where the token is a training target


@dataclass
class PreferenceSample:
    chosen: Sample  # prompt + chosen response, mask on the response
    rejected: Sample  # prompt + rejected response


def encode_batch(data_cfg, tokenizer, records: Sequence[tuple[dict | str, str]]) -> list[Sample | PreferenceSample]:
    """Tokenize (record, location) pairs by data.type; a bad record is a ConfigError naming its location."""
    if not records:
        return []
    if data_cfg.type == "text":
        return _encode_text(data_cfg, tokenizer, records)
    if data_cfg.type == "prompt_response":
        prompts = [_prompt(data_cfg, _fields(rec, loc), loc) for rec, loc in records]
        responses = [_string(rec, data_cfg.response_field, "response_field", loc) for rec, loc in records]
        return _encode_pairs(tokenizer, prompts, responses, data_cfg.train_on_prompt)
    if data_cfg.type == "chat":
        field = data_cfg.messages_field
        convs = [(_conversation(_field(_fields(rec, loc), field, "messages_field", loc), loc, field), 0, loc)
                 for rec, loc in records]
        return _encode_chats(tokenizer, chat_template(data_cfg, tokenizer), convs, data_cfg.train_on_prompt)
    if data_cfg.type == "preference":
        return _encode_preference(data_cfg, tokenizer, records)
    raise ConfigError(f"data.type={data_cfg.type!r}: use 'text', 'prompt_response', 'chat' or 'preference'")


def chat_template(data_cfg, tokenizer) -> str:
    """data.chat_template (a shipped name or a Jinja file), else the tokenizer's own; neither is an error."""
    name = data_cfg.chat_template
    if not name:
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.chat_template
        raise ConfigError("data.chat_template: the tokenizer has no chat_template to render chats with; set "
                          "data.chat_template to a Jinja file or a shipped template "
                          f"({', '.join(shipped_chat_templates())})")
    path = CHAT_TEMPLATE_DIR / f"{name}.jinja" if name in shipped_chat_templates() else Path(name)
    if not path.is_file():
        raise ConfigError(f"data.chat_template={name!r}: no such file and not a shipped template "
                          f"({', '.join(shipped_chat_templates())})")
    return path.read_text(encoding="utf-8")


# --- record fields -------------------------------------------------------------------------------------------------

def _fields(rec, loc: str) -> dict:
    if not isinstance(rec, dict):
        raise ConfigError(f"data.type: {loc} is plain text, but this record type reads fields; give JSON Lines, "
                          "parquet or a datasets directory, or set data.type='text'")
    return rec


def _field(rec: dict, name: str, key: str, loc: str):
    if name not in rec:
        raise ConfigError(f"data.{key}={name!r}: {loc} has no field {name!r} (its fields: {sorted(rec)}); set "
                          f"data.{key} to the field that holds it")
    return rec[name]


def _string(rec, name: str, key: str, loc: str) -> str:
    value = _field(_fields(rec, loc), name, key, loc)
    if not isinstance(value, str):
        raise ConfigError(f"data.{key}={name!r}: {loc} field {name!r} is a {type(value).__name__}, not a string")
    return value


def _prompt(data_cfg, rec: dict, loc: str) -> str:
    """The prompt text: data.prompt_template filled from the record's fields, else the field data.prompt_field."""
    template = data_cfg.prompt_template
    if not template:
        return _string(rec, data_cfg.prompt_field, "prompt_field", loc)
    if template in PROMPT_TEMPLATES:
        with_input, no_input = PROMPT_TEMPLATES[template]
        template = with_input if rec.get("input") else no_input
    try:
        return template.format_map(rec)
    except KeyError as err:
        raise ConfigError(f"data.prompt_template: {loc} has no field {err.args[0]!r} the template names (its "
                          f"fields: {sorted(rec)}); change the template or the data") from None


def _messages(value, loc: str, field: str) -> list[dict]:
    """An OpenAI-style conversation: a non-empty list of {role, content: str} with an assistant turn."""
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{loc}: field {field!r} must be a non-empty list of messages "
                          '[{"role": "user", "content": "..."}, ...], got ' + (repr(value)[:60]))
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ConfigError(f"{loc}: {field}[{i}] must be an object with 'role' and 'content', got {repr(m)[:60]}")
        if m["role"] not in ROLES:
            raise ConfigError(f"{loc}: {field}[{i}] has role {m['role']!r}; use one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise ConfigError(f"{loc}: {field}[{i}] content is a {type(m['content']).__name__}, not a string; "
                              "give the message text as a string")
    return value


def _conversation(value, loc: str, field: str) -> list[dict]:
    """_messages with at least one assistant turn (what is trained on)."""
    messages = _messages(value, loc, field)
    if not any(m["role"] == "assistant" for m in messages):
        raise ConfigError(f"{loc}: {field} has no assistant message to train on; add the assistant's reply "
                          "(or drop the record)")
    return messages


# --- encoders ------------------------------------------------------------------------------------------------------

def _eos(tokenizer) -> list[int]:
    return [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]


def _token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Batch encoding. A fast tokenizer's Rust backend directly: the same ids as `tokenizer(texts,
    add_special_tokens=False)` without building a BatchEncoding (that wrapper cost ~40 % of preparation)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]


def _encode_text(data_cfg, tokenizer, records) -> list[Sample]:
    texts = [rec if isinstance(rec, str) else str(_field(rec, data_cfg.text_field, "text_field", loc))
             for rec, loc in records]
    eos = _eos(tokenizer)
    out = []
    for ids in _token_ids(tokenizer, texts):
        arr = np.asarray(ids + eos, dtype=np.int32)
        out.append(Sample(arr, np.ones(len(arr), dtype=np.uint8)))
    return out


def _encode_pairs(tokenizer, prompts: list[str], responses: list[str], train_on_prompt: bool,
                  prompt_ids: list[list[int]] | None = None) -> list[Sample]:
    """prompt + response + EOS, the mask on response + EOS; `prompt_ids` reuses an encoding of `prompts`."""
    prompt_ids = _token_ids(tokenizer, prompts) if prompt_ids is None else prompt_ids
    eos = _eos(tokenizer)
    out = []
    for p, r in zip(prompt_ids, _token_ids(tokenizer, responses)):
        ids = np.asarray(p + r + eos, dtype=np.int32)
        mask = np.ones(len(ids), dtype=np.uint8)
        if not train_on_prompt:
            mask[: len(p)] = 0
        out.append(Sample(ids, mask))
    return out


def _render(tokenizer, template: str, messages: list[dict], loc: str, generation_prompt: bool = False) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except TemplateError as err:
        raise ConfigError(f"data.chat_template: rendering {loc} failed: {err}; fix the record or the "
                          "template") from None


def _assistant_spans(tokenizer, template: str, messages: list[dict], first: int, full: str, loc: str):
    """Character spans of full's assistant turns from message `first` on: [render(messages[:i] + generation
    prompt), render(messages[:i+1])) for each assistant message i (content + the template's end of turn)."""
    spans = []
    for i in range(first, len(messages)):
        if messages[i]["role"] != "assistant":
            continue
        start = _render(tokenizer, template, messages[:i], loc, generation_prompt=True)
        end = _render(tokenizer, template, messages[: i + 1], loc)
        if not (full.startswith(end) and end.startswith(start)):
            raise ConfigError(f"data.chat_template: at {loc} the template does not render message {i} as a "
                              "continuation of the messages before it, so its tokens cannot be located; use a "
                              "template that appends turns (e.g. data.chat_template='chatml') or "
                              "data.train_on_prompt=true")
        spans.append((len(start), len(end)))
    return spans


def _encode_chats(tokenizer, template: str, convs: list[tuple[list[dict], int, str]],
                  train_on_prompt: bool) -> list[Sample]:
    """(messages, index of the first message that may count, location) → samples masked on the assistant turns
    from that index on (all tokens with train_on_prompt)."""
    texts, spans = [], []
    for messages, first, loc in convs:
        full = _render(tokenizer, template, messages, loc)
        texts.append(full)
        spans.append([] if train_on_prompt else _assistant_spans(tokenizer, template, messages, first, full, loc))
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for ids, offsets, sp in zip(enc["input_ids"], enc["offset_mapping"], spans):
        ids = np.asarray(ids, dtype=np.int32)
        if train_on_prompt:
            mask = np.ones(len(ids), dtype=np.uint8)
        else:
            starts = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)[:, 0]
            mask = np.zeros(len(ids), dtype=bool)
            for s, e in sp:
                mask |= (starts >= s) & (starts < e)
            mask = mask.astype(np.uint8)
        out.append(Sample(ids, mask))
    return out


def _encode_preference(data_cfg, tokenizer, records) -> list[PreferenceSample]:
    """String form (prompt, chosen, rejected texts) or TRL's conversational form (chosen / rejected message
    lists, the prompt a leading message list, a string = one user message, or absent); both in one batch."""
    strings, chats = [], []  # (position in the batch, ...)
    for pos, (rec, loc) in enumerate(records):
        rec = _fields(rec, loc)
        chosen = _field(rec, data_cfg.chosen_field, "chosen_field", loc)
        rejected = _field(rec, data_cfg.rejected_field, "rejected_field", loc)
        if isinstance(chosen, list) and isinstance(rejected, list):
            prompt = rec.get(data_cfg.prompt_field, [])
            prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            prompt = _messages(prompt, loc, data_cfg.prompt_field) if prompt else []
            chats.append((pos, prompt, _conversation(chosen, loc, data_cfg.chosen_field),
                          _conversation(rejected, loc, data_cfg.rejected_field), loc))
        else:
            strings.append((pos, _prompt(data_cfg, rec, loc), _string(rec, data_cfg.chosen_field, "chosen_field", loc),
                            _string(rec, data_cfg.rejected_field, "rejected_field", loc)))
    out: list = [None] * len(records)
    if strings:
        prompts = [p for _, p, _, _ in strings]
        prompt_ids = _token_ids(tokenizer, prompts)
        chosen = _encode_pairs(tokenizer, prompts, [c for _, _, c, _ in strings], data_cfg.train_on_prompt, prompt_ids)
        rejected = _encode_pairs(tokenizer, prompts, [r for *_, r in strings], data_cfg.train_on_prompt, prompt_ids)
        for (pos, *_), c, r in zip(strings, chosen, rejected):
            out[pos] = PreferenceSample(c, r)
    if chats:
        template = chat_template(data_cfg, tokenizer)
        chosen = _encode_chats(tokenizer, template, [(p + c, len(p), loc) for _, p, c, _, loc in chats],
                               data_cfg.train_on_prompt)
        rejected = _encode_chats(tokenizer, template, [(p + r, len(p), loc) for _, p, _, r, loc in chats],
                                 data_cfg.train_on_prompt)
        for (pos, *_), c, r in zip(chats, chosen, rejected):
            out[pos] = PreferenceSample(c, r)
    return out
