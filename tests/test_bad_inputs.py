"""Bad inputs -> the exact one line `rlhf` prints for each (exit 3, no traceback). BAD_INPUTS.md is this list:
regenerate it with `python -m tests.test_bad_inputs` after changing a case or a message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest

from core.models import load_tokenizer
from datamodules.formats import DataError, read_demonstrations, read_prompts
from datamodules.preference_formats import read_preferences
from datamodules.unpaired import read_judgements
from recipes import cli
from tests.conftest import ROOT, TINY_MODEL

TABLE = Path(__file__).with_name("BAD_INPUTS.md")
TMP = "TMP"  # the test's tmp_path in messages and examples


class Case(NamedTuple):
    name: str  # the class of bad input
    example: str  # what the input looks like
    run: Callable[[Path], object]  # raises the error, given a fresh folder
    message: str  # the exact line printed, TMP standing for that folder


def write(path: Path, lines: list) -> str:
    """dict/list -> a JSON line, str -> the line as is, bytes -> raw bytes (with a newline each)."""
    raw = [x if isinstance(x, bytes) else (x if isinstance(x, str) else json.dumps(x)).encode() for x in lines]
    path.write_bytes(b"".join(x + b"\n" for x in raw))
    return str(path)


GOOD = {read_demonstrations: {"prompt": "Q", "completion": " A"}, read_prompts: {"prompt": "Q"},
        read_preferences: {"prompt": "Q", "chosen": " a", "rejected": " b"},
        read_judgements: {"prompt": "Q", "completion": " a", "label": True}}


def row(name: str, reader, bad, message: str, file: str = "d.jsonl") -> Case:
    """A good row on line 1, the bad one on line 2 of a .jsonl file, read by reader."""
    example = bad if isinstance(bad, str) else json.dumps(bad)
    return Case(name, f"`{example}`", lambda tmp: reader(write(tmp / file, [GOOD[reader], bad])),
                f"{TMP}/{file}:2: {message}")


def raw(name: str, example: str, file: str, data: bytes, message: str, reader=read_demonstrations) -> Case:
    def run(tmp: Path):
        (tmp / file).write_bytes(data)
        return reader(str(tmp / file))
    return Case(name, example, run, message)


def datamodule(name: str, example: str, kind: str, bad: dict, message: str, **kw) -> Case:
    """A DataModule on the tiny tokenizer with truncation='error', set up on a one-row file."""
    def run(tmp: Path):
        from datamodules.preference import PreferenceDataModule
        from datamodules.prompts import PromptDataModule
        from datamodules.sft import SFTDataModule

        cls = {"sft": SFTDataModule, "preference": PreferenceDataModule, "prompts": PromptDataModule}[kind]
        path = write(tmp / "d.jsonl", [bad])
        cls(path, path, tokenizer=str(TINY_MODEL), truncation="error", **kw).setup("fit")
    return Case(name, example, run, message)


def saved_dataset(tmp: Path):
    import datasets

    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"prompt": ["Q"], "completion": [" A"]})}).save_to_disk(
        str(tmp / "saved"))
    return read_demonstrations(str(tmp / "saved"))


def folder(tmp: Path):
    (tmp / "data").mkdir()
    write(tmp / "data" / "train.jsonl", [GOOD[read_demonstrations]])
    return read_demonstrations(str(tmp / "data"))


LONG = " a b c d e f g h i j" * 8  # 80 one-letter words: 96 tokens of the tiny tokenizer
MSG_ITEM = "item 0 is not {'role': system|user|assistant, 'content': str}: {'role': 'bot', 'content': 'hi'}"
SHAPES = "expected fields chosen+rejected, prompt+chosen+rejected, or prompt+responses"
D = read_demonstrations
P = read_preferences
CASES = [
    row("JSON line cut off", D, '{"prompt": "Q", "completion": " A"',
        "invalid JSON (Expecting ',' delimiter at the end of the line)"),
    row("JSON line with a syntax error", D, '{"prompt": "Q" "completion": " A"}',
        "invalid JSON (Expecting ',' delimiter at column 16)"),
    row("JSON line that is not an object", D, [1, 2], "row is not a JSON object (got list)"),
    row("missing field", D, {"prompt": "Q"}, "missing field 'completion'"),
    row("null field", D, {"prompt": None, "completion": " A"},
        "field 'prompt' is null (expected fields prompt+completion, messages, or chosen)"),
    row("null field (preference)", P, {"prompt": None, "chosen": " a", "rejected": " b"},
        f"field 'prompt' is null ({SHAPES})"),
    row("wrong type", D, {"prompt": "Q", "completion": 3}, "field 'completion' is not a string (got int)"),
    row("empty field", D, {"prompt": " ", "completion": " A"}, "empty field 'prompt'"),
    row("no known row shape", D, {"question": "Q", "answer": "A"},
        "expected fields prompt+completion, messages, or chosen (got question, answer)"),
    row("no known row shape (prompts)", read_prompts, {"question": "Q"},
        "expected field prompt or chosen (got question)"),
    row("bad chat message", D, {"messages": [{"role": "bot", "content": "hi"}]},
        f"bad message in field 'messages' ({MSG_ITEM})"),
    row("chat not ending with the assistant", D, {"messages": [{"role": "user", "content": "hi"}]},
        "last message in 'messages' is not from the assistant (user)"),
    row("HH string without an Assistant turn", D, {"chosen": "\n\nHuman: hi. Assistant: yo"}, "no Assistant turn"),
    row("HH string ending with a Human turn", D, {"chosen": "\n\nHuman: hi\n\nAssistant: yo\n\nHuman: ?"},
        "conversation ends with a Human turn"),
    row("HH string with an empty last reply", D, {"chosen": "\n\nHuman: hi\n\nAssistant: "},
        "empty completion after the last Assistant turn"),
    row("identical chosen and rejected", P, {"prompt": "Q", "chosen": " a", "rejected": " a"},
        "chosen and rejected are identical"),
    row("HH pair with different prompts", P, {"chosen": "\n\nHuman: hi\n\nAssistant: a",
                                              "rejected": "\n\nHuman: ho\n\nAssistant: b"},
        "chosen and rejected do not share the prompt"),
    row("ranks and responses differ in length", P, {"prompt": "Q", "responses": [" a", " b"], "ranks": [0]},
        "ranks and responses differ in length (1 ranks, 2 responses)"),
    row("rank that is not a number", P, {"prompt": "Q", "responses": [" a", " b"], "ranks": [0, "x"]},
        "field 'ranks' holds a non-number (ranks[1] = 'x')"),
    row("ratings outside the scale", P, {"prompt": "Q", "responses": [" a", " b", " c", " d"],
                                         "ratings": [1e9, -50, 3, 999]},
        "rating outside rating_scale [1, 7] (ratings[0] = 1000000000.0)"),
    row("rating NaN", P, '{"prompt": "Q", "responses": [" a", " b"], "ratings": [NaN, 3]}',
        "rating outside rating_scale [1, 7] (ratings[0] = nan)"),
    row("more than 9 responses", P, {"prompt": "Q", "responses": [f" {i}" for i in range(10)]},
        "more than 9 responses (InstructGPT's maximum per prompt) (got 10)"),
    row("all responses tie", P, {"prompt": "Q", "responses": [" a", " b"], "ratings": [4, 4]},
        "all responses tie: no pair"),
    row("unknown strength label", P, {"prompt": "Q", "chosen": " a", "rejected": " b", "strength": "huge"},
        "unknown strength label ('huge'; known: 'significantly better', 'better', 'slightly better', "
        "'negligibly better', 'unsure')"),
    row("margin on a ranking", P, {"prompt": "Q", "responses": [" a", " b", " c"], "margin": 1},
        "a margin is only defined for pairs (got 3 responses)"),
    row("unpaired row without a label", read_judgements, {"prompt": "Q", "completion": " a"},
        "missing field 'label' (true = desirable, false = undesirable)"),
    row("unpaired label that is not true or false", read_judgements,
        {"prompt": "Q", "completion": " a", "label": "meh"},
        "field 'label' is not true or false (got 'meh')"),
    raw("csv row with the wrong number of columns", "`Q,A,extra` under header `prompt,completion`", "d.csv",
        b"prompt,completion\nQ, A\nQ,A,extra\n", f"{TMP}/d.csv:3: wrong number of columns (3, header has 2)"),
    raw("csv header naming a column twice", "header `prompt,completion,completion`", "d.csv",
        b"prompt,completion,completion\nQ,A,B\n", "TMP/d.csv:1: repeated column name in the header ('completion')"),
    raw("non-UTF-8 byte in a .jsonl", "Latin-1 `\\xe9` in line 2", "d.jsonl",
        b'{"prompt": "Q", "completion": " A"}\n{"prompt": "caf\xe9", "completion": " A"}\n',
        f"{TMP}/d.jsonl:2: not UTF-8 text (byte 0xe9 at column 16; save the file as UTF-8)"),
    raw("non-UTF-8 byte in a .csv", "Latin-1 `\\xe9` in line 3", "d.csv", b"prompt,completion\nQ, A\ncaf\xe9, A\n",
        f"{TMP}/d.csv:3: not UTF-8 text (byte 0xe9 at column 4; save the file as UTF-8)"),
    raw("non-UTF-8 byte in a .json list", "Latin-1 `\\xe9` in line 3", "d.json",
        b'[\n{"prompt": "Q", "completion": " A"},\n{"prompt": "caf\xe9", "completion": " A"}\n]\n',
        f"{TMP}/d.json:3: not UTF-8 text (byte 0xe9 at column 16; save the file as UTF-8)"),
    raw("UTF-16 file", "a .csv saved as UTF-16", "d.csv", "prompt,completion\nQ, A\n".encode("utf-16"),
        f"{TMP}/d.csv:1: not UTF-8 text (byte 0xff at column 1; save the file as UTF-8)"),
    raw(".json list with a syntax error", "`[{...},` then `{\"prompt\" \"Q\"}` on line 3", "d.json",
        b'[\n{"prompt": "Q", "completion": " A"},\n{"prompt" "Q"}\n]\n',
        f"{TMP}/d.json:3: invalid JSON (Expecting ':' delimiter at column 11)"),
    raw(".json list item that is not an object", '`[{...}, "x"]`', "d.json",
        b'[{"prompt": "Q", "completion": " A"}, "x"]', f"{TMP}/d.json[1]: row is not a JSON object (got str)"),
    raw("text file named .parquet", "JSON lines saved as `d.parquet`", "d.parquet",
        b'{"prompt": "Q", "completion": " A"}\n',
        f"{TMP}/d.parquet: not a readable Parquet file (Parquet magic bytes not found in footer)"),
    raw("empty file", "a 0-byte .jsonl", "d.jsonl", b"", f"{TMP}/d.jsonl: no usable rows (0 rows)"),
    raw("unsupported file type", "`d.txt`", "d.txt", b"Q A\n",
        f"{TMP}/d.txt: unsupported file type (use .jsonl, .json, .csv, .parquet or a saved dataset)"),
    Case("missing file", "`TMP/nope.jsonl`", lambda tmp: read_demonstrations(str(tmp / "nope.jsonl")),
         f"{TMP}/nope.jsonl: no such file or folder"),
    Case("missing file under a local folder", "`TMP/data/train` (no suffix)",
         lambda tmp: read_demonstrations(str(tmp / "data" / "train")), f"{TMP}/data/train: no such file or folder"),
    Case("folder of data files", "`TMP/data` holding `train.jsonl`", folder,
         f"{TMP}/data: a folder, not a data file or a dataset saved with save_to_disk "
         "(name one .jsonl, .json, .csv, .parquet file in it)"),
    Case("saved dataset without the split", "a DatasetDict with only `test`", saved_dataset,
         f"{TMP}/saved: no split 'train' (splits: test)"),
    Case("missing local model folder", "`--model.policy.path TMP/no-model`",
         lambda tmp: load_tokenizer(str(tmp / "no-model")),
         f"{TMP}/no-model: no such model folder (a local path, so not looked up on the Hugging Face hub)"),
    Case("model path that is a file", "`--model.policy.path TMP/d.jsonl`",
         lambda tmp: load_tokenizer(write(tmp / "d.jsonl", [{}])),
         f"{TMP}/d.jsonl: not a folder (a local path, so not looked up on the Hugging Face hub)"),
    datamodule("prompt and completion merge into one token", "`\"Reverse: a\\nAns\"` + `\"wer: a\"`", "sft",
               {"prompt": "Reverse: a\nAns", "completion": "wer: a"},
               f"{TMP}/d.jsonl:1: the prompt's tokens are not a prefix of prompt+completion's tokens (a token merges "
               "across the boundary: end the prompt before whitespace or start the completion with a space)",
               max_length=64, max_prompt_length=32),
    datamodule("completion over max_length (truncation=error)", "a 97-token completion (with EOS), max_length 32",
               "sft", {"prompt": "Reverse: a\nAnswer:", "completion": LONG},
               f"{TMP}/d.jsonl:1: completion longer than max_length 32 allows (71 of 97 tokens would be cut from "
               "the right, with its EOS; truncation='error')", max_length=32, max_prompt_length=16),
    datamodule("prompt over max_length (truncation=error)", "a 101-token prompt, max_length 32", "sft",
               {"prompt": "Reverse:" + LONG + "\nAnswer:", "completion": " a"},
               f"{TMP}/d.jsonl:1: prompt longer than max_length 32 allows (71 of 101 tokens would be cut from "
               "the left; truncation='error')", max_length=32, max_prompt_length=16),
    datamodule("response over max_length (truncation=error)", "a 97-token rejected response, max_length 32",
               "preference", {"prompt": "Reverse: a\nAnswer:", "chosen": " a", "rejected": LONG},
               f"{TMP}/d.jsonl:1: completion longer than max_length 32 allows (71 of 97 tokens would be cut from "
               "the right, with its EOS; truncation='error')", max_length=32, max_prompt_length=16),
    datamodule("generation prompt over max_prompt_length (truncation=error)",
               "a 110-token PPO prompt, max_prompt_length 32", "prompts",
               {"prompt": "Task: reverse." + LONG + "\nAnswer:"},
               f"{TMP}/d.jsonl:1: prompt longer than max_prompt_length 32 (78 of 110 tokens would be cut from the "
               "left; truncation='error')", max_prompt_length=32),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gives_its_one_line_message(case, tmp_path):
    with pytest.raises(Exception) as err:
        case.run(tmp_path)
    assert cli.exit_code(err.value) == 3, f"{type(err.value).__name__}: {err.value}"
    assert cli.one_line(err.value) == case.message.replace(TMP, str(tmp_path))


def test_generation_prompts_cut_from_the_left_are_reported_or_skipped(tmp_path, caplog):
    from datamodules.prompts import PromptDataModule

    path = write(tmp_path / "p.jsonl",
                 [{"prompt": "Task: reverse." + LONG + "\nAnswer:"}, {"prompt": "Reverse: a\nAnswer:"}])
    kw = dict(train_file=path, val_file=path, tokenizer=str(TINY_MODEL), max_prompt_length=32)
    with caplog.at_level("WARNING", logger="core.tokenize"):
        left = PromptDataModule(**kw)
        left.setup("fit")
    assert [len(r["input_ids"]) for r in left.val_rows] == [32, 6]  # the task header is what was lost
    assert caplog.messages == [f"truncated 1 of 2 prompts: prompt longer than max_prompt_length 32 (first: {path}:1, "
                               "110 -> 32 tokens, cut from the left)"] * 2  # train file, val file
    skip = PromptDataModule(**kw, truncation="skip")
    skip.setup("fit")
    assert [len(r["input_ids"]) for r in skip.val_rows] == [6]


def render_table() -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["# Bad inputs and the one line each gives", "",
             "`rlhf <stage> ...` prints the message below on stderr, with no traceback, and exits with code "
             f"{cli.DATA_ERROR_EXIT}. `TMP` is the folder of the input. Generated from `tests/test_bad_inputs.py` "
             "(`python -m tests.test_bad_inputs`); a test checks that they agree.", "",
             "| class | example | exact message |", "|---|---|---|"]
    lines += [f"| {cell(c.name)} | {cell(c.example)} | `{cell(c.message)}` |" for c in CASES]
    return "\n".join(lines) + "\n"


def test_table_matches_the_cases():
    assert len(CASES) >= 20 and len({c.name for c in CASES}) == len(CASES)
    assert TABLE.read_text() == render_table(), "regenerate: python -m tests.test_bad_inputs"


def test_rlhf_prints_our_errors_in_one_line_with_their_exit_codes(monkeypatch, capsys):
    from core.models import ModelPathError

    def stage(err: Exception):
        def main(args):
            raise err
        return types.SimpleNamespace(main=main)

    monkeypatch.setitem(cli.STAGES, "fake", "tests.fake_stage")
    for err in [DataError("d.jsonl:3", "invalid JSON", "Expecting value\nat column 1"),
                ModelPathError("m: no such model folder")]:
        monkeypatch.setitem(sys.modules, "tests.fake_stage", stage(err))
        assert cli.main(["fake", "fit"]) == cli.DATA_ERROR_EXIT == 3
        assert capsys.readouterr().err == cli.one_line(err) + "\n"
    from core.guard import NonFiniteError
    from core.outputs import OutputExistsError

    for err, code in [(NonFiniteError("sft: non-finite loss (nan) at optimizer step 3"), 4),
                      (OutputExistsError("out exists and was not written by lightning-rlhf"), 5)]:
        monkeypatch.setitem(sys.modules, "tests.fake_stage", stage(err))
        assert cli.main(["fake", "fit"]) == cli.EXIT_CODES[type(err).__name__] == code
        assert capsys.readouterr().err == f"{err}\n"
    monkeypatch.setitem(sys.modules, "tests.fake_stage", stage(KeyError("other errors keep their traceback")))
    with pytest.raises(KeyError):
        cli.main(["fake", "fit"])


@pytest.mark.slow  # ~10 s: a real `rlhf sft fit` process up to the data module's setup
def test_rlhf_sft_with_bad_data_exits_3_with_one_line_and_no_checkpoint(tmp_path):
    bad = write(tmp_path / "bad.jsonl", [GOOD[read_demonstrations], {"prompt": None, "completion": " A"}])
    out = subprocess.run(
        [sys.executable, "-m", "recipes.cli", "sft", "fit", "--config", "configs/sft/tiny.yaml",
         f"--data.train_file={bad}", f"--trainer.default_root_dir={tmp_path}",
         f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", f"--model.save_dir={tmp_path / 'hf'}"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120,
    )
    line = f"{bad}:2: field 'prompt' is null (expected fields prompt+completion, messages, or chosen)"
    assert out.returncode == 3, out.stderr
    assert "Traceback" not in out.stderr and out.stderr.splitlines()[-1] == line and out.stderr.count(line) == 1
    assert not list(tmp_path.rglob("*.ckpt")) and not (tmp_path / "hf").exists()


if __name__ == "__main__":
    TABLE.write_text(render_table())
    print(f"wrote {TABLE} ({len(CASES)} cases)")
