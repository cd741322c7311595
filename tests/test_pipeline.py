"""`rlhf pipeline`: config errors name the line, stages chain through ${name}, re-runs skip what is done, an
interrupted stage resumes from its checkpoint, --from and changed args re-run what they should."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback

from core.outputs import MARKER
from recipes import cli, pipeline
from tests.conftest import ROOT, printed_config

KILL_ENV = "RLHF_TEST_KILL_PIPELINE"


class KillPipelineAt(Callback):
    """With $RLHF_TEST_KILL_PIPELINE=N, kills its whole process group (the pipeline and this stage) before
    optimizer step N+1, once a last.ckpt is on disk: a deterministic "kill mid-stage". No-op otherwise."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        at = os.environ.get(KILL_ENV)
        if at and trainer.global_step >= int(at) and any(Path(trainer.default_root_dir).rglob("last.ckpt")):
            os.killpg(os.getpgid(0), signal.SIGKILL)


def write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---- (a) config errors: one line each, naming the line; nothing runs ----

ROUNDS_HEAD = """stages:
  - name: sft
    stage: sft
    config: [configs/sft/tiny.yaml]
"""

BAD = [
    ("""stages:
  - name: sft
    stage: sfx
    config: [configs/sft/tiny.yaml]
""", 3, "unknown stage 'sfx'"),
    ("""stages:
  - name: dpo
    stage: dpo
    config: [configs/dpo/tiny.yaml]
    args:
      model.policy.path: ${sft}
  - name: sft
    stage: sft
    config: [configs/sft/tiny.yaml]
""", 6, "${sft} names no stage defined before this stage (references must point backwards, so no cycles)"),
    ("""stages:
  - name: a
    stage: sft
    config: [configs/sft/tiny.yaml]
    args: {model.policy.path: "${a}"}
""", 5, "${a} names no stage defined before this stage"),
    ("""stages:
  - name: sft
    stage: sft
    config: [configs/sft/tiny.yaml]
  - name: sft
    stage: sft
    config: [configs/sft/tiny.yaml]
""", 5, "duplicate stage name 'sft'"),
    ("""stages:
  - name: sft
    stage: sft
    config: [configs/sft/tiny.yaml]
    trainer: {max_steps: 2}
""", 5, "unknown stage key 'trainer'"),
    ("""outt: runs/x
stages:
  - name: sft
    stage: sft
    config: [configs/sft/tiny.yaml]
""", 1, "unknown key 'outt'"),
    ("""stages:
  - name: sft
    stage: sft
    config:
      - configs/sft/tiny.yaml
      - configs/sft/nope.yaml
""", 6, "config file 'configs/sft/nope.yaml' not found"),
    ("""stages:
  - name: sft
    stage: sft
    config: [configs/sft/tiny.yaml]
    members: 3
""", 5, "members trains a reward-model ensemble: only for stage reward"),
    ("""stages:
  - name: sft
    stage: sft
    config: [configs/sft/tiny.yaml]
    args:
      model.save_dir: elsewhere
""", 6, "model.save_dir is set by the pipeline"),
    ("""stages:
  - name: sft
    stage: sft
    config: [configs/sft/tiny.yaml]
    stage: dpo
""", 5, "duplicate key 'stage' (also on line 3)"),
    ("""stages:
  - name: sft
    stage: sft
   config: [configs/sft/tiny.yaml]
""", 4, "not valid YAML"),
    (ROUNDS_HEAD + """rounds:
  stages:
    - name: samples
      stage: generate
      args: {model: "${policy}", prompts: p.jsonl}
    - name: policy
      stage: sft
      config: [configs/sft/tiny.yaml]
""", 9, "${policy} is this stage or a later one of the round: for the previous round's, give round 1 a fallback"),
    (ROUNDS_HEAD + """  - name: dpo
    stage: dpo
    config: [configs/dpo/tiny.yaml]
    args: {model.policy.path: "${sft|sft}"}
""", 8, "${round} and ${name|fallback} are for the stages of `rounds`"),
    (ROUNDS_HEAD + """rounds:
  stages:
    - name: samples
      stage: generate
      args: {model: "${policy|nope}", prompts: p.jsonl}
    - name: policy
      stage: sft
      config: [configs/sft/tiny.yaml]
""", 9, "the fallback must be a stage defined before the rounds or a path"),
    (ROUNDS_HEAD + """rounds:
  stages:
    - name: samples
      stage: generate
      config: [configs/sft/tiny.yaml]
""", 9, "stage samples: config: a generate stage takes its options as args"),
    (ROUNDS_HEAD + """rounds:
  count: 0
  stages:
    - {name: samples, stage: generate, args: {model: "${sft}"}}
""", 6, "rounds: count must be a whole number >= 1, got 0"),
    (ROUNDS_HEAD + """rounds:
  stages:
    - {name: samples, stage: generate, args: {model: "${sft}", out: x.jsonl}}
""", 7, "args: out is set by the pipeline"),
    (ROUNDS_HEAD + """rounds:
  count: 3
  stages:
    - {name: samples, stage: generate, args: {model: "${sft}", prompts: p.jsonl, num_sampels: 4}}
""", 8, "stage samples: generate refuses its args: rlhf generate: error: unrecognized arguments: --num_sampels=4"),
    (ROUNDS_HEAD + """  - {name: judged, stage: eval, args: {policy: p.jsonl, batch_size: many}}
""", 5, "stage judged: eval refuses its args: rlhf eval: error: argument --batch_size: invalid int value: 'many'"),
]


