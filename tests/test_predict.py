"""`rlhf <stage> predict`: one jsonl through the prediction writer for every stage; a policy stage's rows are
`rlhf generate`'s on the same model, prompts, batch size and seed; two processes still write one file, every
prompt once.

Why equal to generate: both sample batch i from batch_generator(seed, i) (rank 0 / one process), over the same prompt
rows (PromptDataModule and generate encode prompts alike, SFT and preference prompts too), in batches of the same size.
rs predict writes best-of-K rows scored by its reward, from rs's own streams (they key on rank, epoch and split too,
as its training samples do), so it has no generate counterpart. Under DDP each rank samples its share of the prompts
from its own stream, so the rows differ from one process's by design: the DDP test checks the file, not the samples.
"""

import json
import os
import subprocess
import sys

import pytest

from recipes import cli
from tests.conftest import ROOT, SYNTHETIC

RESPONSE_FIELDS = {"prompt", "response", "sample", "finish_reason", "tokens", "index", "meta"}
SHORT = "--model.sampling.max_new_tokens=8"


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("stage,extra,count,fields", [
    ("sft", [SHORT], 16, RESPONSE_FIELDS),  # batch_size 16 prompts, one sample each
    ("dpo", [SHORT, "--model.sampling.num_samples=2"], 16, RESPONSE_FIELDS),  # 8 prompts x 2 samples
    ("ppo", [], 8, RESPONSE_FIELDS),  # 8 prompts
    ("rs", [], None, {"prompt", "completion", "score", "mean_score", "index"}),  # best of 4, blank ones left out
    ("reward", [], 16, {"prompt", "response", "score", "pair", "chosen"}),  # 8 pairs, chosen and rejected rows
])
def test_predict_writes_one_jsonl(run_recipe, tmp_path, stage, extra, count, fields):
    out = tmp_path / f"{stage}.jsonl"
    run_recipe(stage, "predict", "--config", f"configs/{stage}/tiny.yaml", "--trainer.limit_predict_batches=1",
               f"--model.predict_file={out}", *extra)
    rows = _rows(out)
    assert rows and all(set(r) == fields for r in rows)
    if count is None:  # rs: at most one row per prompt of the batch of 8
        assert 0 < len(rows) <= 8 and len({r["index"] for r in rows}) == len(rows)
    else:
        assert len(rows) == count
    assert all(r["prompt"].startswith("Reverse:") for r in rows)
    assert not list(tmp_path.rglob("*.rank*"))  # one file, no per-process parts
    if fields == RESPONSE_FIELDS:  # prompts in file order, their samples in order
        k = count // len({r["index"] for r in rows})
        assert [(r["index"], r["sample"]) for r in rows] == [(i, s) for i in range(count // k) for s in range(k)]


def test_default_file_is_in_the_log_dir(run_recipe, tmp_path):
    run_recipe("sft", "predict", "--config", "configs/sft/tiny.yaml", "--trainer.limit_predict_batches=1", SHORT)
    [path] = (tmp_path / "runs").rglob("predictions.jsonl")
    assert path.parent.name.startswith("version_") and len(_rows(path)) == 16


@pytest.mark.parametrize("stage,prompts,batch,extra", [
    ("sft", "sft_val.jsonl", 16, ["--model.sampling.num_samples=2", "--model.sampling_seed=3"]),
    ("dpo", "pairs_val.jsonl", 8, ["--model.sampling.temperature=0.7", "--model.sampling_seed=5"]),
    # predict reads the training prompts, as rs; data.seed too: Lightning refuses a model and data `seed` that differ
    ("ppo", "prompts_train.jsonl", 8, ["--model.seed=4", "--data.seed=4"]),
])
def test_policy_rows_equal_generate(run_recipe, tmp_path, tiny_model_dir, stage, prompts, batch, extra):
    out = tmp_path / "predict.jsonl"
    run_recipe(stage, "predict", "--config", f"configs/{stage}/tiny.yaml", "--trainer.limit_predict_batches=2",
               f"--model.predict_file={out}", "--model.sampling.max_new_tokens=10", *extra)
    spec = {a.split("=")[0].rsplit(".", 1)[-1]: a.split("=")[1] for a in extra if a.startswith("--model.")}
    seed = spec.get("sampling_seed", spec.get("seed", "0"))
    first = tmp_path / "prompts.jsonl"  # the 2 batches predict ran over
    first.write_text("".join((SYNTHETIC / prompts).read_text().splitlines(True)[: 2 * batch]))
    args = ["generate", "--model", str(tiny_model_dir), "--prompts", str(first), "--out", str(tmp_path / "gen.jsonl"),
            "--device", "cpu", "--max_new_tokens", "10", "--max_prompt_length", "32", "--batch_size", str(batch),
            "--seed", seed, "--num_samples", spec.get("num_samples", "1"),
            "--temperature", spec.get("temperature", "1")]
    assert cli.main(args) == 0
    generated = _rows(tmp_path / "gen.jsonl")
    predicted = _rows(out)
    assert len(predicted) == len(generated) == 2 * batch * int(spec.get("num_samples", "1"))
    for p, g in zip(predicted, generated):
        # meta: generate keeps a demonstration's or pair's other columns (completion, chosen, ...); a stage's
        # DataModule reads them as training data, not meta
        assert {k: v for k, v in p.items() if k != "meta"} == {k: v for k, v in g.items() if k != "meta"}


@pytest.mark.slow
def test_two_processes_write_one_file_with_every_prompt_once(tmp_path):
    rows_in = 31  # odd: a sampler that evens out the ranks would repeat a prompt
    val = tmp_path / "val.jsonl"
    val.write_text("".join((SYNTHETIC / "sft_val.jsonl").read_text().splitlines(True)[:rows_in]))
    out = tmp_path / "out" / "predictions.jsonl"
    cmd = [sys.executable, "-m", "recipes.cli", "sft", "predict", "--config", "configs/sft/tiny.yaml",
           "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.accelerator=cpu", f"--data.val_file={val}",
           "--data.batch_size=4", f"--model.predict_file={out}", "--model.sampling.max_new_tokens=6",
           f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.parent.iterdir()) == ["predictions.jsonl"]  # no per-rank parts, no temp file
    rows = _rows(out)
    assert [r["index"] for r in rows] == list(range(rows_in))  # every prompt once, in file order
    prompts = [json.loads(line)["prompt"] for line in val.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == prompts
    assert proc.stdout.count("wrote 31 responses") == 1  # rank 0 alone writes


def test_predict_from_a_checkpoint_equals_generate_from_it(run_recipe, tmp_path):
    """A trained policy: `rlhf sft predict --ckpt_path` writes what `rlhf generate --model CKPT` does."""
    run_recipe("sft", "fit", "--config", "configs/sft/tiny.yaml", "--trainer.max_steps=2",
               "--trainer.limit_val_batches=0", f"--model.save_dir={tmp_path / 'hf'}")
    ckpt = next((tmp_path / "runs").rglob("last.ckpt"))
    out = tmp_path / "predict.jsonl"
    # the checkpoint's own sampling settings: the resume contract refuses other model keys than predict_file & co
    run_recipe("sft", "predict", "--config", "configs/sft/tiny.yaml", f"--ckpt_path={ckpt}",
               "--trainer.limit_predict_batches=1", f"--model.predict_file={out}")
    first = tmp_path / "prompts.jsonl"
    first.write_text("".join((SYNTHETIC / "sft_val.jsonl").read_text().splitlines(True)[:16]))
    args = ["generate", "--model", str(ckpt), "--prompts", str(first), "--out", str(tmp_path / "gen.jsonl"),
            "--device", "cpu", "--max_new_tokens", "64", "--max_prompt_length", "32", "--batch_size", "16"]
    assert cli.main(args) == 0
    strip = lambda rows: [{k: v for k, v in r.items() if k != "meta"} for r in rows]  # noqa: E731
    assert strip(_rows(out)) == strip(_rows(tmp_path / "gen.jsonl"))


@pytest.mark.parametrize("kind", ["sft", "preference"])
def test_without_val_file_the_prompts_are_those_held_out(kind, tiny_model_dir):
    """No val_file: predict samples from the prompts of exactly the rows setup held out for validation."""
    if kind == "sft":
        from datamodules.sft import SFTDataModule

        dm = SFTDataModule(str(SYNTHETIC / "sft_train.jsonl"), tokenizer=str(tiny_model_dir), val_fraction=0.1)
    else:
        from datamodules.preference import PreferenceDataModule

        dm = PreferenceDataModule(str(SYNTHETIC / "pairs_train.jsonl"), tokenizer=str(tiny_model_dir), val_fraction=0.1)
    dm.setup("fit")
    held_out = sorted(row[0][0] if kind == "preference" else row[0] for row in dm.val_rows)  # prompt ids
    rows = dm._prompt_rows()
    assert sorted(r["input_ids"] for r in rows) == held_out
    assert [r["index"] for r in rows] == sorted(r["index"] for r in rows)  # file order
    lines = (SYNTHETIC / f"{'sft' if kind == 'sft' else 'pairs'}_train.jsonl").read_text().splitlines()
    assert all(json.loads(lines[r["index"]])["prompt"] == r["prompt"] for r in rows)  # index: the row in the file
    batch = dm.collate_prompts(rows[:3])
    assert batch["input_ids"][:, -1].ne(dm.tokenizer.pad_token_id).all()  # left-padded: every row ends in a token
    assert batch["index"] == [r["index"] for r in rows[:3]]
