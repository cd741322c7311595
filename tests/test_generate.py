"""`rlhf generate`: rows and their fields, finish reasons, seeds, resume, parts, checkpoint vs exported folder,
adapters."""

import json
import shutil

import pytest
import torch

from recipes import cli

TINY = "configs/sft/tiny.yaml"


@pytest.fixture
def prompts(tmp_path, synthetic_dir):
    """5 prompts of the built-in task; their `target` column is meta."""
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(synthetic_dir.joinpath("prompts_val.jsonl").read_text().splitlines(True)[:5]))
    return path


def generate(model, prompts, out, *extra) -> list[dict]:
    args = ["generate", "--model", str(model), "--prompts", str(prompts), "--out", str(out), "--device", "cpu",
            "--max_new_tokens", "8", *extra]
    assert cli.main(args) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_rows_and_fields(tiny_model_dir, prompts, tmp_path):
    rows = generate(tiny_model_dir, prompts, tmp_path / "out.jsonl", "--num_samples", "2", "--batch_size", "2")
    assert [(r["index"], r["sample"]) for r in rows] == [(i, s) for i in range(5) for s in range(2)]
    first = json.loads(prompts.read_text().splitlines()[0])
    assert rows[0]["prompt"] == first["prompt"] and rows[0]["meta"] == {"target": first["target"]}
    assert set(rows[0]) == {"prompt", "response", "sample", "finish_reason", "tokens", "index", "meta"}
    assert all(r["finish_reason"] == "length" and r["tokens"] == 8 and isinstance(r["response"], str) for r in rows)


def test_chat_messages_get_rendered(tiny_model_dir, tmp_path):
    prompts = tmp_path / "chat.jsonl"
    prompts.write_text(json.dumps({"prompt": [{"role": "user", "content": "Reverse: a b"}], "id": 7}) + "\n")
    [row] = generate(tiny_model_dir, prompts, tmp_path / "out.jsonl")
    # the tiny tokenizer has no chat template: HH style, as PPO and rejection sampling render it
    assert row["prompt"] == "\n\nHuman: Reverse: a b\n\nAssistant:" and row["meta"] == {"id": 7}


def test_finish_reasons_eos_stop_and_length(tiny_model_dir, prompts, tmp_path):
    from transformers import AutoTokenizer

    # the random tiny model greedily writes ":" after every prompt
    rows = generate(tiny_model_dir, prompts, tmp_path / "greedy.jsonl", "--temperature", "0", "--max_new_tokens", "4")
    assert {(r["response"], r["finish_reason"], r["tokens"]) for r in rows} == {("::::", "length", 4)}
    rows = generate(tiny_model_dir, prompts, tmp_path / "stop.jsonl", "--temperature", "0", "--stop", ":::")
    assert {(r["response"], r["finish_reason"], r["tokens"]) for r in rows} == {(":::", "stop", 3)}
    # the same weights with ":" as the EOS token: every row ends at its first token, EOS not in the text
    eos_model = tmp_path / "eos-colon"
    shutil.copytree(tiny_model_dir, eos_model)
    tok = AutoTokenizer.from_pretrained(eos_model)
    tok.eos_token = ":"
    tok.save_pretrained(eos_model)
    rows = generate(eos_model, prompts, tmp_path / "eos.jsonl", "--temperature", "0")
    assert {(r["response"], r["finish_reason"], r["tokens"]) for r in rows} == {("", "eos", 1)}


def test_same_seed_same_rows_other_seed_other_rows(tiny_model_dir, prompts, tmp_path):
    a = generate(tiny_model_dir, prompts, tmp_path / "a.jsonl", "--seed", "3", "--num_samples", "2")
    b = generate(tiny_model_dir, prompts, tmp_path / "b.jsonl", "--seed", "3", "--num_samples", "2")
    c = generate(tiny_model_dir, prompts, tmp_path / "c.jsonl", "--seed", "4", "--num_samples", "2")
    assert a == b
    assert [r["response"] for r in a] != [r["response"] for r in c]


