"""Output folders: a folder we did not write is never replaced or deleted; an interrupted swap is recovered."""

import json
import subprocess
import sys

import pytest
import torch

from core.outputs import MARKER, OutputExistsError, check_writable, recover, write_dir

TINY = "configs/sft/tiny.yaml"


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_text(name: str, text: str):
    def write(folder):
        folder.mkdir()
        (folder / name).write_text(text)

    return write


def test_a_folder_we_did_not_write_is_refused_and_kept(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputExistsError, match="not written by lightning-rlhf.*--model.overwrite true"):
        write_dir(out, write_text("model.safetensors", "x"), {})
    assert (out / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temp folder left behind


def test_our_folder_is_replaced_and_marked(tmp_path):
    out = write_dir(tmp_path / "model", write_text("a.txt", "1"), {"stage": "sft", "config_hash": "abc"})
    marker = json.loads((out / MARKER).read_text())
    assert marker["written_by"] == "lightning-rlhf" and marker["stage"] == "sft" and marker["config_hash"] == "abc"
    write_dir(out, write_text("b.txt", "2"), {"stage": "dpo"})
    assert sorted(p.name for p in out.iterdir()) == ["b.txt", MARKER]  # replaced whole, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_overwrite_replaces_a_foreign_folder_and_empty_folders_are_free(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    write_dir(foreign, write_text("a.txt", "1"), {}, overwrite=True)
    assert not (foreign / "notes.txt").exists() and (foreign / "a.txt").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_writable(empty) == empty
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExistsError, match="is a file"):
        check_writable(tmp_path / "file")


def test_a_kill_between_the_two_renames_is_recovered_by_the_next_save(tmp_path):
    # the state a kill between `out -> out.old-PID` and `tmp-PID -> out` leaves: no out, both siblings
    pid = dead_pid()
    out = tmp_path / "model"
    write_dir(tmp_path / f"model.old-{pid}", write_text("a.txt", "old"), {})
    write_dir(tmp_path / f"model.tmp-{pid}", write_text("a.txt", "new"), {})  # complete: it has the marker
    assert recover(out) == [f"recovered {out} from model.tmp-{pid} (an earlier save was interrupted)",
                            f"removed {tmp_path / f'model.old-{pid}'} (left by an interrupted save)"]
    assert (out / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_an_incomplete_temp_folder_never_replaces_the_old_model(tmp_path):
    pid = dead_pid()
    out = tmp_path / "model"
    write_dir(tmp_path / f"model.old-{pid}", write_text("a.txt", "old"), {})
    half = tmp_path / f"model.tmp-{pid}"  # killed while writing: no marker
    half.mkdir()
    (half / "a.txt").write_text("half")
    recover(out)
    assert (out / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_stale_leftovers_are_cleaned_by_the_next_save_but_a_live_process_is_left_alone(tmp_path):
    out = write_dir(tmp_path / "model", write_text("a.txt", "1"), {})
    stale = tmp_path / f"model.tmp-{dead_pid()}"
    stale.mkdir()
    live = tmp_path / "model.tmp-1"  # pid 1 is alive: another save may be writing it
    live.mkdir()
    write_dir(out, write_text("a.txt", "2"), {})
    assert not stale.exists() and live.exists() and (out / "a.txt").read_text() == "2"


def test_fit_into_a_foreign_folder_stops_before_training_and_overwrite_replaces_it(run_recipe, tmp_path):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    (out / "results.csv").write_text("1,2")
    with pytest.raises(OutputExistsError, match=f"{out} exists and was not written by lightning-rlhf"):
        run_recipe("sft", "fit", "--config", TINY, f"--model.save_dir={out}", "--trainer.max_steps=2")
    assert sorted(p.name for p in out.iterdir()) == ["results.csv", "thesis.tex"]
    assert not list((tmp_path / "runs").rglob("*.ckpt"))  # stopped before the first step
    run_recipe("sft", "fit", "--config", TINY, f"--model.save_dir={out}", "--trainer.max_steps=2",
               "--model.overwrite=true")
    assert (out / "model.safetensors").exists() and not (out / "thesis.tex").exists()
    assert json.loads((out / MARKER).read_text())["stage"] == "sft"
    run_recipe("sft", "fit", "--config", TINY, f"--model.save_dir={out}", "--trainer.max_steps=2")  # ours now


def test_relative_save_dir_lands_under_the_run_root(run_recipe, tmp_path):
    run_recipe("sft", "fit", "--config", TINY, "--model.save_dir=exports/sft", "--trainer.max_steps=2")
    assert (tmp_path / "exports" / "sft" / "model.safetensors").exists()  # run_recipe's root is tmp_path


def test_saved_lora_adapter_records_an_absolute_base_path(tmp_path, tiny_model_dir, monkeypatch):
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    from core.models import LoraSpec, ModelSpec, load_causal_lm, load_tokenizer, save_hf

    monkeypatch.chdir(tiny_model_dir.parent.parent.parent)  # the repo root: the path as users give it
    spec = ModelSpec(path="tests/fixtures/tiny-llama", lora=LoraSpec(r=2, alpha=4))
    save_hf(load_causal_lm(spec), load_tokenizer(spec), tmp_path / "adapter", merge_lora=False)
    monkeypatch.chdir(tmp_path)  # another working directory
    config = PeftConfig.from_pretrained(tmp_path / "adapter")
    assert config.base_model_name_or_path == str(tiny_model_dir.resolve())
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config.base_model_name_or_path),
                                      tmp_path / "adapter")
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
