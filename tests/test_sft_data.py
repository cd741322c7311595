"""Data tier: literal tensors for small collates, tokenization contract, bad rows named by file and line."""

import json

import pytest
import torch

from core.batches import PackedRows
from core.models import load_tokenizer
from core.packing import pad_completions
from core.tokenize import encode_completions
from datamodules.formats import DataError
from datamodules.sft import SFTDataModule, collate_packed, pack

X = -100


def test_pad_completions_literal():
    rows = [([5, 6], [7, 2]), ([5], [8, 9, 2])]  # (prompt ids, completion ids ending with EOS=2)
    batch = pad_completions(rows, pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 2], [5, 8, 9, 2]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    assert batch.labels.tolist() == [[X, X, 7, 2], [X, 8, 9, 2]]
    short = pad_completions([([5], [7, 2]), ([5, 6, 6], [8, 2])], pad_id=0)
    assert short.input_ids.tolist() == [[5, 7, 2, 0, 0], [5, 6, 6, 8, 2]]
    assert short.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert short.labels.tolist() == [[X, 7, 2, X, X], [X, X, X, 8, 2]]
    # a fixed length pads every row to it: rows of 3 and 2 tokens, length 4 -> 1 and 2 pad columns
    wide = pad_completions([([5], [7, 2]), ([6], [2])], pad_id=0, length=4)
    assert wide.input_ids.tolist() == [[5, 7, 2, 0], [6, 2, 0, 0]]
    assert wide.attention_mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
    assert wide.labels.tolist() == [[X, 7, 2, X], [X, 2, X, X]]


def test_collate_packed_literal_restarts_positions():
    bins = [[([5], [7, 2]), ([6, 6], [2])], [([5], [8, 2])]]
    batch = collate_packed(bins, pad_id=0)
    assert batch.input_ids.tolist() == [[5, 7, 2, 6, 6, 2], [5, 8, 2, 0, 0, 0]]
    assert batch.labels.tolist() == [[X, 7, 2, X, X, 2], [X, 8, 2, X, X, X]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 2], [0, 1, 2, 0, 1, 2]]
    assert batch.sequence_ids.tolist() == [[0, 0, 0, 1, 1, 1], [2, 2, 2, -1, -1, -1]]
    assert isinstance(batch, PackedRows) and not hasattr(batch, "attention_mask")


def test_pack_first_fit_respects_max_length():
    rows = [([1] * 3, [2]), ([1] * 5, [2]), ([1], [2]), ([1] * 2, [2])]  # lengths 4, 6, 2, 3
    bins = pack(rows, max_length=8, seed=0)
    assert all(sum(len(p) + len(c) for p, c in b) <= 8 for b in bins)
    assert sum(len(b) for b in bins) == 4


def test_encode_completions_prefix_eos_and_truncation(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    prompt, completion = "Reverse: a b c\nAnswer:", " c b a"
    (p, c), = encode_completions(tok, [prompt], [completion], ["x.jsonl:1"], 64, 32)
    full = tok(prompt + completion)["input_ids"]
    assert p + c[:-1] == full and c[-1] == tok.eos_token_id
    assert p == tok(prompt)["input_ids"]
    # over max_length the prompt is cut from the left (keeping its end), the completion kept with EOS
    (p2, c2), = encode_completions(tok, [prompt], [completion], ["x.jsonl:1"], len(c) + 3, 2)
    assert c2 == c and p2 == p[-3:]
    # when even max_prompt_length of prompt leaves no room, the completion is cut from the right
    (p3, c3), = encode_completions(tok, [prompt], [completion], ["x.jsonl:1"], 4, 2)
    assert p3 == p[-2:] and c3 == c[:2]


def test_encode_completions_prefix_mismatch_names_row(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    # "Answer" split as "Ans" + "wer" merges across the boundary in BPE
    with pytest.raises(DataError, match=r"d.jsonl:7: .*prefix"):
        encode_completions(tok, ["Reverse: a\nAns"], ["wer: a"], ["d.jsonl:7"], 64, 32)
    kept = encode_completions(tok, ["Reverse: a\nAns", "Reverse: b\nAnswer:"], ["wer: a", " b"], ["d:1", "d:2"],
                              64, 32, True)
    assert len(kept) == 1


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_datamodule_bad_row_stops_before_training(tmp_path, tiny_model_dir):
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "Reverse: a b\nAnswer:", "completion": " b a"}, {"prompt": "x"}])
    dm = SFTDataModule(train_file=bad, tokenizer=str(tiny_model_dir), max_length=32, max_prompt_length=16)
    with pytest.raises(DataError, match=r"bad.jsonl:2: .*completion"):
        dm.setup("fit")


