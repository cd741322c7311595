"""Data tier for PreferenceDataModule: literal collates in both layouts, K-wise pairs and groups, margins, bad rows."""

import json

import pytest
import torch

from core.batches import PaddedRows, PairBatch, RankingBatch
from datamodules.formats import DataError
from datamodules.preference import PreferenceDataModule, collate_pairs, collate_rankings, ranked_pairs

X = -100  # IGNORE_INDEX


def test_collate_pairs_literal():
    # (chosen (prompt, completion), rejected (prompt, completion), margin, index); pad id 0
    rows = [
        (([5, 6], [7, 2]), ([5, 6], [8, 9, 2]), 0.5, 3),
        (([4], [3, 2]), ([4], [9, 2]), 0.0, 7),
    ]
    batch = collate_pairs(rows, pad_id=0)
    assert type(batch) is PairBatch and type(batch.tokens) is PaddedRows  # input_ids, attention_mask, labels
    # rows [0, 2) chosen, rows [2, 4) rejected, right-padded to the longest of all four
    assert batch.tokens.input_ids.tolist() == [
        [5, 6, 7, 2, 0],
        [4, 3, 2, 0, 0],
        [5, 6, 8, 9, 2],
        [4, 9, 2, 0, 0],
    ]
    assert batch.tokens.attention_mask.tolist() == [
        [1, 1, 1, 1, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 1, 0, 0],
    ]
    assert batch.tokens.labels.tolist() == [
        [X, X, 7, 2, X],
        [X, 3, 2, X, X],
        [X, X, 8, 9, 2],
        [X, 9, 2, X, X],
    ]
    assert batch.margin.tolist() == [0.5, 0.0] and batch.margin.dtype == torch.float32
    assert batch.index.tolist() == [3, 7] and batch.index.dtype == torch.long
    chosen, rejected = batch.tokens.input_ids.chunk(2)
    assert chosen[0].tolist()[:4] == [5, 6, 7, 2] and rejected[1].tolist()[:3] == [4, 9, 2]


def test_collate_rankings_literal():
    # (K x (prompt, completion), ranks, margin) per prompt: K = 3 then K = 2
    rows = [
        ([([5], [6, 2]), ([5], [7, 8, 2]), ([5], [9, 2])], [1.0, 0.0, 1.0], 0.0),
        ([([4, 4], [3, 2]), ([4, 4], [1, 2])], [0.0, 1.0], 0.0),
    ]
    batch = collate_rankings(rows, pad_id=0)
    assert type(batch) is RankingBatch and type(batch.tokens) is PaddedRows
    assert batch.tokens.input_ids.tolist() == [
        [5, 6, 2, 0],
        [5, 7, 8, 2],
        [5, 9, 2, 0],
        [4, 4, 3, 2],
        [4, 4, 1, 2],
    ]
    assert batch.tokens.attention_mask.tolist() == [
        [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1],
    ]
    assert batch.tokens.labels.tolist() == [[X, 6, 2, X], [X, 7, 8, 2], [X, 9, 2, X], [X, X, 3, 2], [X, X, 1, 2]]
    assert batch.group.tolist() == [0, 0, 0, 1, 1] and batch.group.dtype == torch.long
    assert batch.ranks.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert batch.margin.tolist() == [0.0, 0.0]  # one per group


def test_ranked_pairs_skip_ties():
    # ranks [1, 0, 2, 1]: 6 pairs of 4 responses minus the tie (0, 3) = 5, better first
    assert ranked_pairs([1, 0, 2, 1]) == [(0, 2), (1, 0), (1, 2), (1, 3), (3, 2)]
    assert len(ranked_pairs([0, 1, 2, 3])) == 6  # C(4, 2)


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _dm(tiny_model_dir, train, val=None, **kw):
    kw = dict(max_length=64, max_prompt_length=32, batch_size=8) | kw
    dm = PreferenceDataModule(train_file=train, val_file=val, tokenizer=str(tiny_model_dir), **kw)
    dm.setup("fit")
    return dm


PROMPT = "Reverse: a b c\nAnswer:"
RANKING = {"prompt": PROMPT, "responses": [" c a b", " c b a", " a b c", " c b b"], "ranks": [1, 0, 2, 1]}
PAIR = {"prompt": PROMPT, "chosen": " c b a", "rejected": " a b c"}


def _decode(dm, ids, labels):
    return dm.tokenizer.decode(ids[labels != X], skip_special_tokens=True)


