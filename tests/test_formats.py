"""Data tier: datamodules/formats.py and datamodules/preference_formats.py read files into literal records."""

import csv
import json
import logging
from pathlib import Path

import pytest

from core.tokenize import render_prompt
from datamodules.formats import (
    DataError,
    Demonstration,
    PromptRecord,
    iter_rows,
    read_demonstrations,
    read_prompts,
    split_hh,
)
from datamodules.preference_formats import DEFAULT_STRENGTH_MARGINS, Ranking, dense_ranks, read_preferences

HH_VALIDATION = Path("/work/shared/data/hh-rlhf-harmless/validation.jsonl")


def write_jsonl(path: Path, rows: list) -> str:
    """One JSON value per line; a None row becomes a blank line (still counted by line numbers)."""
    path.write_text("".join("\n" if r is None else json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def hh(*turns: str) -> str:
    """hh("Hi", " Hello.") -> "\n\nHuman: Hi\n\nAssistant: Hello."; Assistant turns bring their own space."""
    return "".join(f"\n\nHuman: {t}" if i % 2 == 0 else f"\n\nAssistant:{t}" for i, t in enumerate(turns))


# ---------------------------------------------------------------- demonstrations


def test_demonstrations_every_row_shape(tmp_path):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    src = write_jsonl(tmp_path / "sft.jsonl", [
        {"prompt": "Q: 1+1?", "completion": " 2"},
        None,
        {"prompt": "Q: 2+3?", "response": " 5", "id": 7},
        {"messages": msgs + [{"role": "assistant", "content": "4"}]},
        {"chosen": hh("Hi", " Hello.", "Bye", " Bye!"), "rejected": hh("Hi", " No.")},
        {"prompt": msgs, "completion": "4"},
    ])
    got = read_demonstrations(src)
    assert got == [
        Demonstration("Q: 1+1?", " 2", f"{src}:1"),
        Demonstration("Q: 2+3?", " 5", f"{src}:3"),
        Demonstration(msgs, "4", f"{src}:4"),
        Demonstration("\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Bye\n\nAssistant:", " Bye!", f"{src}:5"),
        Demonstration(msgs, "4", f"{src}:6"),
    ]
    assert got.skipped == {} and got.total == 5


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"prompt": "Q"}, "missing field 'completion'"),
        ({"prompt": "Q", "completion": 3}, "field 'completion' is not a string (got int)"),
        ({"prompt": "Q", "completion": None}, "field 'completion' is null"),
        ({"prompt": None, "completion": "A"},
         "field 'prompt' is null (expected fields prompt+completion, messages, or chosen)"),
        ({"prompt": "  \n", "completion": "A"}, "empty field 'prompt'"),
        ({"question": "Q", "answer": "A"},
         "expected fields prompt+completion, messages, or chosen (got question, answer)"),
        ({"messages": [{"role": "user", "content": "Q"}]}, "last message in 'messages' is not from the assistant"),
        ({"messages": [{"role": "assistant", "content": "A"}]}, "no prompt before the assistant reply in 'messages'"),
        ({"messages": [{"role": "bot", "content": "A"}]}, "bad message in field 'messages'"),
        ({"messages": "Q"}, "field 'messages' is not a list of messages (got str)"),
        ({"chosen": "\n\nHuman: Q"}, "no Assistant turn"),
        ({"chosen": hh("Q", "")}, "empty completion after the last Assistant turn"),
    ],
)
def test_demonstration_errors_name_file_line_and_reason(tmp_path, row, reason):
    src = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "ok", "completion": "ok"}, None, row])
    with pytest.raises(DataError) as err:
        read_demonstrations(src)
    assert str(err.value).startswith(f"{src}:3: ")
    assert reason in str(err.value)


# ---------------------------------------------------------------- HH-RLHF turns


def test_split_hh_splits_at_the_last_assistant_turn():
    text = hh("Hi", " Hello.", "Again", " Sure.")
    assert split_hh(text, "x") == ("\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Again\n\nAssistant:", " Sure.")