def test_datamodule_skip_bad_rows_and_batches(tmp_path, tiny_model_dir, caplog):
    rows = [{"prompt": "Reverse: a b\nAnswer:", "completion": " b a"}] * 4 + ["{not json", {"prompt": "p"}]
    src = _write(tmp_path / "d.jsonl", rows)
    dm = SFTDataModule(
        train_file=src, val_file=src, tokenizer=str(tiny_model_dir), max_length=32, max_prompt_length=16,
        batch_size=2, skip_bad_rows=True,
    )
    dm.setup("fit")
    assert len(dm.train_rows) == 4
    assert "skipped 2 of 6 rows" in caplog.text and "1 invalid JSON" in caplog.text
    batch = next(iter(dm.train_dataloader()))
    assert batch.input_ids.shape[0] == 2
    assert ((batch.labels != X) <= (batch.attention_mask == 1)).all()


def test_datamodule_packing_keeps_all_tokens(synthetic_dir, tiny_model_dir):
    kw = dict(train_file=str(synthetic_dir / "sft_train.jsonl"), val_file=str(synthetic_dir / "sft_val.jsonl"),
              tokenizer=str(tiny_model_dir), max_length=64, max_prompt_length=32, batch_size=4)
    plain, packed = SFTDataModule(**kw), SFTDataModule(**kw, packing=True)
    plain.setup("fit")
    packed.setup("fit")
    n_plain = sum(len(p) + len(c) for p, c in plain.train_rows)
    n_packed = sum(len(p) + len(c) for b in packed.train_rows for p, c in b)
    assert n_plain == n_packed and len(packed.train_rows) < len(plain.train_rows)
    batch = next(iter(packed.train_dataloader()))
    assert batch.input_ids.shape[1] <= 64 and torch.equal(batch.position_ids[:, 0], torch.zeros(4, dtype=torch.long))


def test_chat_messages_without_template_get_a_space_after_assistant(tmp_path, tiny_model_dir):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    src = _write(tmp_path / "chat.jsonl", rows)
    dm = SFTDataModule(train_file=src, val_file=src, tokenizer=str(tiny_model_dir), max_length=64, max_prompt_length=32)
    dm.setup("fit")
    (p, c), = dm.train_rows
    assert dm.tokenizer.decode(p + c[:-1]) == "\n\nHuman: hi\n\nAssistant: hello"
    assert c[-1] == dm.tokenizer.eos_token_id


def test_truncation_is_reported_per_reason_with_the_first_row(tiny_model_dir, caplog):
    tok = load_tokenizer(str(tiny_model_dir))
    prompts = ["Reverse: a b c\nAnswer:", "Reverse:" + " a b" * 20 + "\nAnswer:", "Reverse: a\nAnswer:"]
    completions = [" c b a", " b a", " a b" * 30]  # row 2: long prompt, row 3: long completion
    wheres = ["d.jsonl:1", "d.jsonl:2", "d.jsonl:3"]
    with caplog.at_level("WARNING", logger="core.tokenize"):
        rows = encode_completions(tok, prompts, completions, wheres, 24, 8)
    assert [len(p) + len(c) for p, c in rows][1:] == [24, 24] and rows[2][1][-1] != tok.eos_token_id
    n_prompt, n_completion = len(tok(prompts[1])["input_ids"]), len(tok(completions[2])["input_ids"]) + 1
    assert caplog.messages == [
        f"truncated 1 of 3 sequences: prompt longer than max_length 24 allows (first: d.jsonl:2, {n_prompt} -> "
        f"{24 - len(rows[1][1])} tokens, cut from the left)",
        f"truncated 1 of 3 sequences: completion longer than max_length 24 allows (first: d.jsonl:3, {n_completion}"
        f" -> {24 - len(rows[2][0])} tokens, cut from the right, with its EOS)",
    ]
    caplog.clear()
    with caplog.at_level("WARNING", logger="core.tokenize"):
        kept = encode_completions(tok, prompts, completions, wheres, 24, 8, truncation="skip", aligned=True)
    assert kept[0] == rows[0] and kept[1:] == [None, None]
    assert caplog.messages[0].startswith("skipped (truncation='skip') 1 of 3 sequences: prompt longer than")
    with pytest.raises(DataError, match=r"^d\.jsonl:2: prompt longer than max_length 24 allows \(\d+ of \d+ tokens"):
        encode_completions(tok, prompts, completions, wheres, 24, 8, truncation="error")
    with pytest.raises(ValueError, match="truncation must be one of error, left, skip"):
        encode_completions(tok, prompts, completions, wheres, 24, 8, truncation="right")


def test_datamodule_truncation_skip_drops_rows(tmp_path, tiny_model_dir):
    rows = [{"prompt": "Reverse: a b\nAnswer:", "completion": " b a"}] * 3 + [{"prompt": "P", "completion": " a" * 80}]
    src = _write(tmp_path / "d.jsonl", rows)
    kw = dict(train_file=src, val_file=src, tokenizer=str(tiny_model_dir), max_length=32, max_prompt_length=16)
    left, skip = SFTDataModule(**kw), SFTDataModule(**kw, truncation="skip")
    left.setup("fit")
    skip.setup("fit")
    assert len(left.train_rows) == 4 and len(skip.train_rows) == 3
    with pytest.raises(DataError, match=r"d\.jsonl:4: completion longer than max_length 32 allows"):
        SFTDataModule(**kw, truncation="error").setup("fit")