def test_kwise_ranking_as_pairs_and_as_group(tmp_path, tiny_model_dir):
    path = _write(tmp_path / "r.jsonl", [RANKING, PAIR])
    dm = _dm(tiny_model_dir, path, path)
    batch = next(iter(dm.val_dataloader()))
    assert batch.tokens.input_ids.shape[0] == 2 * 6  # 5 non-tied pairs of the ranking + the pair
    assert batch.index.tolist() == list(range(6))
    chosen, rejected = batch.tokens.input_ids.chunk(2)
    labels_c, labels_r = batch.tokens.labels.chunk(2)
    got = [(_decode(dm, chosen[i], labels_c[i]), _decode(dm, rejected[i], labels_r[i])) for i in range(6)]
    r = RANKING["responses"]
    assert got == [(r[i], r[j]) for i, j in [(0, 2), (1, 0), (1, 2), (1, 3), (3, 2)]] + [(" c b a", " a b c")]
    eos = dm.tokenizer.eos_token_id
    last = batch.tokens.attention_mask.sum(1) - 1  # right padding: the last real token of every row is EOS
    assert (batch.tokens.input_ids[torch.arange(12), last] == eos).all()

    dm = _dm(tiny_model_dir, path, path, layout="rankings")
    batch = next(iter(dm.val_dataloader()))
    assert batch.group.tolist() == [0, 0, 0, 0, 1, 1]  # each response once: 4 rows, then the pair's 2
    assert batch.ranks.tolist() == [1.0, 0.0, 2.0, 1.0, 0.0, 1.0]
    assert batch.margin.shape == (2,)
    assert [_decode(dm, batch.tokens.input_ids[i], batch.tokens.labels[i]) for i in range(4)] == r


def test_prompt_and_completion_from_one_tokenization(tmp_path, tiny_model_dir):
    dm = _dm(tiny_model_dir, _write(tmp_path / "p.jsonl", [PAIR]), _write(tmp_path / "v.jsonl", [PAIR]))
    batch = next(iter(dm.val_dataloader()))
    tok = dm.tokenizer
    full = tok(PROMPT + PAIR["chosen"])["input_ids"] + [tok.eos_token_id]
    n = len(full)
    assert batch.tokens.input_ids[0, :n].tolist() == full
    n_prompt = len(tok(PROMPT)["input_ids"])
    assert batch.tokens.labels[0, :n].tolist() == [X] * n_prompt + full[n_prompt:]


def test_margin_from_strength_and_custom_map(tmp_path, tiny_model_dir):
    rows = [PAIR | {"strength": "Significantly better"}, PAIR | {"margin": 0.25}, PAIR]
    path = _write(tmp_path / "m.jsonl", rows)
    batch = next(iter(_dm(tiny_model_dir, path, path).val_dataloader()))
    assert batch.margin.tolist() == [1.0, 0.25, 0.0]  # Llama 2: significantly better -> 1.0; absent -> 0

    path = _write(tmp_path / "m2.jsonl", [PAIR | {"strength": "much better"}])
    batch = next(iter(_dm(tiny_model_dir, path, path, strength_map={"much better": 2.5}).val_dataloader()))
    assert batch.margin.tolist() == [2.5]
    with pytest.raises(DataError, match=f"{path}:1: unknown strength label"):
        _dm(tiny_model_dir, path, path)


@pytest.mark.parametrize(
    "bad, reason",
    [
        (PAIR | {"rejected": PAIR["chosen"]}, "chosen and rejected are identical"),
        ({"prompt": PROMPT, "responses": [" a b c"], "ranks": [0]}, "fewer than 2 responses"),
        ({"prompt": PROMPT, "responses": [" a", "  "]}, "empty response"),
        ({"chosen": "\n\nHuman: hi\n\nAssistant: yes", "rejected": "\n\nHuman: ho\n\nAssistant: no"},
         "do not share the prompt"),
        ("{not json", "invalid JSON"),
    ],
)
def test_bad_row_names_file_and_line(tmp_path, tiny_model_dir, bad, reason):
    path = _write(tmp_path / "bad.jsonl", [PAIR, bad, RANKING])
    with pytest.raises(DataError, match=reason) as err:
        _dm(tiny_model_dir, path, path)
    assert str(err.value).startswith(f"{path}:2: ")
    dm = _dm(tiny_model_dir, path, path, skip_bad_rows=True)  # skip mode: the good rows stay
    assert len(dm.val_rows) == 1 + 5


def test_tokenization_mismatch_raises_or_drops_its_record(tmp_path, tiny_model_dir):
    # "Answer: " + "c b a": the trailing space merges into the completion's first token
    merged = {"prompt": "Reverse: a b c\nAnswer: ", "chosen": "c b a", "rejected": "a b c"}
    path = _write(tmp_path / "t.jsonl", [PAIR, merged, RANKING])
    with pytest.raises(DataError, match="not a prefix") as err:
        _dm(tiny_model_dir, path, path)
    assert str(err.value).startswith(f"{path}:2: ")
    dm = _dm(tiny_model_dir, path, path, skip_bad_rows=True, layout="rankings")
    assert dm.val_dataloader().dataset and [len(enc) for enc, _, _ in dm.val_rows] == [2, 4]