def test_resumed_run_writes_each_prompt_once_and_the_same_rows(tiny_model_dir, prompts, tmp_path, capsys):
    args = ("--num_samples", "2", "--batch_size", "2", "--seed", "1")
    full = tmp_path / "full.jsonl"
    generate(tiny_model_dir, prompts, full, *args)
    lines = full.read_text().splitlines(True)
    out = tmp_path / "out.jsonl"
    # killed while writing prompt 3: its sample 0 is there, sample 1 cut mid-line
    out.write_text("".join(lines[:7]) + lines[7][:20])
    rows = generate(tiny_model_dir, prompts, out, *args)
    assert out.read_text() == full.read_text()
    assert [r["index"] for r in rows].count(3) == 2 and len(rows) == 10
    # a file ending inside a batch (prompt 2 of batch [2, 3]): that batch is resampled, only prompt 3 written
    out.write_text("".join(lines[:6]))
    generate(tiny_model_dir, prompts, out, *args)
    assert out.read_text() == full.read_text()
    # finished: a rerun writes nothing
    capsys.readouterr()
    generate(tiny_model_dir, prompts, out, *args)
    assert out.read_text() == full.read_text() and "already holds all 5 prompts" in capsys.readouterr().err


def test_parts_cut_the_prompts_into_contiguous_slices_that_keep_their_file_index(tiny_model_dir, synthetic_dir,
                                                                                 tmp_path):
    from recipes.generate import part_bounds

    # 10 prompts in 3 parts: 10 = 3 * 3 + 1, so the first part gets one more: 4, 3, 3 rows -> [0, 4), [4, 7), [7, 10)
    assert [part_bounds(10, i, 3) for i in (1, 2, 3)] == [(0, 4), (4, 7), (7, 10)]
    # 11 prompts in 3 parts: 11 = 3 * 3 + 2: 4, 4, 3
    assert [part_bounds(11, i, 3) for i in (1, 2, 3)] == [(0, 4), (4, 8), (8, 11)]
    assert part_bounds(10, 1, 1) == (0, 10)
    prompts = tmp_path / "prompts10.jsonl"
    lines = synthetic_dir.joinpath("prompts_val.jsonl").read_text().splitlines(True)[:10]
    prompts.write_text("".join(lines))
    indices = []
    for part, expected in [(1, [0, 1, 2, 3]), (2, [4, 5, 6]), (3, [7, 8, 9])]:
        rows = generate(tiny_model_dir, prompts, tmp_path / f"part{part}.jsonl", "--part", str(part), "--parts", "3",
                        "--num_samples", "2", "--batch_size", "2")
        assert [(r["index"], r["sample"]) for r in rows] == [(i, s) for i in expected for s in range(2)]
        # each row's prompt and meta are those of its row in the whole file
        assert all(r["meta"] == {"target": json.loads(lines[r["index"]])["target"]} for r in rows)
        indices += [r["index"] for r in rows]
    assert sorted(set(indices)) == list(range(10))


