"""Fine-tuning records (engine/data/sources.py, records.py): every record type's loss mask covers exactly the
response / assistant tokens of a record tokenized by hand here, piece by piece; every source format yields the
records with their exact locations; every bad input is one ConfigError naming the place and the fix."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from trellis.cli import main
from trellis.configs.schema import DataConfig
from trellis.engine.data.records import PreferenceSample, encode_batch
from trellis.engine.data.sources import iter_records, source_files
from trellis.engine.tokenizer import load_tokenizer, shipped_tokenizer_path
from trellis.errors import ConfigError

# A Qwen2-style ChatML template as a model ships it: a default system turn when the chat has none, the
# generation prompt = the assistant header.
QWEN_STYLE_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def tok():
    """The repo's tiny byte-level BPE (no chat template)."""
    return load_tokenizer(str(shipped_tokenizer_path()))


@pytest.fixture(scope="module")
def chat_tok():
    """The tiny tokenizer as a chat model has it: ChatML markers as special tokens and its own chat_template."""
    t = load_tokenizer(str(shipped_tokenizer_path()))
    t.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    t.chat_template = QWEN_STYLE_TEMPLATE
    return t


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _by_hand(tok, pieces: list[tuple[str, bool]], eos: bool = False) -> tuple[list[int], list[int]]:
    """(ids, mask) of a record tokenized piece by piece: (text, counted) pairs, then EOS (counted)."""
    ids, mask = [], []
    for text, counted in pieces:
        t = _ids(tok, text)
        ids += t
        mask += [int(counted)] * len(t)
    if eos:
        ids.append(tok.eos_token_id)
        mask.append(1)
    return ids, mask


def _check(sample, ids, mask):
    assert sample.input_ids.dtype == np.int32 and sample.loss_mask.dtype == np.uint8
    assert sample.input_ids.tolist() == ids
    assert sample.loss_mask.tolist() == mask
    assert int(sample.loss_mask.sum()) == sum(mask)  # the counted tokens, exactly


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# --- record types ----------------------------------------------------------------------------------------------

def test_text_records_reproduce_todays_stream(tok, tmp_path):
    (tmp_path / "a.txt").write_text("The quick brown fox.\nJumps over.")
    _jsonl(tmp_path / "b.jsonl", [{"text": "hello world"}, {"text": "second doc", "id": 3}])
    cfg = DataConfig(path=str(tmp_path))
    samples = encode_batch(cfg, tok, list(iter_records(cfg)))
    # the stream trellis read before record types: every document's tokens + EOS, files in sorted order
    docs = ["The quick brown fox.\nJumps over.", "hello world", "second doc"]
    old = [t for d in docs for t in tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    assert np.concatenate([s.input_ids for s in samples]).tolist() == old
    _check(samples[1], *_by_hand(tok, [("hello world", True)], eos=True))
    assert all(s.loss_mask.all() for s in samples)
    demo = list(iter_records(DataConfig()))
    assert len(demo) == 1 and isinstance(demo[0][0], str) and demo[0][1].endswith("corpus.txt")


ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                     "Add the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\nAdd the numbers.\n\n### Response:\n")


@pytest.mark.parametrize("overrides,record,prompt,response", [
    ({}, {"prompt": "Q: 2+3?", "response": " A: 5"}, "Q: 2+3?", " A: 5"),
    ({"prompt_template": "alpaca", "response_field": "output"},
     {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}, ALPACA_WITH_INPUT, "5"),
    ({"prompt_template": "alpaca", "response_field": "output"},
     {"instruction": "Add the numbers.", "input": "", "output": "5"}, ALPACA_NO_INPUT, "5"),
    ({"response_field": "chosen"},  # DeepSpeed-Chat's SFT records
     {"prompt": "Human: hi there Assistant:", "chosen": " Hello!", "rejected": " Go away."},
     "Human: hi there Assistant:", " Hello!"),
    ({"prompt_template": "Q: {question}\nA:", "response_field": "answer"},
     {"question": "why?", "answer": " because"}, "Q: why?\nA:", " because"),
], ids=["fields", "alpaca", "alpaca-no-input", "deepspeed-chat", "own-template"])
def test_prompt_response_counts_exactly_the_response(tok, overrides, record, prompt, response):
    cfg = DataConfig(type="prompt_response", **overrides)
    (s,) = encode_batch(cfg, tok, [(record, "r.jsonl:1")])
    _check(s, *_by_hand(tok, [(prompt, False), (response, True)], eos=True))
    (s,) = encode_batch(replace(cfg, train_on_prompt=True), tok, [(record, "r.jsonl:1")])
    assert s.loss_mask.all() and len(s.loss_mask) == len(_ids(tok, prompt)) + len(_ids(tok, response)) + 1


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "Hi! How can I help?"}, {"role": "user", "content": "Say bye"},
        {"role": "assistant", "content": "Goodbye."}]