def test_held_out_split_keeps_prompts_whole(tmp_path, tiny_model_dir):
    rows = [{"prompt": f"Reverse: {c} a b\nAnswer:", "responses": [" b a " + c, " a b " + c, " b b " + c]}
            for c in "abcdefgh"]
    dm = _dm(tiny_model_dir, _write(tmp_path / "t.jsonl", rows), val_fraction=0.25)
    assert len(dm.val_rows) == 2 * 3 and len(dm.train_rows) == 6 * 3  # 3 pairs per prompt, prompts not split
    prompts = {tuple(chosen[0]) for chosen, _, _, _ in dm.val_rows}
    assert len(prompts) == 2 and not prompts & {tuple(chosen[0]) for chosen, _, _, _ in dm.train_rows}
    assert [r[3] for r in dm.train_rows] == list(range(18))  # index: the pair's position, fixed at setup


def test_evaluation_reads_only_the_val_file(tmp_path, tiny_model_dir):
    dm = PreferenceDataModule(str(tmp_path / "missing.jsonl"), _write(tmp_path / "v.jsonl", [PAIR]),
                              tokenizer=str(tiny_model_dir), max_length=64, max_prompt_length=32)
    dm.setup("validate")
    assert len(dm.val_rows) == 1 and not dm.train_rows
    assert next(iter(dm.predict_dataloader())).tokens.input_ids.shape[0] == 2
    with pytest.raises(DataError, match="missing.jsonl: no such file or folder"):
        dm.setup("fit")


def test_rows_identical_after_truncation_are_dropped(tmp_path, tiny_model_dir):
    long = PAIR | {"chosen": " c b a" * 20 + " x", "rejected": " c b a" * 20 + " y"}
    path = _write(tmp_path / "t.jsonl", [long, PAIR])
    dm = _dm(tiny_model_dir, path, path, max_length=24, max_prompt_length=8)
    assert len(dm.val_rows) == 1  # both cut to the same tokens: no preference left to learn


def test_layout_is_checked(tiny_model_dir):
    with pytest.raises(ValueError, match="layout"):
        PreferenceDataModule("x.jsonl", layout="triples")


def test_rating_scale_option(tmp_path, tiny_model_dir):
    rated = {"prompt": PROMPT, "responses": [" c b a", " a b c", " b b b", " c c c"], "ratings": [1e9, -50, 3, 999]}
    path = _write(tmp_path / "r.jsonl", [PAIR, rated])
    with pytest.raises(DataError,
                       match=r"r\.jsonl:2: rating outside rating_scale \[1, 7\] \(ratings\[0\] = 1000000000\.0\)"):
        _dm(tiny_model_dir, path, path)
    dm = _dm(tiny_model_dir, path, path, layout="rankings", rating_scale=(-100, 1e9))
    assert dm.val_rows[1][1] == [0.0, 3.0, 2.0, 1.0]


def test_truncation_skip_drops_the_whole_record(tmp_path, tiny_model_dir, caplog):
    long = RANKING | {"responses": RANKING["responses"][:3] + [" a" * 80], "ranks": [1, 0, 2, 3]}
    path = _write(tmp_path / "t.jsonl", [PAIR, long])
    with caplog.at_level("WARNING"):
        dm = _dm(tiny_model_dir, path, path, layout="rankings", truncation="skip")
    assert [len(enc) for enc, _, _ in dm.val_rows] == [2]
    assert (
        f"skipped (truncation='skip') 1 of 6 sequences: completion longer than max_length 64 allows (first: {path}:2"
        in caplog.text and "dropped 1 of 2 records at tokenization" in caplog.text
    )
    assert len(_dm(tiny_model_dir, path, path, layout="rankings").val_rows) == 2  # left: cut and kept, reported
    with pytest.raises(DataError, match=f"{path}:2: completion longer than max_length 64 allows"):
        _dm(tiny_model_dir, path, path, truncation="error")