def test_a_part_resumes_after_its_last_finished_prompt(tiny_model_dir, synthetic_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts10.jsonl"
    prompts.write_text("".join(synthetic_dir.joinpath("prompts_val.jsonl").read_text().splitlines(True)[:10]))
    args = ("--part", "2", "--parts", "3", "--num_samples", "2", "--batch_size", "2", "--seed", "1")
    full = tmp_path / "full.jsonl"
    generate(tiny_model_dir, prompts, full, *args)  # prompts 4, 5, 6: 6 rows
    lines = full.read_text().splitlines(True)
    assert len(lines) == 6 and json.loads(lines[0])["index"] == 4
    out = tmp_path / "out.jsonl"
    # killed while writing prompt 5 (the part's 2nd): prompt 4 whole, prompt 5's sample 0 there, sample 1 cut
    out.write_text("".join(lines[:3]) + lines[3][:20])
    capsys.readouterr()
    generate(tiny_model_dir, prompts, out, *args)
    assert "continuing after 1 of 3 prompts" in capsys.readouterr().err
    assert out.read_text() == full.read_text()
    # finished: a rerun writes nothing
    generate(tiny_model_dir, prompts, out, *args)
    assert out.read_text() == full.read_text() and "already holds all 3 prompts" in capsys.readouterr().err
    # another part on the same --out does not continue it
    argv = ["generate", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--out", str(out),
            "--part", "3", "--parts", "3", "--num_samples", "2"]
    assert cli.main(argv) == 3
    assert f"{out}:1: does not continue this run (expected prompt 7 sample 0" in capsys.readouterr().err


@pytest.mark.parametrize("extra, says", [
    (["--part", "1"], "--part and --parts go together"),
    (["--parts", "2"], "--part and --parts go together"),
    (["--part", "1", "--parts", "0"], "--parts must be at least 1, got 0"),
    (["--part", "0", "--parts", "2"], "--part must be in 1..2 (--parts), got 0"),
    (["--part", "3", "--parts", "2"], "--part must be in 1..2 (--parts), got 3"),
    (["--part", "6", "--parts", "6"], "--part 6 --parts 6: that part of"),  # 5 prompts: parts 1 each, the 6th none
])
def test_bad_parts_are_refused(tiny_model_dir, prompts, tmp_path, capsys, extra, says):
    argv = ["generate", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl"),
            *extra]
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_an_output_of_another_run_is_refused(tiny_model_dir, prompts, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    generate(tiny_model_dir, prompts, out, "--num_samples", "2")
    before = out.read_text()
    argv = ["generate", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--out", str(out),
            "--num_samples", "3"]
    capsys.readouterr()
    assert cli.main(argv) == 3
    err = capsys.readouterr().err
    assert f"{out}:3: does not continue this run" in err and len(err.strip().splitlines()) == 1
    assert out.read_text() == before


def test_missing_model_or_prompts_is_one_line_exit_3(tiny_model_dir, prompts, tmp_path, capsys):
    out = str(tmp_path / "out.jsonl")
    for model, prompt_file, says in [(tmp_path / "nope", prompts, "no such model folder"),
                                     (tmp_path / "nope.ckpt", prompts, "no such checkpoint file"),
                                     (tiny_model_dir, tmp_path / "nope.jsonl", "no such file")]:
        capsys.readouterr()
        assert cli.main(["generate", "--model", str(model), "--prompts", str(prompt_file), "--out", out]) == 3
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1


def test_reward_checkpoint_is_not_a_policy(prompts, tmp_path):
    ckpt = tmp_path / "reward.ckpt"
    torch.save({"stage": "reward", "hyper_parameters": {"backbone": {"path": "x"}}, "state_dict": {}}, ckpt)
    with pytest.raises(SystemExit, match="reward-model checkpoint, not a policy"):
        cli.main(["generate", "--model", str(ckpt), "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl")])


def test_checkpoint_weights_must_match_the_policy_they_describe(tiny_model_dir, prompts, tmp_path):
    ckpt = tmp_path / "sft.ckpt"
    torch.save({"stage": "sft", "hyper_parameters": {"policy": {"path": str(tiny_model_dir)}},
                "state_dict": {"policy.lm_head.extra": torch.zeros(1)}}, ckpt)
    with pytest.raises(SystemExit, match="does not match the policy"):
        cli.main(["generate", "--model", str(ckpt), "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl")])


def test_checkpoint_generates_what_its_exported_folder_does(run_recipe, tiny_model_dir, prompts, tmp_path):
    export = tmp_path / "export"
    run_recipe("sft", "fit", "--config", TINY, "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
               f"--model.save_dir={export}")
    ckpt = next((tmp_path / "runs").rglob("last.ckpt"))
    args = ("--num_samples", "2", "--seed", "7")
    from_ckpt = generate(ckpt, prompts, tmp_path / "ckpt.jsonl", *args)
    from_export = generate(export, prompts, tmp_path / "export.jsonl", *args)
    base = generate(tiny_model_dir, prompts, tmp_path / "base.jsonl", *args)
    assert from_ckpt == from_export
    assert from_ckpt != base  # the trained weights were loaded, not the base's