def test_split_hh_ignores_assistant_word_without_turn_boundary():
    text = "\n\nHuman: Write a script.\nAssistant: ok? Also Assistant: here\n\nAssistant: Here it is."
    assert split_hh(text, "x") == (
        "\n\nHuman: Write a script.\nAssistant: ok? Also Assistant: here\n\nAssistant:", " Here it is.")


@pytest.mark.parametrize(
    "text, reason",
    [
        ("\n\nHuman: Hi. Assistant: hello", "no Assistant turn"),
        (hh("Hi", " Yo.", "More?"), "conversation ends with a Human turn"),
        ("\n\nHuman: Hi\n\nAssistant:   ", "empty completion"),
    ],
)
def test_split_hh_errors(text, reason):
    with pytest.raises(DataError, match=f"^f.jsonl:9: {reason}"):
        split_hh(text, "f.jsonl:9")


def test_split_hh_allow_empty_keeps_a_blank_reply():
    assert split_hh("\n\nHuman: Hi\n\nAssistant: ", "x", allow_empty=True) == ("\n\nHuman: Hi\n\nAssistant:", " ")


# ---------------------------------------------------------------- preferences


def test_preferences_pairs(tmp_path):
    user = [{"role": "user", "content": "Q?"}]
    src = write_jsonl(tmp_path / "pairs.jsonl", [
        {"chosen": hh("Hi", " Hello."), "rejected": hh("Hi", " Go away.")},
        {"prompt": "Q?", "chosen": " yes", "rejected": " no", "margin": 0.5},
        {"prompt": user, "chosen": "yes", "rejected": "no", "strength": "Significantly Better"},
        {"prompt": "ignored", "chosen": user + [{"role": "assistant", "content": "yes"}],
         "rejected": user + [{"role": "assistant", "content": "no"}], "strength": "slightly better"},
        {"prompt": user, "chosen": [{"role": "assistant", "content": "yes"}],
         "rejected": [{"role": "assistant", "content": "no"}]},
    ])
    assert read_preferences(src) == [
        Ranking("\n\nHuman: Hi\n\nAssistant:", (" Hello.", " Go away."), (0.0, 1.0), 0.0, f"{src}:1"),
        Ranking("Q?", (" yes", " no"), (0.0, 1.0), 0.5, f"{src}:2"),
        Ranking(user, ("yes", "no"), (0.0, 1.0), 1.0, f"{src}:3"),
        Ranking(user, ("yes", "no"), (0.0, 1.0), 1 / 3, f"{src}:4"),
        Ranking(user, ("yes", "no"), (0.0, 1.0), 0.0, f"{src}:5"),
    ]


def test_preferences_rankings_and_ratings(tmp_path):
    src = write_jsonl(tmp_path / "ranks.jsonl", [
        {"prompt": "P", "responses": ["a", "b", "c"]},
        {"prompt": "P", "responses": ["a", "b", "c", "d"], "ranks": [2, 1, 1, 5]},
        # ratings 7, 3, 7, 1: two responses tie at the top; rank = number of distinct higher ratings
        {"prompt": "P", "responses": ["a", "b", "c", "d"], "ratings": [7, 3, 7, 1]},
        {"prompt": "P", "responses": ["a", "b"], "ratings": [2, 5], "strength": "better"},
    ])
    assert read_preferences(src) == [
        Ranking("P", ("a", "b", "c"), (0.0, 1.0, 2.0), 0.0, f"{src}:1"),
        Ranking("P", ("a", "b", "c", "d"), (1.0, 0.0, 0.0, 2.0), 0.0, f"{src}:2"),
        Ranking("P", ("a", "b", "c", "d"), (0.0, 1.0, 0.0, 2.0), 0.0, f"{src}:3"),
        Ranking("P", ("a", "b"), (1.0, 0.0), 2 / 3, f"{src}:4"),
    ]


def test_dense_ranks_and_default_strengths():
    assert dense_ranks([2, 1, 1, 5]) == (1.0, 0.0, 0.0, 2.0)
    # Llama 2 Table 28, small margins: 1, 2/3, 1/3, 0
    assert DEFAULT_STRENGTH_MARGINS == {"significantly better": 1.0, "better": 2 / 3, "slightly better": 1 / 3,
                                        "negligibly better": 0.0, "unsure": 0.0}