def test_chat_counts_exactly_the_assistant_turns(tok, chat_tok):
    """With the tokenizer's own template (special-token markers) and with the shipped chatml on the tiny
    tokenizer (markers as plain text), a default system turn the template injects included."""
    no_system = CHAT[1:]
    pieces = [("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHello there<|im_end|>\n"
               "<|im_start|>assistant\n", False), ("Hi! How can I help?<|im_end|>\n", True),
              ("<|im_start|>user\nSay bye<|im_end|>\n<|im_start|>assistant\n", False), ("Goodbye.<|im_end|>\n", True)]
    (s,) = encode_batch(DataConfig(type="chat"), chat_tok, [({"messages": no_system}, "c.jsonl:1")])
    _check(s, *_by_hand(chat_tok, pieces))
    assert chat_tok.decode(s.input_ids[s.loss_mask == 1]) == "Hi! How can I help?<|im_end|>\nGoodbye.<|im_end|>\n"

    pieces[0] = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello there<|im_end|>\n"
                 "<|im_start|>assistant\n", False)
    cfg = DataConfig(type="chat", chat_template="chatml", messages_field="conversation")
    (s,) = encode_batch(cfg, tok, [({"conversation": CHAT}, "c.jsonl:1")])
    _check(s, *_by_hand(tok, pieces))
    (s,) = encode_batch(replace(cfg, train_on_prompt=True), tok, [({"conversation": CHAT}, "c.jsonl:1")])
    assert s.loss_mask.all() and len(s.loss_mask) == len(_by_hand(tok, pieces)[0])


def test_chat_template_from_a_file(tok, tmp_path):
    (tmp_path / "t.jinja").write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                                      "{% if add_generation_prompt %}[assistant] {% endif %}")
    cfg = DataConfig(type="chat", chat_template=str(tmp_path / "t.jinja"))
    (s,) = encode_batch(cfg, tok, [({"messages": CHAT[1:3]}, "c.jsonl:1")])
    _check(s, *_by_hand(tok, [("[user] Hello there\n[assistant] ", False), ("Hi! How can I help?\n", True)]))


def test_preference_string_form(tok):
    cfg = DataConfig(type="preference")
    rec = {"prompt": "Human: hi Assistant:", "chosen": " Hello!", "rejected": " Go away."}
    (p,) = encode_batch(cfg, tok, [(rec, "p.jsonl:1")])
    assert isinstance(p, PreferenceSample)
    _check(p.chosen, *_by_hand(tok, [("Human: hi Assistant:", False), (" Hello!", True)], eos=True))
    _check(p.rejected, *_by_hand(tok, [("Human: hi Assistant:", False), (" Go away.", True)], eos=True))


def test_preference_conversational_form(chat_tok):
    """TRL's conversational preference records: an explicit prompt list, and an implicit one (no prompt field;
    the user turn is the head of chosen/rejected), in one batch."""
    head = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHello there<|im_end|>\n"
            "<|im_start|>assistant\n")
    user = [{"role": "user", "content": "Hello there"}]
    good, bad = [{"role": "assistant", "content": "Hi!"}], [{"role": "assistant", "content": "Go away."}]
    cfg = DataConfig(type="preference")
    batch = [({"prompt": user, "chosen": good, "rejected": bad}, "p.jsonl:1"),
             ({"chosen": user + good, "rejected": user + bad}, "p.jsonl:2"),
             ({"prompt": "Hello there", "chosen": " Hi!", "rejected": " No."}, "p.jsonl:3")]
    earlier = user + [{"role": "assistant", "content": "Earlier."}, {"role": "user", "content": "Again"}]
    batch.append(({"prompt": earlier, "chosen": good, "rejected": bad}, "p.jsonl:4"))
    explicit, implicit, text, multi = encode_batch(cfg, chat_tok, batch)
    for p in (explicit, implicit):
        _check(p.chosen, *_by_hand(chat_tok, [(head, False), ("Hi!<|im_end|>\n", True)]))
        _check(p.rejected, *_by_hand(chat_tok, [(head, False), ("Go away.<|im_end|>\n", True)]))
    _check(text.chosen, *_by_hand(chat_tok, [("Hello there", False), (" Hi!", True)], eos=True))
    # an assistant turn inside the prompt is context, not trained on
    head += "Earlier.<|im_end|>\n<|im_start|>user\nAgain<|im_end|>\n<|im_start|>assistant\n"
    _check(multi.chosen, *_by_hand(chat_tok, [(head, False), ("Hi!<|im_end|>\n", True)]))