def test_adapter_folder_generates_what_the_merged_model_does(tiny_model_dir, prompts, tmp_path):
    from core.models import LoraSpec, ModelSpec, load_causal_lm, load_tokenizer, save_hf

    spec = ModelSpec(path=str(tiny_model_dir), lora=LoraSpec(r=2, alpha=4, dropout=0.0))
    model = load_causal_lm(spec)
    torch.manual_seed(0)
    with torch.no_grad():  # a non-zero adapter, so it changes what the model writes
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    save_hf(model, load_tokenizer(spec), tmp_path / "adapter", merge_lora=False)
    save_hf(model, load_tokenizer(spec), tmp_path / "merged", merge_lora=True)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    args = ("--num_samples", "2", "--seed", "5")
    adapter = generate(tmp_path / "adapter", prompts, tmp_path / "a.jsonl", *args)
    merged = generate(tmp_path / "merged", prompts, tmp_path / "m.jsonl", *args)
    base = generate(tiny_model_dir, prompts, tmp_path / "b.jsonl", *args)
    assert [r["response"] for r in adapter] == [r["response"] for r in merged]
    assert [r["response"] for r in adapter] != [r["response"] for r in base]


def test_lora_checkpoint_generates_what_its_adapter_export_does(run_recipe, prompts, tmp_path):
    export = tmp_path / "adapter"
    run_recipe("sft", "fit", "--config", TINY, "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
               "--model.policy.lora.r=2", "--model.merge_lora=false", f"--model.save_dir={export}")
    assert (export / "adapter_config.json").is_file()
    ckpt = next((tmp_path / "runs").rglob("last.ckpt"))
    assert all("lora_" in k for k in torch.load(ckpt, weights_only=True)["state_dict"])  # adapter weights only
    args = ("--num_samples", "2", "--seed", "7")
    assert (generate(ckpt, prompts, tmp_path / "ckpt.jsonl", *args)
            == generate(export, prompts, tmp_path / "a.jsonl", *args))


# ---- found in review: resume settings, sampling values, a kill inside a character ----

def test_a_file_is_continued_only_with_the_settings_that_started_it(tiny_model_dir, prompts, tmp_path, capsys):
    args = ("--num_samples", "2", "--batch_size", "2", "--seed", "1")
    out = tmp_path / "out.jsonl"
    generate(tiny_model_dir, prompts, out, *args)
    lines = out.read_text().splitlines(True)
    out.write_text("".join(lines[:4]))  # killed after prompt 1
    argv = ["generate", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--out", str(out), "--device",
            "cpu", "--max_new_tokens", "8", "--num_samples", "2", "--batch_size", "2"]
    capsys.readouterr()
    for other in (["--seed", "2"], ["--seed", "1", "--temperature", "0.5"], ["--seed", "1", "--batch_size", "3"]):
        assert cli.main(argv + other) == 5
        err = capsys.readouterr().err
        assert "holds samples of a run with other" in err and "nothing was changed" in err
        assert out.read_text() == "".join(lines[:4])
    assert generate(tiny_model_dir, prompts, out, *args) and out.read_text() == "".join(lines)


@pytest.mark.parametrize("extra, says", [
    (["--stop", ""], "stop string '': must be non-empty text"),
    (["--temperature", "-1"], "temperature -1.0: >= 0 (0 = greedy)"),
    (["--top_p", "0"], "top_p 0.0: in (0, 1] (1 = off)"),
])
def test_bad_sampling_values_are_refused_before_the_model_loads(tmp_path, prompts, extra, says, capsys):
    argv = ["generate", "--model", str(tmp_path / "no-model"), "--prompts", str(prompts), "--out",
            str(tmp_path / "o.jsonl"), *extra]
    with pytest.raises(SystemExit) as done:
        cli.main(argv)
    assert done.value.code == 2 and says in capsys.readouterr().err


def test_a_kill_inside_a_multibyte_character_is_continued(tiny_model_dir, prompts, tmp_path):
    args = ("--num_samples", "1", "--batch_size", "1", "--seed", "1")
    full = tmp_path / "full.jsonl"
    generate(tiny_model_dir, prompts, full, *args)
    lines = full.read_bytes().splitlines(True)
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"".join(lines[:2]) + '{"prompt": "caf\u00e9'.encode()[:-1])  # half of the 2-byte \u00e9
    generate(tiny_model_dir, prompts, out, *args)
    assert out.read_bytes() == full.read_bytes()