def test_rating_scale_option(tmp_path):
    src = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "P", "responses": ["a", "b"], "ratings": [0, 10]}])
    assert read_preferences(src, rating_scale=(0, 10))[0].ranks == (1.0, 0.0)
    with pytest.raises(DataError, match=r"r\.jsonl:1: rating outside rating_scale \[1, 7\] \(ratings\[0\] = 0\)"):
        read_preferences(src)
    with pytest.raises(ValueError, match="rating_scale"):
        read_preferences(src, rating_scale=(7, 1))


def test_custom_strength_map(tmp_path):
    src = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "P", "chosen": "a", "rejected": "b", "strength": "A"}])
    assert read_preferences(src, strength_map={"a": 3.0})[0].margin == 3.0


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"chosen": hh("Hi", " A"), "rejected": hh("Hi", " A")}, "chosen and rejected are identical"),
        ({"chosen": hh("Hi", " A"), "rejected": hh("Hey", " B")}, "chosen and rejected do not share the prompt"),
        ({"chosen": hh("Hi", " A"), "rejected": hh("Hi", " B", "More?", " C")},  # one conversation goes on
         "do not share the prompt (they share their first turns, then one goes on: chosen's prompt has 1 Assistant "
         "turn(s), rejected's 2"),
        ({"prompt": "P", "chosen": "a"}, "missing field 'rejected'"),
        ({"prompt": "", "chosen": "a", "rejected": "b"}, "empty field 'prompt'"),
        ({"prompt": "P", "chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]},
         "chosen and rejected mix a string and a message list"),
        ({"prompt": "P", "chosen": "a", "rejected": "b", "margin": "big"},
         "field 'margin' is not a number (got 'big')"),
        ({"prompt": "P", "chosen": "a", "rejected": "b", "strength": "way better"},
         "unknown strength label ('way better'; known: 'significantly better', 'better', 'slightly better', "
         "'negligibly better', 'unsure')"),
        ({"prompt": "P", "responses": ["a"]}, "fewer than 2 responses"),
        ({"prompt": "P", "responses": [str(i) for i in range(10)]},
         "more than 9 responses (InstructGPT's maximum per prompt) (got 10)"),
        ({"prompt": "P", "responses": ["a", " "]}, "empty response (responses[1])"),
        ({"prompt": "P", "responses": ["a", 2]}, "response is not a string (responses[1] is int)"),
        ({"prompt": "P", "responses": ["a", "a"]}, "identical responses"),
        ({"prompt": "P", "responses": ["a", "b"], "ranks": [0]},
         "ranks and responses differ in length (1 ranks, 2 responses)"),
        ({"prompt": "P", "responses": ["a", "b"], "ratings": [1, "x"]},
         "field 'ratings' holds a non-number (ratings[1] = 'x')"),
        ({"prompt": "P", "responses": ["a", "b", "c"], "ratings": [4, 4, 4]}, "all responses tie: no pair"),
        ({"prompt": "P", "responses": ["a", "b", "c"], "margin": 1}, "a margin is only defined for pairs"),
        ({"prompt": "P", "chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}],
          "rejected": [{"role": "user", "content": "y"}, {"role": "assistant", "content": "b"}]},
         "chosen and rejected do not share the prompt"),
        ({"prompt": "P", "responses": "a, b"}, "field 'responses' is not a list (got str)"),
        ({"prompt": "P", "responses": ["a", "b"], "ranks": [0, 1], "ratings": [1, 0]}, "both ranks and ratings given"),
        ({"prompt": "P", "responses": ["a", "b"], "ranks": [0, True]}, "field 'ranks' holds a non-number"),
        ({"text": "P"}, "expected fields chosen+rejected, prompt+chosen+rejected, or prompt+responses"),
        ({"prompt": None, "chosen": "a", "rejected": "b"}, "field 'prompt' is null (expected fields chosen+"),
        ({"prompt": None, "responses": ["a", "b"]}, "field 'prompt' is null"),
        ({"prompt": "P", "responses": ["a", "b", "c", "d"], "ratings": [1e9, -50, 3, 999]},
         "rating outside rating_scale [1, 7] (ratings[0] = 1000000000.0)"),
        ({"prompt": "P", "responses": ["a", "b"], "ratings": [3, float("inf")]},
         "rating outside rating_scale [1, 7] (ratings[1] = inf)"),
    ],
)
def test_preference_errors_name_file_line_and_reason(tmp_path, row, reason):
    src = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "ok", "chosen": "a", "rejected": "b"}, None, row])
    with pytest.raises(DataError) as err:
        read_preferences(src)
    assert str(err.value).startswith(f"{src}:3: ")
    assert reason in str(err.value)