@pytest.mark.parametrize("text,line,reason", BAD, ids=[b[2][:30] for b in BAD])
def test_config_error_names_the_line_and_nothing_runs(text, line, reason, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(pipeline, "launch", lambda *a: pytest.fail("a stage ran"))
    path = write(tmp_path, text)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["pipeline", "--config", str(path), "--out", str(tmp_path / "out")])
    assert exit_.value.code == cli.EXIT_CODES["PipelineConfigError"] == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{path}:{line}: ") and reason in err, err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_every_error_is_listed_in_line_order(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    path = write(tmp_path, "stages:\n  - name: a\n    stage: nope\n    config: [configs/sft/tiny.yaml]\n"
                           "    args: {x: '${b}'}\n  - {name: a, stage: sft, config: [x.yaml], extra: 1}\n")
    with pytest.raises(SystemExit):
        pipeline.main(["--config", str(path), "--out", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert [int(line.split(":")[1]) for line in lines] == [3, 5, 6, 6, 6]


def test_the_example_pipeline_parses(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    pipeline.main(["--config", "configs/pipeline/quickstart-chain.yaml", "--out", "/nonexistent/out", "--dry-run"])
    out = capsys.readouterr().out
    assert "--model.backbone.path=/nonexistent/out/sft" in out and "--members=3" in out
    assert "'--model.reward.models=[{\"path\": \"/nonexistent/out/reward\"}]'" in out


@pytest.mark.parametrize("example", ["quickstart-chain", "quickstart"])
def test_the_example_pipeline_stages_parse_against_their_recipes(example, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    example = pipeline.load(f"configs/pipeline/{example}.yaml")
    for stage in example.stages:
        if stage.tool:
            continue
        args = pipeline.stage_args(example, stage, "/tmp/out")[1:]
        assert "/tmp/out/" + stage.name in printed_config(stage.stage, args, monkeypatch, capsys)


# ---- (d) skip / --from / changed args, with a stand-in for the stage process ----

CHAIN = """stages:
  - name: sft
    stage: sft
    config: [configs/sft/tiny.yaml]
    args: {{trainer.max_steps: {sft_steps}}}
  - name: other
    stage: sft
    config: [configs/sft/tiny.yaml]
  - name: dpo
    stage: dpo
    config: [configs/dpo/tiny.yaml]
    args: {{model.policy.path: "${{sft}}"}}
  - name: rs
    stage: rs
    config: [configs/rs/tiny.yaml]
    args: {{model.policy.path: "${{dpo}}"}}
"""


@pytest.fixture
def fake_stages(monkeypatch):
    """pipeline.launch replaced: a stage 'runs' by writing the marker into its save_dir; -> names run, in order."""
    ran = []

    def launch(command, log):
        save_dir = Path(next(a.split("=", 1)[1] for a in command if a.startswith("--model.save_dir=")))
        save_dir.mkdir(parents=True, exist_ok=True)
        (save_dir / MARKER).write_text("{}")
        ran.append(save_dir.name)
        return 0

    monkeypatch.setattr(pipeline, "launch", launch)
    monkeypatch.chdir(ROOT)
    return ran


def test_from_and_changed_args_rerun_the_stage_and_its_dependents(tmp_path, fake_stages, capsys):
    out = tmp_path / "out"
    path = write(tmp_path, CHAIN.format(sft_steps=2))

    def run(*extra):
        fake_stages.clear()
        pipeline.main(["--config", str(path), "--out", str(out), *extra])
        return list(fake_stages)

    assert run() == ["sft", "other", "dpo", "rs"]
    first = json.loads((out / "manifest.json").read_text())
    assert [e["status"] for e in first["stages"]] == ["done"] * 4
    assert run() == []  # all done, unchanged
    assert run("--from", "dpo") == ["dpo", "rs"]
    assert run("--from", "other") == ["other", "dpo", "rs"]  # every later stage, referenced or not
    write(tmp_path, CHAIN.format(sft_steps=3))
    assert run() == ["sft", "dpo", "rs"]  # `other` does not reference sft
    assert run() == []
    (out / "dpo" / MARKER).unlink()  # an artifact without the marker is not done
    assert run() == ["dpo", "rs"]
    last = json.loads((out / "manifest.json").read_text())
    assert [e["config_hash"] for e in last["stages"]][1:] == [e["config_hash"] for e in first["stages"]][1:]
    assert last["stages"][0]["config_hash"] != first["stages"][0]["config_hash"]


def test_an_ensemble_reruns_fresh_but_resumes_keeping_its_saved_members(tmp_path, fake_stages, monkeypatch):
    out = tmp_path / "out"
    path = write(tmp_path, "stages:\n  - {name: sft, stage: sft, config: [configs/sft/tiny.yaml]}\n"
                           "  - {name: rm, stage: reward, config: [configs/reward/tiny.yaml], members: 2,"
                           " args: {model.backbone.path: '${sft}'}}\n")
    seen = []

    def launch(command, log):  # --members: trains only members without the marker, as recipes/reward.py
        save_dir = Path(next(a.split("=", 1)[1] for a in command if a.startswith("--model.save_dir=")))
        if "--members=2" not in command:
            (save_dir.mkdir(parents=True, exist_ok=True), (save_dir / MARKER).write_text("{}"))
            return 0
        assert "--ckpt_path=last" not in command  # --members refuses it
        seen.append(sorted(p.parent.name for p in save_dir.glob("member_*/" + MARKER)))
        (save_dir / "member_0").mkdir(parents=True, exist_ok=True)
        (save_dir / "member_0" / MARKER).write_text("{}")
        if len(seen) == 1:
            return -9  # killed after member 0
        (save_dir / "member_1").mkdir(parents=True, exist_ok=True)
        (save_dir / "member_1" / MARKER).write_text("{}")
        return 0

    monkeypatch.setattr(pipeline, "launch", launch)
    with pytest.raises(SystemExit):
        pipeline.main(["--config", str(path), "--out", str(out)])
    pipeline.main(["--config", str(path), "--out", str(out)])  # resumes: member_0 kept
    pipeline.main(["--config", str(path), "--out", str(out), "--from", "rm"])  # afresh: both removed first
    assert seen == [[], ["member_0"], []]
    assert [e["resumed"] for e in manifest(out)] == [False, False]


def test_a_failed_stage_stops_the_pipeline_with_one_line(tmp_path, fake_stages, monkeypatch, capsys):
    out = tmp_path / "out"
    path = write(tmp_path, CHAIN.format(sft_steps=2))

    def launch(command, log):
        log.write_text("a traceback\nValueError: boom\n")
        return 1

    monkeypatch.setattr(pipeline, "launch", launch)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["pipeline", "--config", str(path), "--out", str(out)])
    assert exit_.value.code == cli.EXIT_CODES["StageFailedError"] == 6
    err = capsys.readouterr().err.strip()
    assert err == (f"rlhf pipeline: stage sft (rlhf sft fit) failed with exit code 1; log: {out / 'sft.log'} "
                   "(last line: ValueError: boom)")
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    assert [(e["status"], e.get("exit_code")) for e in stages] == [("failed", 1)] + [("pending", None)] * 3


# ---- (b) and (c): real stages in their own processes ----

TINY = """stages:
  - name: sft
    stage: sft
    config: [configs/sft/tiny.yaml]
    args:
      trainer.max_steps: 2
      trainer.val_check_interval: 2
      trainer.limit_val_batches: 1
  - name: dpo
    stage: dpo
    config: [configs/dpo/tiny.yaml]
    args:
      model.policy.path: ${sft}
      trainer.max_steps: 4
      trainer.limit_val_batches: 0
      checkpoint.every_n_train_steps: 1
      trainer.callbacks: [{class_path: tests.test_pipeline.KillPipelineAt}]
"""
SAME = ("name", "stage", "status", "artifact", "run_dir", "config_hash", "exit_code")


def run_pipeline(config: Path, out: Path, kill_at: int | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != KILL_ENV}
    if kill_at is not None:
        env[KILL_ENV] = str(kill_at)
    return subprocess.run([sys.executable, "-m", "recipes.cli", "pipeline", "--config", str(config), "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, start_new_session=True)


def manifest(out: Path) -> list[dict]:
    return json.loads((out / "manifest.json").read_text())["stages"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """(pipeline file, run folder) of one uninterrupted run of TINY."""
    tmp = tmp_path_factory.mktemp("pipeline")
    config = write(tmp, TINY)
    done = run_pipeline(config, tmp / "full")
    assert done.returncode == 0, done.stdout + done.stderr
    return config, tmp / "full"


@pytest.mark.slow
def test_two_stages_run_and_a_rerun_skips_both(finished):
    config, out = finished
    stages = manifest(out)
    assert [(e["name"], e["status"], e["exit_code"]) for e in stages] == [("sft", "done", 0), ("dpo", "done", 0)]
    assert all((out / e["artifact"] / MARKER).is_file() for e in stages)
    assert stages[1]["inputs"] == {"sft": stages[0]["run_id"]}
    assert f"--model.policy.path={out / 'sft'}" in stages[1]["command"]
    assert "val/loss" in stages[0]["metrics"]
    logs = {e["name"]: (out / f"{e['name']}.log").read_text() for e in stages}
    again = run_pipeline(config, out)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("skipped (done, unchanged)") == 2
    assert manifest(out) == stages  # same started times, run ids, everything
    assert {e["name"]: (out / f"{e['name']}.log").read_text() for e in stages} == logs


@pytest.mark.slow
def test_killed_pipeline_resumes_the_interrupted_stage_from_its_checkpoint(finished, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    config, full = finished
    out = tmp_path / "killed"
    killed = run_pipeline(config, out, kill_at=2)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    stages = manifest(out)
    assert [e["status"] for e in stages] == ["done", "running"]
    assert list((out / "dpo.run" / "0").rglob("last.ckpt")) and not (out / "dpo" / MARKER).exists()

    pipeline.main(["--config", str(config), "--out", str(out), "--dry-run"])
    dry = capsys.readouterr().out
    assert "# sft: skip (done, unchanged)\n# dpo: resume (interrupted: --ckpt_path last in dpo.run/0)\n" in dry
    assert dry.rstrip().endswith(f"--trainer.default_root_dir={out / 'dpo.run' / '0'} --ckpt_path=last")
    resumed = run_pipeline(config, out)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "sft: skipped (done, unchanged)" in resumed.stdout
    assert "dpo: resuming (interrupted: --ckpt_path last in dpo.run/0)" in resumed.stdout
    assert "rlhf dpo: --ckpt_path last: resuming" in (out / "dpo.log").read_text()
    final = manifest(out)
    assert final[0] == stages[0]  # sft untouched
    assert final[1]["resumed"] and "--ckpt_path=last" in final[1]["command"]
    assert [{k: e[k] for k in SAME} for e in final] == [{k: e[k] for k in SAME} for e in manifest(full)]
    from safetensors.torch import load_file

    for name in ("sft", "dpo"):  # resumed from step 2 of 4, it ends where the uninterrupted run did
        mine, theirs = load_file(out / name / "model.safetensors"), load_file(full / name / "model.safetensors")
        assert all(mine[k].equal(theirs[k]) for k in theirs), name


def test_a_second_pipeline_on_the_same_folder_is_refused(tmp_path, fake_stages, capsys):
    import fcntl

    out = tmp_path / "out"
    out.mkdir()
    path = write(tmp_path, CHAIN.format(sft_steps=2))
    with (out / ".pipeline.lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SystemExit) as exit_:
            pipeline.main(["--config", str(path), "--out", str(out)])
    assert exit_.value.code == 2 and fake_stages == []
    assert "another rlhf pipeline is running in" in capsys.readouterr().err


# ---- (e) rounds: fresh samples, labels, a retrained reward model, the policy; tools as stages ----

LOOP = """out: unused
stages:
  - {name: sft, stage: sft, config: [configs/sft/tiny.yaml]}
  - {name: base_samples, stage: generate, args: {model: "${sft}", prompts: "${out}/val.jsonl"}}
rounds:
  count: 2
  stages:
    - name: samples
      stage: generate
      args: {model: "${policy|sft}", prompts: "${out}/pool.jsonl", part: "${round}", parts: 3, seed: "${round}"}
    - name: labels
      stage: label
      args: {samples: "${samples}", add_to: "${labels|${out}/data.jsonl}", flip: 0.1}
    - name: rm
      stage: reward
      config: [configs/reward/tiny.yaml]
      args: {data.train_file: "${labels}"}
    - name: policy
      stage: rs
      config: [configs/rs/tiny.yaml]
      args: {model.policy.path: "${policy|sft}", model.reward.models: [{path: "${rm}"}]}
    - name: eval
      stage: eval
      args: {policy: "${policy}", baseline: "${samples|base_samples}", reference_model: "${sft}"}
"""


def _flag(command: list[str], key: str) -> str:
    return next(a.split("=", 1)[1] for a in command if a.startswith(f"--{key}="))


@pytest.fixture
def fake_loop(monkeypatch):
    """pipeline.launch replaced: a training stage writes the marker into its save_dir, generate and label write
    their --out file, eval its eval.json; -> the commands run, in order."""
    ran = []

    def launch(command, log):
        ran.append(command)
        if "datamodules.labelling" in command or "generate" in command:
            Path(_flag(command, "out")).write_text('{"row": 1}\n{"row": 2}\n')
        elif "eval" in command:
            folder = Path(_flag(command, "out"))
            folder.mkdir(parents=True)
            (folder / "eval.json").write_text(json.dumps(
                {"win_rate": {"win_rate": 0.5 + 0.1 * len(ran)}, "policy": {"score": {"mean": 0.25}},
                 "kl": {"kl": 1.5}}))
        else:
            save_dir = Path(_flag(command, "model.save_dir"))
            save_dir.mkdir(parents=True, exist_ok=True)
            (save_dir / MARKER).write_text("{}")
        return 0

    monkeypatch.setattr(pipeline, "launch", launch)
    monkeypatch.chdir(ROOT)
    return ran


def test_rounds_expand_with_the_previous_rounds_artifacts(tmp_path, fake_loop):
    path, out = write(tmp_path, LOOP), tmp_path / "out"
    pipeline.main(["--config", str(path), "--out", str(out)])
    names = [e["name"] for e in manifest(out)]
    assert names == ["sft", "base_samples", *[f"r{k}.{n}" for k in (1, 2) for n in ("samples", "labels", "rm",
                                                                                       "policy", "eval")]]
    by_name = dict(zip(names, fake_loop))
    # round 1 falls back: the policy is sft, the data so far the file given; round 2 takes round 1's
    assert _flag(by_name["r1.samples"], "model") == str(out / "sft")
    assert _flag(by_name["r2.samples"], "model") == str(out / "r1.policy")
    assert (_flag(by_name["r1.samples"], "part"), _flag(by_name["r2.samples"], "part")) == ("1", "2")
    assert _flag(by_name["r2.samples"], "seed") == "2" and _flag(by_name["r2.samples"], "parts") == "3"
    assert _flag(by_name["r1.labels"], "add_to") == str(out / "data.jsonl")
    assert _flag(by_name["r2.labels"], "add_to") == str(out / "r1.labels.jsonl")
    assert _flag(by_name["r2.labels"], "samples") == str(out / "r2.samples.jsonl")  # this round's
    assert by_name["r2.labels"][1:3] == ["-m", "datamodules.labelling"]
    assert _flag(by_name["r2.rm"], "data.train_file") == str(out / "r2.labels.jsonl")
    assert _flag(by_name["r2.policy"], "model.policy.path") == str(out / "r1.policy")
    assert json.loads(_flag(by_name["r2.policy"], "model.reward.models")) == [{"path": str(out / "r2.rm")}]
    assert _flag(by_name["r1.eval"], "out") == str(out / "r1.eval")
    # ${x|fallback} of a stage earlier in the round is still the previous round's
    assert (_flag(by_name["r1.eval"], "baseline"), _flag(by_name["r2.eval"], "baseline")) == (
        str(out / "base_samples.jsonl"), str(out / "r1.samples.jsonl"))
    stages = {e["name"]: e for e in manifest(out)}
    assert stages["r2.policy"]["inputs"] == {"r1.policy": stages["r1.policy"]["run_id"],
                                             "r2.rm": stages["r2.rm"]["run_id"]}
    assert [stages[f"r{k}.eval"]["round"] for k in (1, 2)] == [1, 2] and stages["sft"]["round"] is None
    assert stages["r1.labels"]["metrics"] == {"rows": 2}
    # launches 3 + 5 (sft, base_samples, r1.*) and 3 + 5 + 5: win rates 0.5 + 0.1 * 7 and 0.5 + 0.1 * 12
    assert stages["r1.eval"]["metrics"] == {"win_rate": pytest.approx(1.2), "score": 0.25, "kl": 1.5}
    table = (out / "rounds.md").read_text()
    assert "| round | samples/rows | labels/rows | eval/win_rate | eval/score | eval/kl | wall_s |" in table
    assert "| 2 | 2 | 2 | 1.7 | 0.25 | 1.5 |" in table and (out / "rounds.png").stat().st_size > 0


def test_rounds_zero_runs_the_stages_before_the_rounds_only_and_a_negative_count_is_refused(tmp_path, fake_loop):
    path, out = write(tmp_path, LOOP), tmp_path / "out"
    pipeline.main(["--config", str(path), "--out", str(out), "--rounds", "0"])
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    assert stages and all(s["round"] is None and s["status"] == "done" for s in stages)
    assert not any("/r1." in " ".join(c) for c in fake_loop)
    with pytest.raises(SystemExit) as exit_:
        pipeline.main(["--config", str(path), "--out", str(out), "--rounds", "-1"])
    assert exit_.value.code == 2


def test_more_rounds_run_only_the_new_round_and_a_changed_generate_starts_a_new_file(tmp_path, fake_loop):
    path, out = write(tmp_path, LOOP), tmp_path / "out"
    pipeline.main(["--config", str(path), "--out", str(out), "--rounds", "1"])
    fake_loop.clear()
    pipeline.main(["--config", str(path), "--out", str(out), "--rounds", "2"])
    assert [_flag(c, "out") if "--out=" in " ".join(c) else _flag(c, "model.save_dir") for c in fake_loop] == [
        str(out / f"r2.{n}") + (".jsonl" if n in ("samples", "labels") else "") for n in
        ("samples", "labels", "rm", "policy", "eval")]
    fake_loop.clear()
    seen = []
    pipeline.launch, real = (
        (lambda command, log: seen.append(Path(_flag(command, "out")).exists()) or 0),
        pipeline.launch,
    )
    try:
        pipeline.main(["--config", str(path), "--out", str(out), "--from", "r2.samples", "--rounds", "2"])
    except SystemExit:
        pass  # the stand-in writes no output: r2.samples 'exits 0 without its file'
    finally:
        pipeline.launch = real
    assert seen[0] is False  # the old r2.samples.jsonl was removed before the fresh run


def test_a_human_labeller_short_of_labels_stops_the_pipeline_until_they_are_in(tmp_path, fake_loop, monkeypatch,
                                                                              capsys):
    path, out = write(tmp_path, LOOP.replace("flip: 0.1", "labeller: human")), tmp_path / "out"
    real, waiting = pipeline.launch, [True]

    def launch(command, log):
        if "datamodules.labelling" in command and waiting[0]:
            log.write_text("waiting for labels: 0 of 2 items labelled (need 2); queue: q; labels: l\n")
            return 7
        return real(command, log)

    monkeypatch.setattr(pipeline, "launch", launch)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["pipeline", "--config", str(path), "--out", str(out), "--rounds", "1"])
    assert exit_.value.code == cli.EXIT_CODES["LabelsPendingError"] == pipeline.LABELS_PENDING_EXIT == 7
    assert capsys.readouterr().err.strip() == (
        "rlhf pipeline: stage r1.labels waits for human labels: waiting for labels: 0 of 2 items labelled (need 2); "
        "queue: q; labels: l; label them and run the same command again")
    assert [e["status"] for e in manifest(out)] == ["done", "done", "done", "waiting", "pending", "pending", "pending"]
    waiting[0], before = False, len(fake_loop)
    pipeline.main(["--config", str(path), "--out", str(out), "--rounds", "1"])
    assert [c[2] if c[2] != "recipes.cli" else c[3] for c in fake_loop[before:]] == [
        "datamodules.labelling", "reward", "rs", "eval"]  # the labels stage runs again, then the rest
    assert [e["status"] for e in manifest(out)] == ["done"] * 7


TINY_LOOP = """stages:
  - name: sft
    stage: sft
    config: [configs/sft/tiny.yaml]
    args: {trainer.max_steps: 2, trainer.limit_val_batches: 0}
rounds:
  count: 1
  stages:
    - name: samples
      stage: generate
      args: {model: "${policy|sft}", prompts: tests/fixtures/synthetic/prompts_val.jsonl, part: "${round}", parts: 4,
             num_samples: 2, max_new_tokens: 6, device: cpu}
    - name: labels
      stage: label
      args: {samples: "${samples}", add_to: "${labels|tests/fixtures/synthetic/pairs_train.jsonl}",
             judge: "{oracle: synthetic}"}
    - name: rm
      stage: reward
      config: [configs/reward/tiny.yaml]
      args: {data.train_file: "${labels}", trainer.max_steps: 2, trainer.limit_val_batches: 0}
    - name: policy
      stage: rs
      config: [configs/rs/tiny.yaml]
      args: {model.policy.path: "${policy|sft}", model.reward.models: [{path: "${rm}"}], trainer.max_steps: 2,
             trainer.limit_val_batches: 0}
    - name: eval
      stage: eval
      args: {policy: "${samples}", judge: "{oracle: synthetic}", device: cpu}
"""


@pytest.mark.slow
def test_a_real_round_samples_labels_retrains_and_optimises(tmp_path):
    """The real processes of one round on the tiny model: 8 fresh prompts x 2 samples, labelled by the oracle and
    added to the 256 fixture pairs, a reward model on them, rejection sampling against it, an evaluation."""
    config, out = write(tmp_path, TINY_LOOP), tmp_path / "out"
    done = run_pipeline(config, out)
    assert done.returncode == 0, done.stdout + done.stderr
    stages = {e["name"]: e for e in manifest(out)}
    assert [e["status"] for e in stages.values()] == ["done"] * 6
    samples = [json.loads(line) for line in (out / "r1.samples.jsonl").read_text().splitlines()]
    assert sorted({r["index"] for r in samples}) == list(range(8)) and len(samples) == 16  # part 1 of 4 of 32
    labels = (out / "r1.labels.jsonl").read_text().splitlines()
    pairs = (ROOT / "tests/fixtures/synthetic/pairs_train.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in labels[:256]] == [json.loads(line) for line in pairs]
    new = [json.loads(line) for line in labels[256:]]
    assert len(new) <= 8 and all(len(r["responses"]) == 2 and sorted(r["ranks"]) == [0, 1] for r in new)
    assert stages["r1.labels"]["metrics"] == {"rows": 256 + len(new)}
    assert f"--data.train_file={out / 'r1.labels.jsonl'}" in stages["r1.rm"]["command"]
    assert (out / "r1.policy" / MARKER).is_file() and (out / "r1.eval" / "eval.json").is_file()
    assert "| 1 | 16 |" in (out / "rounds.md").read_text()
    again = run_pipeline(config, out)
    assert again.returncode == 0 and again.stdout.count("skipped (done, unchanged)") == 6


def test_the_rounds_table_takes_an_ensembles_member_mean_and_sums_wall_times():
    from recipes.pipeline_rounds import round_table

    stages = [{"name": "sft", "round": None, "status": "done", "wall_s": 5, "metrics": {"val/loss": 1.0}},
              {"name": "r1.rm", "round": 1, "status": "done", "wall_s": 10,
               "metrics": {"member_0": {"val/acc": 0.5}, "member_1": {"val/acc": 0.7}}},
              {"name": "r1.eval", "round": 1, "status": "done", "wall_s": 2, "metrics": {"win_rate": 0.6}},
              {"name": "r2.rm", "round": 2, "status": "running", "wall_s": None, "metrics": {}}]
    columns, table = round_table({"stages": stages})
    assert columns == ["rm/val/acc", "eval/win_rate"]  # not the stages before the rounds, nor unfinished ones
    assert table == {1: {"wall_s": 12.0, "rm/val/acc": pytest.approx((0.5 + 0.7) / 2), "eval/win_rate": 0.6}}


@pytest.mark.parametrize(
    "path", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs" / "pipeline").glob("*.yaml"))
)
def test_every_shipped_pipelines_tool_stages_parse_with_the_tools_own_flags(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    pipeline.check_tools(pipeline.load(path))  # raises PipelineConfigError naming file:line otherwise


def test_a_path_fallback_may_hold_round_out_and_earlier_stages_and_nothing_else(tmp_path, fake_loop):
    text = LOOP.replace('"${labels|${out}/data.jsonl}"', '"${labels|${out}/data/r${round}.jsonl}"')
    path, out = write(tmp_path, text), tmp_path / "out"
    loaded = pipeline.load(str(path))
    r1_labels = next(s for s in loaded.stages if s.name == "r1.labels")
    assert "round" not in r1_labels.refs  # ${round} inside the fallback is the round, not a stage
    pipeline.main(["--config", str(path), "--out", str(out), "--rounds", "1"])
    labels = next(c for c in fake_loop if "datamodules.labelling" in c)
    assert _flag(labels, "add_to") == str(out / "data" / "r1.jsonl")
    for bad in ("${nosuch}/x.jsonl", "${samples}/x.jsonl"):  # no such stage; a stage of the round (no round 0)
        path = write(tmp_path, LOOP.replace('"${labels|${out}/data.jsonl}"', f'"${{labels|{bad}}}"'), "bad.yaml")
        with pytest.raises(pipeline.PipelineConfigError, match=r"bad.yaml:\d+: stage labels: args: \$\{labels\|"
                           r".*the fallback's \$\{(nosuch|samples)\} is none of"):
            pipeline.load(str(path))


def test_a_rerun_that_exits_0_without_saving_is_a_failure_not_the_old_model(tmp_path, fake_loop, monkeypatch):
    """Lightning stops on SIGTERM with exit code 0 and saves nothing: the previous run's export must not pass."""
    path = write(tmp_path, "stages:\n  - {name: sft, stage: sft, config: [configs/sft/tiny.yaml]}\n")
    out = tmp_path / "o"
    pipeline.main(["--config", str(path), "--out", str(out)])
    monkeypatch.setattr(pipeline, "launch", lambda command, log: 0)  # the re-run "succeeds" and writes nothing
    with pytest.raises(SystemExit) as done:
        pipeline.main(["--config", str(path), "--out", str(out), "--set", "trainer.max_steps=3"])  # config changed
    assert done.value.code == 6
    assert "as an earlier run wrote it (stopped before saving?)" in (out / "sft.log").read_text()
    assert manifest(out)[0]["status"] == "failed"


def test_fewer_rounds_keep_the_later_rounds_entries(tmp_path, fake_loop):
    path, out = write(tmp_path, LOOP), tmp_path / "out"
    pipeline.main(["--config", str(path), "--out", str(out)])
    pipeline.main(["--config", str(path), "--out", str(out), "--rounds", "1"])
    assert [e["name"] for e in manifest(out)][-5:] == [f"r2.{n}" for n in ("samples", "labels", "rm", "policy",
                                                                           "eval")]
    fake_loop.clear()
    pipeline.main(["--config", str(path), "--out", str(out), "--rounds", "2"])
    assert fake_loop == []  # round 2 is done and unchanged: nothing runs again


def test_a_member_folder_above_the_run_is_no_ensemble_member(tmp_path):
    run_dir = tmp_path / "member_study" / "out" / "sft.run" / "0"
    (run_dir / "version_0").mkdir(parents=True)
    (run_dir / "version_0" / "metrics.csv").write_text("step,val/loss\n1,2.5\n")
    assert pipeline.val_metrics(run_dir) == {"val/loss": 2.5}
    (run_dir / "member_1" / "version_0").mkdir(parents=True)
    (run_dir / "member_1" / "version_0" / "metrics.csv").write_text("step,val/acc\n1,0.7\n")
    assert pipeline.val_metrics(run_dir)["member_1"] == {"val/acc": 0.7}


def test_sigterm_stops_the_pipeline_and_its_stage_and_marks_the_stage_failed(tmp_path):
    """A scheduler's SIGTERM to the pipeline process: the running stage is stopped too (not left writing into OUT
    behind a released lock), the manifest says failed, the exit code is 128 + 15."""
    import time

    path = write(tmp_path, "stages:\n  - {name: sft, stage: sft, config: [configs/sft/tiny.yaml]}\n")
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-m", "recipes.cli", "pipeline", "--config", str(path), "--out",
                             str(out), "--set", "trainer.max_steps=100000"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)

    def stage_pids() -> list[int]:  # processes whose command line names this run's folder, the pipeline's aside
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmdline = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
            except OSError:
                continue
            if f"--trainer.default_root_dir={out}" in cmdline.replace("\0", " "):
                found.append(int(pid))
        return found

    deadline = time.monotonic() + 120
    while not stage_pids() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert stage_pids(), "the stage never started"
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM in stage sft; the same command resumes it" in err
    assert stage_pids() == []  # the stage went with it
    assert manifest(out)[0]["status"] == "failed" and manifest(out)[0]["exit_code"] == 143


def test_a_reward_stage_may_switch_between_one_model_and_an_ensemble(tmp_path, monkeypatch):
    """rlhf reward refuses --members into a folder holding one model, and a single model into a folder of members:
    the pipeline clears what the stage saved before (ours, marked) when it runs it afresh in the other form."""
    seen = []

    def launch(command, log):
        save_dir = Path(_flag(command, "model.save_dir"))
        seen.append((save_dir.exists() and sorted(p.name for p in save_dir.iterdir())) or [])
        if "--members=2" in command:
            for i in range(2):
                (save_dir / f"member_{i}").mkdir(parents=True)
                (save_dir / f"member_{i}" / MARKER).write_text("{}")
        else:
            save_dir.mkdir(parents=True, exist_ok=True)
            (save_dir / MARKER).write_text("{}")
            (save_dir / "config.json").write_text("{}")
        return 0

    monkeypatch.setattr(pipeline, "launch", launch)
    monkeypatch.chdir(ROOT)
    single = "stages:\n  - {name: rm, stage: reward, config: [configs/reward/tiny.yaml]}\n"
    out = tmp_path / "o"
    pipeline.main(["--config", str(write(tmp_path, single)), "--out", str(out)])
    pipeline.main(["--config", str(write(tmp_path, single.replace("}", ", members: 2}"))), "--out", str(out)])
    pipeline.main(["--config", str(write(tmp_path, single)), "--out", str(out)])
    assert seen == [[], [], []]  # each form found the folder cleared of the other
    assert sorted(p.name for p in (out / "rm").iterdir()) == ["config.json", MARKER]