def test_bootstrap_resamples_training_prompts_seeded_and_leaves_validation(tmp_path, tiny_model_dir, monkeypatch):
    rows = [{"prompt": f"Reverse: {c} a b\nAnswer:", "responses": [" b a " + c, " a b " + c, " b b " + c]}
            for c in "abcdefgh"]
    path = _write(tmp_path / "t.jsonl", rows)

    def letters(dm, split):  # the varying letter of each record's prompt, in row order
        return [dm.tokenizer.decode(enc[0][0]).split()[1] for enc, _, _ in getattr(dm, split)]

    base = _dm(tiny_model_dir, path, val_fraction=0.25, layout="rankings")
    train = letters(base, "train_rows")
    assert len(train) == 6 and len(base.val_rows) == 2
    # random.Random(3).randrange(6) six times draws records 1, 4, 4, 1, 2, 4 (with replacement)
    dm = _dm(tiny_model_dir, path, val_fraction=0.25, layout="rankings", bootstrap=True, bootstrap_seed=3)
    assert letters(dm, "train_rows") == [train[i] for i in (1, 4, 4, 1, 2, 4)]
    assert letters(dm, "val_rows") == letters(base, "val_rows")  # held-out prompts untouched
    # no seed given: the run's seed_everything (PL_GLOBAL_SEED); Random(4) draws 1, 2, 0, 5, 3, 3
    monkeypatch.setenv("PL_GLOBAL_SEED", "4")
    dm = _dm(tiny_model_dir, path, val_fraction=0.25, layout="rankings", bootstrap=True)
    assert letters(dm, "train_rows") == [train[i] for i in (1, 2, 0, 5, 3, 3)]
    # pairs layout: a drawn prompt brings all its 3 pairs, and pairs are renumbered 0..17
    dm = _dm(tiny_model_dir, path, val_fraction=0.25, bootstrap=True, bootstrap_seed=3)
    assert [dm.tokenizer.decode(chosen[0]).split()[1] for chosen, _, _, _ in dm.train_rows[::3]] == \
        [train[i] for i in (1, 4, 4, 1, 2, 4)]
    assert [r[3] for r in dm.train_rows] == list(range(18))
    assert len(dm.val_rows) == 2 * 3


# ---- found in review: one prompt per comparison, chat replies after a space, BOS kept, empty HH replies ----

def test_both_responses_of_a_pair_keep_the_same_prompt_tokens_when_cut(tiny_model_dir, tmp_path):
    prompt = "Reverse: " + " ".join("abcdefgh" * 10) + "\nAnswer:"
    row = {"prompt": prompt, "chosen": " a", "rejected": " " + " ".join("hgfedcba" * 2)}
    path = _write(tmp_path / "t.jsonl", [row])
    dm = _dm(tiny_model_dir, path, path, max_length=48, max_prompt_length=16)
    (chosen, rejected, _, _), = dm.train_rows
    # the long reply decides: its prompt keeps 48 - len(reply) tokens (more than max_prompt_length 16), and the
    # short reply's prompt is cut to the same tokens, though 48 - 2 would fit beside it
    assert len(rejected[0]) == 48 - len(rejected[1]) > 16 and len(chosen[0]) + len(chosen[1]) < 48
    assert chosen[0] == rejected[0]


def test_a_reply_to_chat_messages_follows_assistant_after_a_space_as_in_sft(tiny_model_dir, tmp_path):
    from core.models import load_tokenizer

    row = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Sure", "rejected": "No"}
    path = _write(tmp_path / "t.jsonl", [row])
    dm = _dm(tiny_model_dir, path, path)
    (chosen, rejected, _, _), = dm.train_rows
    tok = load_tokenizer(str(tiny_model_dir))
    assert tok.decode(chosen[0]).endswith("Assistant:")  # no chat template: HH style
    assert tok.decode(chosen[1][:-1]) == " Sure" and tok.decode(rejected[1][:-1]) == " No"  # not "Assistant:Sure"


def test_a_prompt_cut_from_the_left_keeps_its_bos(bos_model_dir):
    from core.models import load_tokenizer
    from core.tokenize import encode_completions, encode_prompts

    tok = load_tokenizer(str(bos_model_dir))
    bos = tok.bos_token_id
    prompt = "x" * 40 + " Answer:"
    ((p, c),) = encode_completions(tok, [prompt], [" ok"], ["t:1"], max_length=20, max_prompt_length=10)
    assert p[0] == bos and len(p) == 20 - len(c) and tok.decode(p[1:]).endswith("Answer:")
    records = [type("R", (), {"prompt": prompt, "where": "t:1", "meta": {}})()]
    (row,) = encode_prompts(records, tok, 10)
    assert row["input_ids"][0] == bos and len(row["input_ids"]) == 10


def test_an_hh_pair_whose_chosen_reply_is_empty_trains_on_eos_alone(tiny_model_dir, tmp_path):
    row = {"chosen": "\n\nHuman: Insult me\n\nAssistant:", "rejected": "\n\nHuman: Insult me\n\nAssistant: You fool"}
    path = _write(tmp_path / "t.jsonl", [row])
    dm = _dm(tiny_model_dir, path, path)
    (chosen, rejected, _, _), = dm.train_rows
    assert chosen[1] == [dm.tokenizer.eos_token_id] and len(rejected[1]) > 1