# --- sources ---------------------------------------------------------------------------------------------------

ROWS = [{"prompt": "a b", "response": " c"}, {"prompt": "d", "response": " e f"}, {"prompt": "g", "response": " h"}]


def test_jsonl_locations_and_json_array(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")
    (tmp_path / "b.json").write_text("  \n" + json.dumps(ROWS))
    got = list(iter_records(DataConfig(path=str(tmp_path))))
    assert [loc for _, loc in got] == [f"{tmp_path}/a.jsonl:1", f"{tmp_path}/a.jsonl:3",
                                       *(f"{tmp_path}/b.json#row {i}" for i in range(3))]
    assert [r for r, _ in got] == ROWS[:2] + ROWS


def test_parquet_arrow_glob_and_forced_format(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(ROWS)
    pq.write_table(table, tmp_path / "x.parquet", row_group_size=2)
    with pa.OSFile(str(tmp_path / "y.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)  # the Arrow IPC file format
    with pa.OSFile(str(tmp_path / "w.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table, max_chunksize=2)  # the IPC stream format `datasets` writes, two batches
    (tmp_path / "z.ndjson").write_text(json.dumps(ROWS[2]) + "\n")
    got = list(iter_records(DataConfig(path=str(tmp_path / "*.parquet"))))
    assert got == [(r, f"{tmp_path}/x.parquet#row {i}") for i, r in enumerate(ROWS)]
    for name in ("y.arrow", "w.arrow"):
        got = list(iter_records(DataConfig(path=str(tmp_path / name))))
        assert got == [(r, f"{tmp_path}/{name}#row {i}") for i, r in enumerate(ROWS)]
    assert list(iter_records(DataConfig(path=str(tmp_path / "z.ndjson"), format="jsonl"))) == [
        (ROWS[2], f"{tmp_path}/z.ndjson:1")]
    assert source_files(DataConfig(path=str(tmp_path / "*.parquet"))) == [tmp_path / "x.parquet"]


def test_datasets_save_to_disk_dirs(tok, tmp_path):
    import datasets

    msgs = [{"messages": CHAT[1:3]}, {"messages": CHAT[1:]}]
    datasets.Dataset.from_list(msgs).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])}
                         ).save_to_disk(str(tmp_path / "dd"))
    cfg = DataConfig(path=str(tmp_path / "ds"), type="chat", chat_template="chatml")
    got = list(iter_records(cfg))
    assert got == [(m, f"{tmp_path}/ds#row {i}") for i, m in enumerate(msgs)]
    (s, _) = encode_batch(cfg, tok, got)
    assert tok.decode(s.input_ids[s.loss_mask == 1]) == "Hi! How can I help?<|im_end|>\n"
    assert list(iter_records(DataConfig(path=str(tmp_path / "dd")))) == [
        (r, f"{tmp_path}/dd[train]#row {i}") for i, r in enumerate(ROWS)]
    assert any(f.suffix == ".arrow" for f in source_files(cfg))
    # a parent directory treats the datasets directory as one source, not as loose .arrow/.json files
    assert len(list(iter_records(DataConfig(path=str(tmp_path))))) == len(msgs) + len(ROWS)


# --- bad input -------------------------------------------------------------------------------------------------

def _bad_file(tmp_path, name: str, content: bytes | str):
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return p


BAD = [  # (file name, content, DataConfig fields, substrings of the one message)
    ("m.jsonl", '{"instruction": "x", "output": "y"}\n', {"type": "prompt_response"},
     ["data.prompt_field='prompt'", "m.jsonl:1 has no field 'prompt'", "['instruction', 'output']",
      "set data.prompt_field"]),
    ("t.jsonl", '{"instruction": "x", "output": "y"}\n',
     {"type": "prompt_response", "prompt_template": "{instruction} {inp}", "response_field": "output"},
     ["data.prompt_template", "t.jsonl:1 has no field 'inp'"]),
    ("r.jsonl", '{"messages": [{"role": "bot", "content": "x"}]}\n', {"type": "chat"},
     ["r.jsonl:1", "messages[0] has role 'bot'", "system, user, assistant, tool"]),
    ("e.jsonl", '{"messages": []}\n', {"type": "chat"}, ["e.jsonl:1", "non-empty list of messages"]),
    ("c.jsonl", '{"messages": [{"role": "user", "content": ["x"]}]}\n', {"type": "chat"},
     ["c.jsonl:1", "messages[0] content is a list, not a string"]),
    ("n.jsonl", '{"messages": [{"role": "user", "content": "x"}]}\n', {"type": "chat"},
     ["n.jsonl:1", "no assistant message"]),
    ("s.jsonl", '{"prompt": "x", "response": 5}\n', {"type": "prompt_response"},
     ["s.jsonl:1 field 'response' is a int, not a string"]),
    ("u.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', {}, ["u.jsonl:2", "not valid UTF-8", "iconv"]),
    ("u.txt", b"line one\nline \xff two\n", {}, ["u.txt:2 (byte 14)", "not valid UTF-8"]),
    ("j.jsonl", '{"text": "ok"}\n{"text": \n', {}, ["j.jsonl:2 is not valid JSON", "data.format='text'"]),
    ("a.json", '[{"text": "ok"},\n {"text": }]', {}, ["a.json:2 is not valid JSON"]),
    ("o.jsonl", '[1, 2]\n', {}, ["o.jsonl:1 is a JSON list, not an object"]),
    ("x.csv", "text\nhello\n", {}, ["x.csv has an unsupported extension '.csv'", ".parquet", "data.format"]),
    ("p.txt", "just text", {"type": "prompt_response"}, ["p.txt is plain text", "data.type='text'"]),
    ("f.jsonl", '{"body": "x"}\n', {}, ["data.text_field='text'", "f.jsonl:1 has no field 'text'", "['body']"]),
    ("h.jsonl", '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}\n',
     {"type": "chat", "chat_template": ""}, ["data.chat_template", "no chat_template", "chatml"]),
    ("w.jsonl", '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}\n',
     {"type": "chat", "chat_template": "REWRITE"}, ["w.jsonl:1", "continuation", "data.train_on_prompt=true"]),
]


@pytest.mark.parametrize("name,content,fields,expected", BAD, ids=[b[0] for b in BAD])
def test_bad_record_is_one_error_naming_the_place(tok, tmp_path, name, content, fields, expected):
    if fields.get("chat_template") == "REWRITE":  # renders the last turn first: earlier turns move
        t = _bad_file(tmp_path, "rewrite.jinja", "{{ messages[-1]['content'] }}|{% for m in messages %}"
                      "{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}>{% endif %}")
        fields = {**fields, "chat_template": str(t)}
    f = _bad_file(tmp_path, name, content)
    cfg = DataConfig(path=str(f), **fields)
    with pytest.raises(ConfigError) as e:
        encode_batch(cfg, tok, list(iter_records(cfg)))
    assert len(e.value.messages) == 1
    assert all(s in e.value.messages[0] for s in expected), e.value.messages[0]


def test_bad_sources(tmp_path):
    import datasets

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".hidden.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match=r"holds no data files; supported: \.txt, \.jsonl, \.json, \.parquet"):
        list(iter_records(DataConfig(path=str(tmp_path / "empty"))))
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "mixed" / "b.parquet.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(ConfigError, match=r"b\.parquet\.gz has an unsupported extension '\.gz'"):
        list(iter_records(DataConfig(path=str(tmp_path / "mixed"))))
    with pytest.raises(ConfigError, match="glob matches no files"):
        list(iter_records(DataConfig(path=str(tmp_path / "*.parquet"))))
    with pytest.raises(ConfigError, match="no such file or directory"):
        list(iter_records(DataConfig(path=str(tmp_path / "nope.jsonl"))))
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ConfigError, match=r"DatasetDict with splits \['validation'\] and no 'train'"):
        list(iter_records(DataConfig(path=str(tmp_path / "dd"))))


@pytest.mark.parametrize("override,field", [
    ("--data.type=sft", "data.type"),
    ("--data.format=csv", "data.format"),
    ("--data.truncation=left", "data.truncation"),
    ("--data.prompt_template=vicuna", "data.prompt_template='vicuna': not a shipped template (alpaca)"),
    ("--data.prompt_template={instruction", "data.prompt_template='{instruction': not a valid str.format"),
    ("--data.chat_template=nochatml", "data.chat_template='nochatml': no such file and not a shipped template"),
    ("--data.response_field=", "data.response_field: must name a record field"),
])
def test_bad_data_fields_fail_at_config_load(override, field, capsys):
    assert main(["config", "show", "configs/tiny-llama.toml", override]) == 2
    err = capsys.readouterr().err
    assert field in err and "Traceback" not in err, err


def test_good_data_fields_load(capsys):
    assert main(["config", "show", "configs/tiny-llama.toml", "--data.type=chat", "--data.chat_template=chatml",
                 "--data.prompt_template=alpaca", "--data.format=parquet", "--data.truncation=drop"]) == 0