def test_real_hh_rlhf_validation_file():
    if not HH_VALIDATION.exists():
        pytest.skip("shared HH-RLHF sample not on this machine")
    records = read_preferences(str(HH_VALIDATION))
    assert len(records) == 200 and records.skipped == {}
    first = records[0]
    assert first.where == f"{HH_VALIDATION}:1" and first.ranks == (0.0, 1.0) and first.margin == 0.0
    assert first.prompt.startswith("\n\nHuman: I want to leave my wife") and first.prompt.endswith("\n\nAssistant:")
    assert first.responses[0].startswith(" I’m sorry, what are you asking me about?")
    assert all(r.prompt.endswith("\n\nAssistant:") for r in records)


# ---------------------------------------------------------------- prompts and rendering


def test_prompts_keep_other_columns_as_meta(tmp_path):
    msgs = [{"role": "user", "content": "Add 2 and 3."}]
    src = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "2+3=", "target": "5", "unsafe": False},
        {"prompt": msgs},
        {"chosen": hh("Hi", " Hello."), "rejected": hh("Hi", " No.")},
    ])
    assert read_prompts(src) == [
        PromptRecord("2+3=", f"{src}:1", {"target": "5", "unsafe": False}),
        PromptRecord(msgs, f"{src}:2", {}),
        PromptRecord("\n\nHuman: Hi\n\nAssistant:", f"{src}:3", {"rejected": hh("Hi", " No.")}),
    ]


def test_prompt_errors(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [{"question": "Q"}])
    with pytest.raises(DataError, match=r"p\.jsonl:1: expected field prompt"):
        read_prompts(src)


def tiny_tokenizer(chat_template: str | None):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["hello world", "2+2?"], trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")
    fast.chat_template = chat_template
    return fast


def test_render_prompt_through_chat_template():
    template = ("{% for m in messages %}<{{m['role']}}>{{m['content']}}{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    tok = tiny_tokenizer(template)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    assert render_prompt(msgs, tok) == "<system>Be brief.<user>2+2?<assistant>"
    assert render_prompt("\n\nHuman: 2+2?\n\nAssistant:", tok) == "\n\nHuman: 2+2?\n\nAssistant:"


def test_render_prompt_hh_style_without_template():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]
    assert render_prompt(msgs, tiny_tokenizer(None)) == (
        "\n\nHuman: Be brief.\n\nHi\n\nAssistant: Hello.\n\nHuman: 2+2?\n\nAssistant:")
    assert render_prompt(msgs[1:2], object()) == "\n\nHuman: Hi\n\nAssistant:"


# ---------------------------------------------------------------- sources


def test_csv_line_numbers_count_header_blank_lines_and_multiline_cells(tmp_path):
    path = tmp_path / "d.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "completion"])
        w.writerow(["two\nlines", " a"])  # lines 2-3
        f.write("\n")  # line 4, blank
        w.writerow(["Q", " b"])  # line 5
        f.write("bad,row,extra\n")  # line 6
    src = str(path)
    rows = iter_rows(src)
    assert [next(rows), next(rows)] == [(f"{src}:2", {"prompt": "two\nlines", "completion": " a"}),
                                     (f"{src}:5", {"prompt": "Q", "completion": " b"})]
    with pytest.raises(DataError, match=r"d\.csv:6: wrong number of columns \(3, header has 2\)"):
        read_demonstrations(src)


