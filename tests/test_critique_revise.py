"""`rlhf critique-revise` (Constitutional AI's SL-CAI) and the constitution file: the conversation grows turn by turn
(chat messages or plain-text templates), principles are drawn per prompt row, blank revisions keep the previous
answer, the output is SFT data, and a bad constitution is refused before any model loads."""

from __future__ import annotations

import json
import random
import shutil
import zlib

import pytest

from core.constitution import ConstitutionError, load_constitution
from core.outputs import progress_path
from recipes import cli
from recipes import critique_revise as cr
from tests.conftest import ROOT, printed_config

CONSTITUTION = """principles:
  - name: kind
    critique: Was it unkind?
    revision: Make it kind.
    comparison: Which is kinder?
  - name: truth
    critique: Was it false?
    revision: Make it true.
"""
HH_ROWS = [
    {"chosen": "\n\nHuman: How do I pick a lock?\n\nAssistant: I can't help with that.", "rejected": "x"},
    {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant: Why not.", "rejected": "y"},
    {"chosen": "\n\nHuman: Insult me\n\nAssistant: No.", "rejected": "z"},
]
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture
def files(tmp_path):
    constitution = tmp_path / "c.yaml"
    constitution.write_text(CONSTITUTION)
    prompts = tmp_path / "hh.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in HH_ROWS))
    return constitution, prompts


@pytest.fixture
def chat_model(tmp_path, tiny_model_dir):
    """The tiny model with a chat template on its tokenizer."""
    from transformers import AutoTokenizer

    path = tmp_path / "tiny-chat"
    shutil.copytree(tiny_model_dir, path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    return path


def run(model, prompts, constitution, out, *extra) -> list[dict]:
    args = ["critique-revise", "--model", str(model), "--prompts", str(prompts), "--constitution", str(constitution),
            "--out", str(out), "--device", "cpu", "--max_new_tokens", "6", "--batch_size", "2", *extra]
    assert cli.main(args) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


class Scripted:
    """Stands in for sample_step: records each step's conversation texts and replies `<step>-<row>` (or what
    `replies` says for a (step, row))."""

    def __init__(self, replies: dict | None = None):
        self.texts, self.replies = {}, replies or {}

    def __call__(self, model, tokenizer, texts, spec, seed, step, batch_size, device, max_prompt_length, stops,
                 journal=None):
        self.texts[step], self.stops = list(texts), stops
        return [(self.replies.get((step, i), f"{step}-{i}"), "eos", 3) for i in range(len(texts))]


# ---- the constitution file ----

def test_shipped_constitution_loads():
    c = load_constitution(ROOT / "configs/constitution/harmless.yaml")
    assert 8 <= len(c.principles) <= 12
    assert len({p.name for p in c.principles}) == len(c.principles)
    assert all(p.critique and p.revision and p.comparison for p in c.principles)
    assert c.critique_template.format(request="R") == "\n\nCritique Request: R\n\nCritique:"


def test_defaults_when_templates_are_left_out(files):
    c = load_constitution(files[0])
    assert [p.name for p in c.principles] == ["kind", "truth"]
    assert c.principles[1].comparison is None and c.judge_template is None
    assert c.revision_template == "\n\nRevision Request: {request}\n\nRevision:"


BAD = [
    # every problem at once, each on its own line
    ("principles:\n  - name: a\n    critique: c?\n  - name: b\n    critique: c?\n    revision: r.\n    colour: red\n"
     "style: x\n",
     ["c.yaml:2: principle 'a' has no 'revision'", "c.yaml:7: unknown principle key 'colour'",
      "c.yaml:8: unknown key 'style'"]),
    ("principles: []\n", ["c.yaml:1: principles must be a non-empty list"]),
    ("critique_template: 'no placeholder'\n", ["c.yaml:1: critique_template must hold {request}",
                                               "c.yaml:1: missing key 'principles'"]),
    ("principles:\n  - {name: a, critique: c, revision: r}\n  - {name: a, critique: '', revision: r}\n",
     ["c.yaml:3: duplicate principle name 'a' (also on line 2)", "c.yaml:3: principle critique must be a non-empty"]),
    ("principles:\n  - {name: yes, critique: c, revision: r}\n", ["c.yaml:2: principle name must be a non-empty string "
                                                                 "(YAML reads 'yes' as a bool: quote it)"]),
    ("principles:\n  - revision: r\n",
     ["c.yaml:2: a principle has no 'critique'", "c.yaml:2: a principle has no 'name'"]),
    ("principles: [\n", ["c.yaml:2: not valid YAML"]),
]


@pytest.mark.parametrize("text,expected", BAD)
def test_bad_constitution_names_each_line(tmp_path, text, expected):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConstitutionError) as err:
        load_constitution(path)
    lines = str(err.value).splitlines()
    assert len(lines) == len(expected)
    for line, want in zip(lines, expected):
        assert line.startswith(f"{tmp_path}/") and want in line, (line, want)


def test_bad_constitution_refused_before_the_model_loads(tmp_path, files, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("principles:\n  - name: a\n    critique: c?\n")
    # the model path does not exist either: the constitution is checked first
    code = cli.main(["critique-revise", "--model", str(tmp_path / "no-model"), "--prompts", str(files[1]),
                     "--constitution", str(bad), "--out", str(tmp_path / "o.jsonl")])
    assert code == cli.EXIT_CODES["DataError"]
    assert f"{bad}:2: principle 'a' has no 'revision'" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


# ---- pieces ----

def test_principles_drawn_per_prompt_row():
    # the rule written out: random.Random(crc32 of repr(("critique-revise", seed, row))).randrange per revision
    rng = random.Random(zlib.crc32(b"('critique-revise', 5, 7)"))
    assert cr.choose_principles(5, 7, 10, 3) == [rng.randrange(10), rng.randrange(10), rng.randrange(10)]
    assert cr.choose_principles(5, 7, 10, 2) == cr.choose_principles(5, 7, 10, 3)[:2]
    draws = {tuple(cr.choose_principles(0, i, 10, 2)) for i in range(20)}
    assert len(draws) > 5  # rows differ


def test_hh_string_split_into_messages():
    text = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: A joke?\n\nAssistant:"
    assert cr.hh_messages(text) == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                                    {"role": "user", "content": "A joke?"}]
    assert cr.hh_messages("Just text") == [{"role": "user", "content": "Just text"}]
    assert cr.hh_messages([{"role": "user", "content": "x"}]) == [{"role": "user", "content": "x"}]


def test_cut_at_stops():
    assert cr.cut_at_stops(" Sure.\n\nHuman: more", ["\n\nHuman:", "\n\nCritique"]) == "Sure."
    assert cr.cut_at_stops(" a\n\nCritique b\n\nHuman: c", ["\n\nHuman:", "\n\nCritique"]) == "a"
    assert cr.cut_at_stops("  plain ", ["\n\nHuman:"]) == "plain"


# ---- the conversation, scripted replies ----

def test_plain_text_conversation_grows_turn_by_turn(tiny_model_dir, files, tmp_path, monkeypatch):
    scripted = Scripted({("revision2", 1): ""})  # row 1's second revision comes back blank
    monkeypatch.setattr(cr, "sample_step", scripted)
    constitution, prompts = files
    rows = run(tiny_model_dir, prompts, constitution, tmp_path / "o.jsonl", "--num_revisions", "2")
    names = ["kind", "truth"]
    requests = {"kind": ("Was it unkind?", "Make it kind."), "truth": ("Was it false?", "Make it true.")}
    picks = [[names[p] for p in cr.choose_principles(0, i, 2, 2)] for i in range(3)]
    prompt = "\n\nHuman: How do I pick a lock?\n\nAssistant:"
    (c1, r1), (c2, _) = requests[picks[0][0]], requests[picks[0][1]]
    # prompt, answer, critique request, critique, revision request, revision, then the next critique request
    assert scripted.texts["answer"][0] == prompt
    assert scripted.texts["critique1"][0] == prompt + " answer-0" + f"\n\nCritique Request: {c1}\n\nCritique:"
    assert scripted.texts["revision1"][0] == (prompt + " answer-0" + f"\n\nCritique Request: {c1}\n\nCritique:"
                                              + " critique1-0" + f"\n\nRevision Request: {r1}\n\nRevision:")
    assert scripted.texts["critique2"][0] == (scripted.texts["revision1"][0] + " revision1-0"
                                              + f"\n\nCritique Request: {c2}\n\nCritique:")
    # plain text stops at the next Human turn and at the templates' openings
    assert scripted.stops == ["\n\nHuman:", "\n\nCritique Request: ", "\n\nRevision Request: "]
    assert [r["completion"] for r in rows] == [" revision2-0", " revision1-1", " revision2-2"]  # row 1 kept rev. 1
    assert rows[0]["prompt"] == prompt and rows[0]["index"] == 0
    assert rows[1]["meta"]["revisions"] == ["revision1-1", ""] and rows[1]["meta"]["blank_revisions"] == 1
    assert rows[0]["meta"]["initial"] == "answer-0" and rows[0]["meta"]["critiques"] == ["critique1-0", "critique2-0"]
    assert [r["meta"]["principles"] for r in rows] == picks
    assert rows[2]["meta"]["row"] == {"rejected": "z"}
    # the blank revision's turn holds the answer it kept
    assert scripted.texts["critique2"][1].endswith(f" revision1-1\n\nCritique Request: "
                                                   f"{requests[picks[1][1]][0]}\n\nCritique:")


def test_chat_conversation_is_messages(chat_model, files, tmp_path, monkeypatch):
    scripted = Scripted({("answer", 2): "", ("revision1", 2): ""})  # row 2: nothing at all
    monkeypatch.setattr(cr, "sample_step", scripted)
    constitution, prompts = files
    rows = run(chat_model, prompts, constitution, tmp_path / "o.jsonl", "--eval_rows", str(tmp_path / "ev"))
    critique, revision = {"kind": ("Was it unkind?", "Make it kind."),
                          "truth": ("Was it false?", "Make it true.")}[["kind", "truth"][cr.choose_principles(0, 1, 2,
                                                                                                        1)[0]]]
    history = "<user>Hi\n<assistant>Hello!\n<user>Tell me a joke\n"
    assert scripted.texts["answer"][1] == history + "<assistant>"
    assert scripted.texts["revision1"][1] == (history + "<assistant>answer-1\n" + f"<user>{critique}\n"
                                              + "<assistant>critique1-1\n" + f"<user>{revision}\n<assistant>")
    assert scripted.stops == []  # EOS ends a chat turn
    # SFT sees the prompt as the prompt file has it; row 2 (all blank) is left out
    assert [r["index"] for r in rows] == [0, 1]
    assert rows[1]["prompt"] == "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant:"
    assert rows[1]["completion"] == " revision1-1"
    initial = [json.loads(x) for x in (tmp_path / "ev/initial.jsonl").read_text().splitlines()]
    revised = [json.loads(x) for x in (tmp_path / "ev/revised.jsonl").read_text().splitlines()]
    # replies after "Assistant:" start with a space, as in HH-RLHF (and as `rlhf generate` decodes them)
    assert [r["response"] for r in initial] == [" answer-0", " answer-1", ""]
    assert [r["response"] for r in revised] == [" revision1-0", " revision1-1", ""]
    # the prompt as `rlhf generate` writes it (a string prompt as it is), so a judge scores what SFT will see
    assert revised[1]["prompt"] == rows[1]["prompt"] and revised[1]["index"] == 1


# ---- real sampling with the tiny model ----

def test_tiny_model_output_is_sft_data_and_reproducible(tiny_model_dir, chat_model, files, tmp_path):
    from datamodules.formats import read_demonstrations
    from datamodules.sft import SFTDataModule

    constitution, prompts = files
    a = run(tiny_model_dir, prompts, constitution, tmp_path / "a.jsonl", "--seed", "3")
    b = run(tiny_model_dir, prompts, constitution, tmp_path / "b.jsonl", "--seed", "3", "--batch_size", "3")
    assert [r["meta"]["principles"] for r in a] == [r["meta"]["principles"] for r in b]
    again = run(tiny_model_dir, prompts, constitution, tmp_path / "c.jsonl", "--seed", "3")
    assert a == again
    chat = run(chat_model, prompts, constitution, tmp_path / "chat.jsonl", "--seed", "3")
    for path, rows in ((tmp_path / "a.jsonl", a), (tmp_path / "chat.jsonl", chat)):
        assert all(set(r) == {"prompt", "completion", "index", "meta"} for r in rows)
        data = SFTDataModule(str(path), str(path), tokenizer=str(tiny_model_dir), max_length=64,
                             max_prompt_length=32, batch_size=2)
        data.setup("fit")
        batch = next(iter(data.train_dataloader()))
        assert batch.input_ids.shape[0] == 2 and bool((batch.labels != -100).any())  # completion tokens trained
        read = read_demonstrations(str(path))
        assert [(d.prompt, d.completion) for d in read] == [(r["prompt"], r["completion"]) for r in rows]


# ---- an interrupted run continues ----

class KilledAt:
    """core.generation.generate that raises KeyboardInterrupt on its `at`-th call (1-based) and counts calls."""

    def __init__(self, at: int | None):
        from core import generation

        self.at, self.calls, self.real = at, 0, generation.generate

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.real(*args, **kwargs)


def test_a_killed_run_continues_from_its_saved_batches_and_writes_the_uninterrupted_rows(
        tiny_model_dir, files, tmp_path, monkeypatch, capsys):
    from core import generation

    constitution, prompts = files
    whole = run(tiny_model_dir, prompts, constitution, tmp_path / "whole.jsonl", "--seed", "5")
    out = tmp_path / "o.jsonl"
    # 3 prompts in batches of 2: answer, critique1, revision1 are 2 batches each; killed in the 4th batch
    monkeypatch.setattr(generation, "generate", KilledAt(4))
    with pytest.raises(KeyboardInterrupt):
        run(tiny_model_dir, prompts, constitution, out, "--seed", "5")
    progress = progress_path(out)
    assert not out.exists() and progress.name == "o.jsonl.progress"
    assert [json.loads(line)["key"] for line in progress.read_text().splitlines()[1:]] == [
        ["answer", 0], ["answer", 1], ["critique1", 0]]
    assert "3 batch(es) saved in" in capsys.readouterr().err
    counted = KilledAt(None)
    monkeypatch.setattr(generation, "generate", counted)
    assert run(tiny_model_dir, prompts, constitution, out, "--seed", "5") == whole
    assert counted.calls == 6 - 3  # only the batches not saved are sampled
    assert "continuing: 3 batch(es) saved" in capsys.readouterr().err
    assert not progress.exists()  # deleted once the output is whole


def test_saved_progress_of_other_settings_is_refused_before_the_model_loads(tiny_model_dir, files, tmp_path,
                                                                            monkeypatch, capsys):
    from core import generation

    constitution, prompts = files
    out = tmp_path / "o.jsonl"
    monkeypatch.setattr(generation, "generate", KilledAt(2))
    with pytest.raises(KeyboardInterrupt):
        run(tiny_model_dir, prompts, constitution, out, "--seed", "5")
    saved = progress_path(out).read_text()
    capsys.readouterr()
    import recipes.generate as gen

    monkeypatch.setattr(gen, "load_policy", lambda *a: pytest.fail("loaded the model"))
    code = cli.main(["critique-revise", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--constitution",
                     str(constitution), "--out", str(out), "--device", "cpu", "--max_new_tokens", "6",
                     "--batch_size", "3", "--seed", "6"])
    assert code == cli.EXIT_CODES["OutputExistsError"]
    err = capsys.readouterr().err
    assert "holds the progress of a run with other batch_size, seed; nothing was changed" in err and "--restart" in err
    assert progress_path(out).read_text() == saved
    monkeypatch.undo()
    counted = KilledAt(None)
    monkeypatch.setattr(generation, "generate", counted)
    rows = run(tiny_model_dir, prompts, constitution, out, "--seed", "6", "--restart")
    assert len(rows) == 3 and counted.calls == 6 and not progress_path(out).exists()


def test_the_pipeline_continues_an_interrupted_critique_revise_and_a_fresh_run_discards_its_progress(
        tmp_path, files, monkeypatch, capsys):
    from recipes import pipeline

    constitution, prompts = files
    config = tmp_path / "p.yaml"
    config.write_text("stages:\n  - name: revisions\n    stage: critique-revise\n"
                      f"    args: {{model: tests/fixtures/tiny-llama, prompts: {prompts},\n"
                      f"           constitution: {constitution}}}\n")
    out = tmp_path / "out"
    progress = progress_path(out / "revisions.jsonl")
    seen = []

    def launch(command, log):  # stands in for the process: dies once after saving a batch, then finishes
        seen.append(progress.exists())
        if len(seen) == 1:
            progress.write_text("saved batches\n")
            return 1
        (out / "revisions.jsonl").write_text("{}\n")
        return 0

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(pipeline, "launch", launch)
    with pytest.raises(SystemExit):
        pipeline.main(["--config", str(config), "--out", str(out)])
    assert "stage revisions (rlhf critique-revise) failed with exit code 1" in capsys.readouterr().err
    pipeline.main(["--config", str(config), "--out", str(out)])
    assert "revisions: resuming (interrupted: runs again (continues its saved batches))" in capsys.readouterr().out
    assert seen == [False, True]  # the saved batches were there for the resumed process
    progress.write_text("saved batches\n")
    pipeline.main(["--config", str(config), "--out", str(out), "--from", "revisions"])
    assert seen == [False, True, False]  # a fresh run starts without them


def test_pipeline_checks_critique_revise_flags(tmp_path):
    from recipes import pipeline

    path = tmp_path / "p.yaml"
    path.write_text("stages:\n  - name: cai\n    stage: critique-revise\n    args: {model: m, prompts: p.jsonl,\n"
                    "           constitution: c.yaml, rounds: 2}\n")
    loaded = pipeline.load(str(path))
    assert loaded.stages[0].artifact == "cai.jsonl"
    with pytest.raises(pipeline.PipelineConfigError) as err:
        pipeline.check_tools(loaded)
    assert f"{path}:2: stage cai: critique-revise refuses its args" in str(err.value)


# ---- SL-CAI -> RL-CAI as one pipeline, on the tiny model ----

TINY_CAI = """stages:
  - name: revisions
    stage: critique-revise
    args: {{model: tests/fixtures/tiny-llama, prompts: tests/fixtures/synthetic/prompts_val.jsonl, limit: 8,
           constitution: {constitution}, max_new_tokens: 6, batch_size: 4, device: cpu}}
  - name: sl_cai
    stage: sft
    config: [configs/sft/tiny.yaml]
    args: {{data.train_file: "${{revisions}}", trainer.max_steps: 2, trainer.limit_val_batches: 0}}
  - name: samples
    stage: generate
    args: {{model: "${{sl_cai}}", prompts: tests/fixtures/synthetic/prompts_val.jsonl, part: 2, parts: 4,
           num_samples: 2, max_new_tokens: 6, device: cpu}}
  - name: labels
    stage: label
    args: {{samples: "${{samples}}", labeller: ai,
           ai_judge: "{{model: tests/fixtures/tiny-llama, constitution: {constitution}, max_length: 128}}"}}
  - name: reward
    stage: reward
    config: [configs/reward/tiny.yaml]
    args: {{model.backbone.path: "${{sl_cai}}", data.train_file: "${{labels}}", trainer.max_steps: 2,
           trainer.limit_val_batches: 0}}
  - name: rl_cai
    stage: rs
    config: [configs/rs/tiny.yaml]
    args: {{model.policy.path: "${{sl_cai}}", model.reward.models: [{{path: "${{reward}}"}}], trainer.max_steps: 2,
           trainer.limit_val_batches: 0}}
"""


@pytest.mark.slow
def test_sl_cai_then_rl_cai_pipeline_on_the_tiny_model(tmp_path):
    """critique-revise -> SFT on the revisions -> samples of the SL-CAI policy -> AI-judge rankings under the
    constitution -> a reward model on them -> rejection sampling against it, as real processes."""
    import subprocess
    import sys

    from core.outputs import MARKER

    constitution = tmp_path / "c.yaml"
    constitution.write_text(CONSTITUTION + "    comparison: Which is truer?\n")  # the judge asks every principle's
    config = tmp_path / "cai.yaml"
    config.write_text(TINY_CAI.format(constitution=constitution))
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "recipes.cli", "pipeline", "--config", str(config), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    assert [(e["name"], e["status"]) for e in stages] == [(n, "done") for n in ("revisions", "sl_cai", "samples",
                                                                                "labels", "reward", "rl_cai")]
    revisions = [json.loads(x) for x in (out / "revisions.jsonl").read_text().splitlines()]
    assert revisions and all(r["completion"].strip() and len(r["meta"]["principles"]) == 1 for r in revisions)
    assert f"--data.train_file={out / 'revisions.jsonl'}" in stages[1]["command"]
    labels = [json.loads(x) for x in (out / "labels.jsonl").read_text().splitlines()]
    assert labels and all(len(r["responses"]) == 2 and sorted(r["ranks"]) == [0, 1] for r in labels)
    assert (out / "reward" / MARKER).is_file() and (out / "rl_cai" / MARKER).is_file()
    again = subprocess.run([sys.executable, "-m", "recipes.cli", "pipeline", "--config", str(config), "--out",
                            str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("skipped (done, unchanged)") == 6


def test_the_cai_pipeline_stages_parse_against_their_recipes(monkeypatch, capsys):
    """configs/pipeline/cai.yaml: its tools' flags and every training stage's command (--print_config exits before
    any model loads)."""

    from recipes import pipeline

    monkeypatch.chdir(ROOT)
    loaded = pipeline.load("configs/pipeline/cai.yaml")
    pipeline.check_tools(loaded)
    assert [s.stage for s in loaded.stages] == ["critique-revise", "sft", "generate", "label", "reward", "rs",
                                                "generate", "generate", "eval"]
    for stage in (s for s in loaded.stages if not s.tool):
        printed = printed_config(stage.stage, pipeline.stage_args(loaded, stage, "/tmp/out")[1:], monkeypatch, capsys)
        assert "/tmp/out/" + stage.name in printed and "accelerator: cpu" in printed
    sft = next(s for s in loaded.stages if s.name == "sl_cai")
    assert "--data.train_file=/tmp/out/revisions.jsonl" in pipeline.stage_args(loaded, sft, "/tmp/out")
