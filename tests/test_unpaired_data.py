"""Unpaired (KTO) data: {prompt, completion, label} rows, literal collated tensors with the mismatched rows, and the
PreferenceDataModule's layout "unpaired"."""

import json

import pytest
import torch

from core.batches import UnpairedBatch
from core.ops import IGNORE_INDEX
from core.sources import DataError
from datamodules.unpaired import Judgement, collate_unpaired, mismatched_rows, read_judgements
from tests.conftest import SYNTHETIC, TINY_MODEL


def write(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_label_forms_and_chat_completion(tmp_path):
    chat = [{"role": "user", "content": "hi"}]
    rows = [{"prompt": "Q", "completion": " a", "label": True}, {"prompt": "Q", "completion": " b", "label": 0},
            {"prompt": chat, "completion": [{"role": "assistant", "content": "yo"}], "label": "TRUE"},
            {"prompt": "Q", "completion": " c", "label": " false"}]
    got = read_judgements(write(tmp_path / "u.jsonl", rows))
    where = str(tmp_path / "u.jsonl")
    assert got == [Judgement("Q", " a", True, f"{where}:1"), Judgement("Q", " b", False, f"{where}:2"),
                   Judgement(chat, "yo", True, f"{where}:3"), Judgement("Q", " c", False, f"{where}:4")]
    assert got[0].responses == (" a",)


def test_csv_labels(tmp_path):
    (tmp_path / "u.csv").write_text("prompt,completion,label\nQ, a,true\nQ, b,False\nQ, c,1\n")
    assert [j.desirable for j in read_judgements(str(tmp_path / "u.csv"))] == [True, False, True]


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Q", "completion": " a"}, "missing field 'label' (true = desirable, false = undesirable)"),
    ({"prompt": "Q", "completion": " a", "label": None},
     "field 'label' is null (true = desirable, false = undesirable)"),
    ({"prompt": "Q", "completion": " a", "label": "good"}, "field 'label' is not true or false (got 'good')"),
    ({"prompt": "Q", "completion": " a", "label": 2}, "field 'label' is not true or false (got 2)"),
    ({"prompt": "Q", "completion": " a", "label": 1.0}, "field 'label' is not true or false (got 1.0)"),
    ({"prompt": "Q", "label": True}, "missing field 'completion'"),
    ({"completion": " a", "label": True}, "missing field 'prompt'"),
    ({"prompt": "Q", "completion": " ", "label": True}, "empty field 'completion'"),
    ({"prompt": "Q", "completion": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
      "label": True}, "field 'completion' holds more than the assistant reply (2 messages; earlier turns belong in "
                      "'prompt')"),
    ({"question": "Q", "label": True}, "expected fields prompt+completion+label (got question, label)"),
])
def test_bad_rows_name_file_line_and_reason(tmp_path, row, message):
    path = write(tmp_path / "u.jsonl", [{"prompt": "Q", "completion": " a", "label": True}, row])
    with pytest.raises(DataError) as err:
        read_judgements(path)
    assert str(err.value) == f"{path}:2: {message}"
    # skip mode counts it and keeps the good row
    assert len(read_judgements(path, skip_bad_rows=True)) == 1


def test_collate_literal_tensors_with_mismatched_rows():
    rows = [(([5, 6], [7, 2]), True, 0), (([5, 6], [8, 9, 2]), False, 1), (([3], [4, 2]), True, 2)]
    batch = collate_unpaired(rows, pad_id=0, max_length=4)
    assert isinstance(batch, UnpairedBatch)
    assert batch.tokens.input_ids.tolist() == [[5, 6, 7, 2, 0], [5, 6, 8, 9, 2], [3, 4, 2, 0, 0]]
    assert batch.tokens.labels.tolist() == [[-100, -100, 7, 2, -100], [-100, -100, 8, 9, 2], [-100, 4, 2, -100, -100]]
    # row 0's next row shares its prompt, so it takes row 2's completion; row 1 takes row 2's; row 2 takes row 0's.
    # [3] + [7, 2] fits; [5, 6] + [4, 2] fits max_length 4
    assert batch.kl_tokens.input_ids.tolist() == [[5, 6, 4, 2], [5, 6, 4, 2], [3, 7, 2, 0]]
    assert batch.kl_tokens.labels.tolist() == [[IGNORE_INDEX] * 2 + [4, 2], [IGNORE_INDEX] * 2 + [4, 2],
                                               [IGNORE_INDEX, 7, 2, IGNORE_INDEX]]
    assert batch.kl_tokens.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch.desirable.tolist() == [True, False, True] and batch.index.tolist() == [0, 1, 2]


def test_mismatched_rows_cut_to_max_length_and_fall_back_to_the_next_row():
    # prompt [1, 2, 3] + completion [4, 5, 6, 2] cut to max_length 5: [4, 5]
    assert mismatched_rows([([1, 2, 3], [7, 2]), ([9], [4, 5, 6, 2])], 5) == [([1, 2, 3], [4, 5]), ([9], [7, 2])]
    same = [([1], [7, 2]), ([1], [8, 2])]  # every prompt the same: the next row's completion
    assert mismatched_rows(same, 8) == [([1], [8, 2]), ([1], [7, 2])]
    assert mismatched_rows([([1], [7, 2])], 8) == [([1], [7, 2])]  # b = 1: the row itself


def test_datamodule_layout_unpaired(tmp_path):
    from datamodules.preference import PreferenceDataModule

    dm = PreferenceDataModule(str(SYNTHETIC / "unpaired_train.jsonl"), str(SYNTHETIC / "unpaired_val.jsonl"),
                              tokenizer=str(TINY_MODEL), layout="unpaired", max_length=64, max_prompt_length=32,
                              batch_size=4)
    dm.setup("fit")
    assert len(dm.train_rows) == 512 and len(dm.val_rows) == 64
    batch = next(iter(dm.val_dataloader()))
    assert isinstance(batch, UnpairedBatch) and batch.tokens.input_ids.shape[0] == 4
    assert batch.kl_tokens.input_ids.shape[0] == 4 and batch.index.tolist() == [0, 1, 2, 3]
    labels = [json.loads(x)["label"] for x in (SYNTHETIC / "unpaired_val.jsonl").read_text().splitlines()[:4]]
    assert batch.desirable.tolist() == labels
    assert torch.equal(batch.tokens.labels != IGNORE_INDEX, batch.tokens.labels >= 0)
    # predict (a DPO policy samples from the prompts) reads the same file's prompts
    assert len(dm._prompt_rows()) == 64
    with pytest.raises(ValueError, match="drop packing and share_prompt"):
        PreferenceDataModule("x", layout="unpaired", packing=True)


def test_reward_models_refuse_unpaired_data_before_loading(run_recipe, monkeypatch):
    import modules.reward as reward

    monkeypatch.setattr(reward, "load_sequence_classifier", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ValueError, match="data.layout 'unpaired' is for `rlhf dpo` with loss_type kto"):
        run_recipe("reward", "fit", "--config", "configs/reward/tiny.yaml", "--data.layout=unpaired",
                   f"--data.train_file={SYNTHETIC / 'unpaired_train.jsonl'}",
                   f"--data.val_file={SYNTHETIC / 'unpaired_val.jsonl'}")