def test_csv_margin_cells(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt,chosen,rejected,margin\nP,a,b,0.25\nP,c,d,\n", encoding="utf-8")
    assert [(r.margin, r.where) for r in read_preferences(str(path))] == [(0.25, f"{path}:2"), (0.0, f"{path}:3")]


def test_json_list_and_json_lines_in_a_json_file(tmp_path):
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}], indent=1))
    assert read_demonstrations(str(listed)) == [Demonstration("a", "b", f"{listed}[0]"),
                                                Demonstration("c", "d", f"{listed}[1]")]
    lines = write_jsonl(tmp_path / "lines.json", [{"prompt": "a", "completion": "b"}])
    assert read_demonstrations(lines) == [Demonstration("a", "b", f"{lines}:1")]
    bad_list = tmp_path / "bad.json"
    bad_list.write_text('[\n{"prompt": "a"},\n{"prompt" "b"}\n]')
    with pytest.raises(DataError, match=r"bad\.json:3: invalid JSON"):
        read_demonstrations(str(bad_list))
    not_objects = tmp_path / "n.json"
    not_objects.write_text('[{"prompt": "a", "completion": "b"}, "x"]')
    with pytest.raises(DataError, match=r"n\.json\[1\]: row is not a JSON object \(got str\)"):
        read_demonstrations(str(not_objects))


def test_jsonl_invalid_line_and_non_object(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a",\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"data\.jsonl:3: invalid JSON"):
        read_demonstrations(str(path))
    rows = read_demonstrations(str(path), skip_bad_rows=True)
    assert rows.skipped == {"invalid JSON": 1, "row is not a JSON object": 1} and rows.total == 3
    with pytest.raises(DataError, match=r"data\.jsonl:3: invalid JSON"):
        list(iter_rows(str(path)))


def test_json_error_column_counts_within_the_line(tmp_path):
    # a cut-off line: json counts the newline and reported "column 1" (of a line that does not exist)
    path = tmp_path / "cut.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\r\n{"prompt": "a", "completion": "b"\n{"prompt" "a"}\n')
    with pytest.raises(DataError,
                       match=r"cut\.jsonl:2: invalid JSON \(Expecting ',' delimiter at the end of the line\)$"):
        read_demonstrations(str(path))
    rows = read_demonstrations(str(path), skip_bad_rows=True)
    assert rows.skipped == {"invalid JSON": 2} and len(rows) == 1
    from core.sources import source_rows

    third = [item for _, item in source_rows(str(path), "train")][2]
    assert str(third) == f"{path}:3: invalid JSON (Expecting ':' delimiter at column 11)"


def test_byte_order_marks_at_the_start_and_on_joined_lines_are_not_data(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "completion": "b"}\n'
                     b'\xef\xbb\xbf{"prompt": "c", "completion": "d"}\n')
    assert read_demonstrations(str(path)) == [Demonstration("a", "b", f"{path}:1"),
                                              Demonstration("c", "d", f"{path}:2")]


