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


# ---- Journal: a run's finished units, so a killed run continues ----

def test_journal_saves_units_and_a_new_run_with_the_same_settings_reads_them(tmp_path):
    from core.outputs import Journal

    path = tmp_path / "out.jsonl.progress"
    first = Journal(path, "kind", {"seed": 1, "sampling": (0.7, 16)})
    assert first.open() == 0 and not path.exists()  # nothing saved yet, no file
    first.put(("answer", 0), [["hi", "eos", 3]])
    first.put(("answer", 1), [["yo", "length", 16]])
    first.close()
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {"journal": "kind", "settings": {"seed": 1, "sampling": [0.7, 16]}}
    assert json.loads(lines[2]) == {"key": ["answer", 1], "value": [["yo", "length", 16]]}
    again = Journal(path, "kind", {"seed": 1, "sampling": (0.7, 16)})  # a tuple reads back as the saved list
    assert again.open() == 2
    assert again.get("answer", 1) == [["yo", "length", 16]] and again.get("answer", 2) is None
    again.remove()
    assert not path.exists()


def test_journal_drops_a_line_cut_by_a_kill_and_refuses_a_damaged_middle(tmp_path):
    from core.outputs import Journal
    from core.sources import DataError

    path = tmp_path / "p"
    header = json.dumps({"journal": "kind", "settings": {}}) + "\n"
    unit = json.dumps({"key": ["a", 0], "value": 1}) + "\n"
    path.write_text(header + unit + '{"key": ["a", 1], "val')  # killed mid-write
    journal = Journal(path, "kind", {})
    assert journal.open() == 1 and journal.get("a", 0) == 1
    assert path.read_text() == header + unit  # the cut line is gone, so the next unit starts on its own line
    path.write_text(header + "garbage\n" + unit)
    with pytest.raises(DataError, match=r"p:2: not a progress line \(the file is damaged: pass --restart"):
        Journal(path, "kind", {}).open()
    assert path.read_text() == header + "garbage\n" + unit  # left as it was


def test_journal_of_other_settings_is_refused_unless_it_saved_nothing_or_restart(tmp_path):
    from core.outputs import Journal

    path = tmp_path / "p"
    old = Journal(path, "kind", {"seed": 1, "model": "a", "batch_size": 2})
    old.put(("a", 0), 5)
    old.close()
    saved = path.read_text()
    with pytest.raises(OutputExistsError, match="progress of a run with other model, seed; nothing was changed"):
        Journal(path, "kind", {"seed": 2, "model": "b", "batch_size": 2}).open()
    assert path.read_text() == saved
    fresh = Journal(path, "kind", {"seed": 2, "model": "b", "batch_size": 2})
    assert fresh.open(restart=True) == 0 and not path.exists()  # --restart discards it
    path.write_text(json.dumps({"journal": "kind", "settings": {"seed": 1}}) + "\n")  # a header alone
    assert Journal(path, "kind", {"seed": 2}).open() == 0 and not path.exists()  # nothing to lose: replaced
    path.write_text(json.dumps({"journal": "kind", "settings": {"seed": 1}}) + '\n{"key": ["a", 0], "va')
    assert Journal(path, "kind", {"seed": 2}).open() == 0 and not path.exists()  # killed in its first unit: too


def test_journal_never_reads_or_deletes_a_file_it_did_not_write(tmp_path):
    from core.outputs import Journal

    path = tmp_path / "p"
    for text in ("my notes\n", json.dumps({"journal": "another tool", "settings": {}}) + "\n", ""):
        path.write_text(text)
        for restart in (False, True):
            with pytest.raises(OutputExistsError, match="is not a kind progress file; nothing was changed"):
                Journal(path, "kind", {}).open(restart=restart)
            assert path.read_text() == text


def test_files_stamp_changes_when_a_model_is_rewritten(tmp_path):
    import os

    from core.outputs import files_stamp

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "w.safetensors").write_bytes(b"12")
    (tmp_path / "m" / "sub").mkdir()  # folders are left out
    before = files_stamp(tmp_path / "m")
    assert [name for name, _, _ in before] == ["w.safetensors"] and before[0][1] == 2
    os.utime(tmp_path / "m" / "w.safetensors", ns=(1, before[0][2] + 10**9))
    assert files_stamp(tmp_path / "m") != before
    assert files_stamp("org/hub-model") == "org/hub-model"