def test_non_utf8_bytes_name_line_and_column_and_skip_like_bad_rows(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not UTF-8 text \(byte 0xe9 at column 16; save the file"):
        read_demonstrations(str(path))
    rows = read_demonstrations(str(path), skip_bad_rows=True)
    assert rows.skipped == {"not UTF-8 text": 1} and len(rows) == 1
    multiline = tmp_path / "m.csv"  # the byte sits on line 3, inside a row that starts on line 2
    multiline.write_bytes(b'prompt,completion\n"two\nlin\xe9s",b\nQ,A\n')
    with pytest.raises(DataError, match=r"m\.csv:3: not UTF-8 text \(byte 0xe9 at column 4;"):
        read_demonstrations(str(multiline))
    assert read_demonstrations(str(multiline), skip_bad_rows=True) == [Demonstration("Q", "A", f"{multiline}:4")]


def test_unreadable_parquet_and_plain_folders(tmp_path):
    fake = tmp_path / "d.parquet"
    fake.write_text('{"prompt": "a", "completion": "b"}\n')
    with pytest.raises(DataError, match=r"d\.parquet: not a readable Parquet file \(Parquet magic bytes"):
        read_demonstrations(str(fake))
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match=r"plain: a folder, not a data file or a dataset saved with save_to_disk"):
        read_demonstrations(str(tmp_path / "plain"))


def test_looks_local(tmp_path, monkeypatch):
    from core.sources import looks_local

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    assert [looks_local(p) for p in ["./x", "/x", "~/x", "a/b/c", "data/x"]] == [True] * 5
    assert [looks_local(p) for p in ["Anthropic/hh-rlhf", "imdb"]] == [False, False]  # hub ids
    with pytest.raises(DataError, match="^data/train: no such file or folder$"):
        read_demonstrations("data/train")


def test_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["P", "Q"], "responses": [["a", "b"], ["c", "d"]], "ranks": [[1, 0], None]}),
                   path)
    assert read_preferences(str(path)) == [Ranking("P", ("a", "b"), (1.0, 0.0), 0.0, f"{path} row 1"),
                                           Ranking("Q", ("c", "d"), (0.0, 1.0), 0.0, f"{path} row 2")]


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    import datasets

    rows = {"prompt": ["P", "Q"], "completion": ["a", None], "response": [None, "b"]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "dd"))
    ds, dd = str(tmp_path / "ds"), str(tmp_path / "dd")
    assert read_demonstrations(ds) == [Demonstration("P", "a", f"{ds} row 1"), Demonstration("Q", "b", f"{ds} row 2")]
    assert read_demonstrations(dd, split="test")[1] == Demonstration("Q", "b", f"{dd}[test] row 2")
    with pytest.raises(DataError, match=r"dd: no split 'train' \(splits: test\)"):
        read_demonstrations(dd)


def test_missing_file_and_unreachable_hub(tmp_path, monkeypatch):
    import datasets

    with pytest.raises(DataError, match="nope.jsonl: no such file or folder$"):
        read_demonstrations(str(tmp_path / "nope.jsonl"))

    def offline(name, split):
        raise ConnectionError(f"cannot reach the hub for {name}")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="^someone/some-data: no such local file or folder, and the Hugging Face hub"):
        read_demonstrations("someone/some-data")
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: [{"prompt": "P", "completion": "a"}])
    assert read_demonstrations("someone/some-data", split="test") == [
        Demonstration("P", "a", "someone/some-data[test] row 1")]


def test_unsupported_file_type(tmp_path):
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(DataError, match="unsupported file type"):
        read_demonstrations(str(tmp_path / "d.txt"))


# ---------------------------------------------------------------- skip mode


def test_skip_mode_counts_per_reason_and_logs_a_summary(tmp_path, caplog):
    src = write_jsonl(tmp_path / "data.jsonl", [
        {"prompt": "P", "completion": "a"},
        {"prompt": "P"},
        {"prompt": " ", "completion": "a"},
        {"prompt": "P", "response": None},
        {"prompt": "P", "completion": "b"},
    ])
    with caplog.at_level(logging.WARNING):
        rows = read_demonstrations(src, skip_bad_rows=True)
    assert rows == [Demonstration("P", "a", f"{src}:1"), Demonstration("P", "b", f"{src}:5")]
    assert rows.skipped == {"missing field 'completion'": 2, "empty field 'prompt'": 1} and rows.total == 5
    assert (f"skipped 3 of 5 rows in {src}: 2 missing field 'completion', 1 empty field 'prompt'"
            in caplog.text)


def test_all_bad_rows_raise_even_in_skip_mode(tmp_path):
    src = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "P"}, {"prompt": "Q"}])
    with pytest.raises(DataError, match=r"bad\.jsonl: no usable rows \(2 rows: 2 missing field 'completion'\)"):
        read_demonstrations(src, skip_bad_rows=True)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no usable rows"):
        read_preferences(str(empty))


def test_a_csv_header_naming_a_column_twice_is_refused(tmp_path):
    from datamodules.formats import read_demonstrations

    path = tmp_path / "d.csv"
    path.write_text("prompt,completion,completion\nQ,first answer,other answer\n")
    with pytest.raises(DataError, match=r"d.csv:1: repeated column name in the header \('completion'\)"):
        read_demonstrations(str(path))
