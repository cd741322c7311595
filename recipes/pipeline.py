"""`rlhf pipeline --config configs/pipeline/NAME.yaml [--out DIR] [--from NAME] [--rounds N] [--dry-run]`: stages
and rounds of the RLHF loop chained in one command, each its own process (`rlhf <stage> fit` or a tool), with a
manifest that makes a re-run skip what is done and resume what was interrupted.

The pipeline file:

    out: runs/pipeline/synthetic          # the run folder (--out overrides); relative to the current folder
    args: {trainer.enable_progress_bar: false}   # optional: --key=value given to every stage (before its own)
    stages:
      - name: sft                         # unique, [A-Za-z0-9_-]; later stages refer to it as ${sft}
        stage: sft                        # sft | reward | dpo | ppo | rs
        config: [configs/sft/synthetic.yaml]   # one or more --config files (paths relative to the current folder)
        args: {model.policy.path: runs/base}   # --key=value overrides; lists and mappings go as JSON
      - name: reward
        stage: reward
        config: configs/reward/synthetic.yaml
        args: {model.backbone.path: "${sft}"}
        members: 3                        # optional, reward only: --members 3 (an ensemble in OUT/reward/member_i)

    rounds:                               # optional: the loop, run `count` times (--rounds N overrides)
      count: 2
      stages:                             # each round's stages run as r<k>.<name> (r1.samples, r1.labels, ...)
        - name: samples                   # K samples per prompt from the current policy on a fresh slice
          stage: generate                 # a tool: generate | label | eval | relabel |
                                          # critique-revise, its options as args (no config)
          args: {model: "${rs|sft}", prompts: data/prompts.jsonl, part: "${round}", parts: 4, num_samples: 4}
        - name: labels                    # ranked by a labeller; the file is the data so far plus the new
          stage: label
          args: {samples: "${samples}", add_to: "${labels|data/rankings.jsonl}", judge: "{oracle: synthetic}"}
        - name: reward
          stage: reward
          config: configs/reward/synthetic.yaml
          args: {data.train_file: "${labels}", model.backbone.path: "${sft}"}
        - name: rs
          stage: rs
          config: configs/rs/synthetic-rm.yaml
          args: {model.policy.path: "${rs|sft}", model.reward.models: [{path: "${reward}"}]}

`${name}` is the artifact of an earlier stage: OUT/<name> (a reward ensemble: the folder of its members, which
a RewardSpec expands), OUT/<name>.jsonl of generate and label, the folder of eval.json of eval. References point
backwards only, so a pipeline has no cycles. In a round, `${x}` of a stage earlier in the round is this round's;
`${x|fallback}` of any stage of the round is the previous round's, and in round 1 the fallback (a stage before
the rounds, or a path); `${round}` is the round's number (1, 2, ...). Tools get `--out OUT/<artifact>`
and only their own args (the pipeline-wide args are for the training stages): `generate` is `rlhf generate`,
`label` is `python -m datamodules.labelling` (its human labeller stops the pipeline with exit code 7 until
the labels are in: docs/labelling-queue.md), `eval` is `rlhf eval`. After each round stage, OUT/rounds.md and
OUT/rounds.png show every round's metrics side by side (recipes/pipeline_rounds.py). The pipeline sets
`--model.save_dir OUT/<name>` and `--trainer.default_root_dir OUT/<name>.run/<attempt>` (logs and checkpoints
of that attempt: runs/<stage>/version_N/ under it); stdout and stderr go to OUT/<name>.log.

OUT/manifest.json (rewritten atomically at every status change) holds, per stage: status (pending | running |
done | failed | waiting), artifact and run_dir (relative to OUT), config_hash (of the resolved command with OUT
written `${out}`, and of the contents of its --config files; data files are not hashed), inputs (run_id of each stage
it references when it started), run_id (new at each finish), command, started, wall_s, exit_code, resumed,
round (of a round's stage), and metrics (the last value of each val/ metric in its metrics.csv; a tool's: rows
of its file, or an eval's win_rate, pairwise_win_rate, score and kl).

A re-run skips a stage that is done with the same config_hash and inputs whose artifact holds lightning_rlhf.json
(every member does, for an ensemble). A stage whose config changed runs again, and then so does every stage
that references it, directly or through others (their inputs changed). A stage left running or failed, its
config and inputs unchanged, resumes: `--ckpt_path last` in the same run_dir (the newest last.ckpt of that
attempt); a reward ensemble re-runs `--members`, which skips the members already saved; a tool runs again
(generate continues its file; a fresh run of generate starts a new one). `--from NAME` runs
NAME and every stage after it afresh. Config errors are found before any stage runs, one line each naming the
pipeline file and line (exit 2), a tool stage's flags included (each tool's own parser reads them); a failed
stage stops the pipeline with one line naming it, its exit code and its log (exit 6); a human labeller short
of labels stops it with exit 7. One pipeline at a time per run folder (a lock file, OUT/.pipeline.lock; exit 2
if held).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import yaml

from core.outputs import MARKER, files_stamp, is_ours, progress_path
from datamodules.labelling import LABELS_PENDING_EXIT  # the human labeller's exit code while short of labels
from recipes.pipeline_config import (  # noqa: F401 (re-exported)
    PROG,
    REF,
    SET_BY_PIPELINE,
    TOOLS,
    Pipeline,
    PipelineConfigError,
    Stage,
    load,
)
from recipes.pipeline_rounds import write_rounds
from recipes.report import read_metrics


class StageFailedError(RuntimeError):
    """A stage's process exited nonzero: str() is one line naming the stage, its exit code and its log."""


class LabelsPendingError(RuntimeError):
    """A `label` stage with the human labeller waits for labels (its exit code 7): str() says where."""




# ---- commands, hashes, manifest ----

def _resolve(value, base: str, artifacts: dict[str, str]):
    if isinstance(value, str):
        return REF.sub(lambda m: base if m.group(1) == "out" else f"{base}/{artifacts.get(m.group(1), m.group(1))}",
                       value)
    if isinstance(value, dict):
        return {k: _resolve(v, base, artifacts) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, base, artifacts) for v in value]
    return value


def _arg(value) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value)  # true / false / null / numbers / flow lists and mappings: YAML reads JSON


def check_tools(pipeline: Pipeline) -> None:
    """Each tool stage's flags through the tool's own parser (a typo or a wrong type), before any stage runs:
    PipelineConfigError with one `file:line: reason` per stage (a round's stage once, not once per round)."""
    import contextlib
    import importlib
    import io

    errors, seen = {}, set()
    for stage in pipeline.stages:
        template = stage.name.split(".", 1)[-1]
        if not stage.tool or template in seen:
            continue
        seen.add(template)
        _, first, module = TOOLS[stage.stage]
        parser = importlib.import_module(module).build_parser()
        said = io.StringIO()
        try:
            with contextlib.redirect_stderr(said):
                parser.parse_args(stage_args(pipeline, stage, "OUT")[len(first):])
        except SystemExit:
            reason = said.getvalue().strip().splitlines()[-1] if said.getvalue().strip() else "bad arguments"
            errors[stage.line] = f"stage {template}: {stage.stage} refuses its args: {reason}"
    if errors:
        raise PipelineConfigError("\n".join(f"{pipeline.path}:{line}: {why}" for line, why in sorted(errors.items())))


def program(stage: Stage) -> list[str]:
    """The process a stage runs: `python -m recipes.cli` (stages, generate, eval) or the labelling module."""
    return [sys.executable, "-m", TOOLS[stage.stage][0] if stage.tool else "recipes.cli"]


def stage_args(pipeline: Pipeline, stage: Stage, base: str) -> list[str]:
    """`<stage> fit --config ... --key=value ... --model.save_dir=BASE/<name> [--members=N]`, no run root; a
    tool: its own --key=value then `--out=BASE/<artifact>` (the pipeline-wide args are for the stages only)."""
    artifacts = {s.name: s.artifact for s in pipeline.stages}
    if stage.tool:
        args = [*TOOLS[stage.stage][1], *[f"--{k}={_arg(_resolve(v, base, artifacts))}" for k, v in stage.args]]
        return args + [f"--out={base}/{stage.artifact}"]
    args = [stage.stage, "fit", *[a for c in stage.configs for a in ("--config", c)]]
    args += [f"--{key}={_arg(_resolve(value, base, artifacts))}" for key, value in [*pipeline.args, *stage.args]]
    args.append(f"--model.save_dir={base}/{stage.name}")
    return args + ([f"--members={stage.members}"] if stage.members else [])


def config_hash(pipeline: Pipeline, stage: Stage) -> str:
    """Of the command with the run folder written ${out} (a moved run folder keeps its hashes) and of the
    contents of its --config files."""
    h = hashlib.sha256(json.dumps(stage_args(pipeline, stage, "${out}")).encode())
    for config in stage.configs:
        h.update(Path(config).read_bytes())
    return h.hexdigest()[:16]


def complete(out: Path, stage: Stage) -> bool:
    """The artifact holds the marker (every member of an ensemble does); a tool's output is there (each tool
    writes it whole, by rename; generate's own appending is guarded by the manifest's status)."""
    artifact = out / stage.artifact
    if stage.stage == "eval":
        return (artifact / "eval.json").is_file()
    if stage.tool:
        return artifact.is_file()
    if stage.members:
        return all(is_ours(artifact / f"member_{i}") for i in range(stage.members))
    return is_ours(artifact)


def write_manifest(out: Path, manifest: dict) -> None:
    manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    tmp = out / f".manifest.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, out / "manifest.json")


def read_manifest(out: Path) -> dict[str, dict]:
    try:
        return {e["name"]: e for e in json.loads((out / "manifest.json").read_text())["stages"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def tool_metrics(out: Path, stage: Stage) -> dict:
    """generate / label: the rows of its file; eval: win rate, pairwise win rate, the policy's mean judge score, KL."""
    artifact = out / stage.artifact
    if stage.stage != "eval":
        with artifact.open("rb") as f:
            return {"rows": sum(1 for line in f if line.strip())}
    result = json.loads((artifact / "eval.json").read_text())
    found = {"win_rate": (result.get("win_rate") or {}).get("win_rate"),
             "pairwise_win_rate": (result.get("pairwise") or {}).get("win_rate"),
             "score": ((result.get("policy") or {}).get("score") or {}).get("mean"),
             "kl": (result.get("kl") or {}).get("kl")}
    return {k: v for k, v in found.items() if v is not None}


def val_metrics(run_dir: Path) -> dict:
    """The last (finite) value of each val/ metric in the run's metrics.csv files, oldest first (an ensemble: per
    member)."""
    found = {}
    for path in sorted(run_dir.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime):
        last = {k: series[-1][1] for k, series in read_metrics(path).items() if k.startswith("val/")}
        member = next((p for p in path.relative_to(run_dir).parts if p.startswith("member_")), None)
        (found.setdefault(member, {}) if member else found).update(last)  # a resumed run: its versions in order
    return found


# ---- planning and running ----

def plan(pipeline: Pipeline, out: Path, old: dict[str, dict], start: str | None) -> list[tuple[str, str]]:
    """(action, reason) per stage: skip | run | resume, as a run now would decide (a stage that runs makes every
    stage referencing it run too)."""
    actions, changed, forced = [], set(), False
    for stage in pipeline.stages:
        forced = forced or stage.name == start
        prev = old.get(stage.name) or {}
        same_hash = prev.get("config_hash") == config_hash(pipeline, stage)
        inputs = {r: (old.get(r) or {}).get("run_id") for r in stage.refs}
        same_inputs = prev.get("inputs") == inputs and not changed.intersection(stage.refs)
        run_dir = out / prev["run_dir"] if prev.get("run_dir") else None
        if forced:
            action = ("run", f"--from {start}")
        elif not prev:
            action = ("run", "new")
        elif not same_hash:
            action = ("run", "config changed")
        elif not same_inputs:
            action = ("run", "a stage it references ran again")
        elif prev.get("status") == "done" and complete(out, stage):
            action = ("skip", "done, unchanged")
        elif prev.get("status") == "done":
            action = ("run", f"artifact {stage.artifact} " + ("is missing" if stage.tool else f"lacks {MARKER}"))
        elif prev.get("status") in ("running", "failed", "waiting") and stage.tool:
            action = ("resume", "interrupted: runs again" + {"generate": " (continues its file)",
                                                             "critique-revise": " (continues its saved batches)",
                                                             "label": " (an AI labeller continues its saved pairs)"}
                      .get(stage.stage, ""))
        elif prev.get("status") in ("running", "failed") and stage.members:
            action = ("resume", "interrupted ensemble: members already saved are skipped")
        elif prev.get("status") in ("running", "failed") and run_dir and any(run_dir.rglob("last.ckpt")):
            action = ("resume", f"interrupted: --ckpt_path last in {prev['run_dir']}")
        else:
            action = ("run", f"{prev.get('status', 'pending')}, no checkpoint to resume")
        if action[0] != "skip":
            changed.add(stage.name)
        actions.append(action)
    return actions


class Stopped(Exception):
    """SIGTERM or SIGHUP reached the pipeline (a scheduler's or a closed terminal's): the stage is stopped with it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop(signum, frame):
    raise Stopped(signum)


def launch(command: list[str], log: Path) -> int:
    """Runs one stage; its stdout and stderr are appended to `log`. -> exit code (negative: killed by a signal).
    Interrupted (Ctrl-C, or Stopped), the stage gets SIGTERM (Lightning stops at the step it is on), 60 s, then
    SIGKILL, before the exception goes on: a stopped pipeline leaves no stage running into its folder."""
    with log.open("a") as f:
        f.write(f"\n== {time.strftime('%Y-%m-%dT%H:%M:%S%z')} {' '.join(command)}\n")
        f.flush()
        proc = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT)
        try:
            return proc.wait()
        except BaseException:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            raise


def _last_line(log: Path) -> str:
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def attempt(out: Path, stage: Stage, action: str, entry: dict) -> tuple[str, list[str]]:
    """(run_dir relative to OUT, extra args) of the stage's next attempt: a resume continues in its run_dir with
    `--ckpt_path last` (an ensemble: `--members` skips the saved members); a fresh run gets a new run_dir, so
    `last` never finds an earlier attempt's checkpoint. A tool has no run_dir: (None, [])."""
    if stage.tool:
        return None, []
    if action == "resume":
        run_dir = entry["run_dir"]
    else:
        attempts = [int(p.name) for p in (out / f"{stage.name}.run").glob("*") if p.name.isdigit()]
        run_dir = f"{stage.name}.run/{max(attempts, default=-1) + 1}"
    return run_dir, [f"--trainer.default_root_dir={out / run_dir}",
                     *(["--ckpt_path=last"] if action == "resume" and not stage.members else [])]


def run(pipeline: Pipeline, out: Path, start: str | None = None, dry_run: bool = False) -> dict:
    if dry_run:
        old = read_manifest(out)
        for stage, (action, reason) in zip(pipeline.stages, plan(pipeline, out, old, start)):
            print(f"# {stage.name}: {action} ({reason})")
            if action != "skip":
                extra = attempt(out, stage, action, old.get(stage.name) or {})[1]
                print(shlex.join(program(stage) + stage_args(pipeline, stage, str(out)) + extra))
        return {}
    out.mkdir(parents=True, exist_ok=True)
    with (out / ".pipeline.lock").open("w") as lock:  # held while this runs; a killed process releases it
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PipelineConfigError(f"{PROG}: another rlhf pipeline is running in {out}: wait for it, or choose "
                                      "another --out") from None
        handled = (signal.SIGTERM, signal.SIGHUP)
        main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
        previous = {sig: signal.signal(sig, _stop) for sig in handled} if main_thread else {}
        try:
            return execute(pipeline, out, start)
        except Stopped as err:  # between stages: the manifest says what ran (each write is atomic)
            print(f"{PROG}: stopped by {err}; the same command carries on", file=sys.stderr)
            raise SystemExit(128 + err.signum) from None
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def execute(pipeline: Pipeline, out: Path, start: str | None) -> dict:
    """Runs the stages the plan does not skip, under the lock run() holds."""
    old = read_manifest(out)
    actions = plan(pipeline, out, old, start)
    entries = []
    for stage, (action, _) in zip(pipeline.stages, actions):
        entry = dict(old.get(stage.name) or {}, name=stage.name, stage=stage.stage, round=stage.round,
                     artifact=stage.artifact)
        if action == "run" or not entry.get("status"):
            entry.update(status="pending")
        entries.append(entry)
    # stages this run leaves out (fewer --rounds than before) keep their entries: a later run skips them if unchanged
    current = {stage.name for stage in pipeline.stages}
    entries += [entry for name, entry in old.items() if name not in current]
    manifest = {"pipeline": str(pipeline.path), "out": str(out), "rounds": pipeline.rounds, "stages": entries}
    write_manifest(out, manifest)
    by_name = {e["name"]: e for e in entries}
    for stage, (action, reason), entry in zip(pipeline.stages, actions, entries):
        if action == "skip":
            print(f"{PROG}: {stage.name}: skipped ({reason}): {out / stage.artifact}")
            continue
        if action == "run" and not stage.tool:
            from recipes.reward import (
                clear_members,  # here: it imports Lightning, which the runner itself never needs
            )

            folder = out / stage.name
            if stage.members:  # a fresh ensemble: --members would skip members saved before
                if is_ours(folder):  # a single model this stage saved before it became an ensemble
                    shutil.rmtree(folder)
                clear_members(folder)
            elif any(folder.glob("member_*")) and not is_ours(folder):  # an ensemble it saved, now one model
                clear_members(folder)
                if not any(folder.iterdir()):
                    folder.rmdir()
        if action == "run" and stage.stage == "generate":  # a fresh run: generate would continue an old file
            (out / stage.artifact).unlink(missing_ok=True)
        if action == "run" and stage.tool:  # ... and critique-revise or an AI labeller its saved progress
            progress_path(out / stage.artifact).unlink(missing_ok=True)
        if action == "run":  # what an earlier run left in the artifact: this attempt must replace it
            before = out / stage.artifact  # (an ensemble's members were cleared above; complete() checks each)
            entry["artifact_before"] = files_stamp(before) if before.exists() and not stage.members else None
        run_dir, extra = attempt(out, stage, action, entry)
        command = program(stage) + stage_args(pipeline, stage, str(out)) + extra
        log = out / f"{stage.name}.log"
        entry.update(status="running", run_dir=run_dir, config_hash=config_hash(pipeline, stage),
                     inputs={r: by_name[r].get("run_id") for r in stage.refs}, run_id=None, command=command,
                     started=time.strftime("%Y-%m-%dT%H:%M:%S%z"), wall_s=None, exit_code=None,
                     resumed=action == "resume", metrics={})
        write_manifest(out, manifest)
        print(f"{PROG}: {stage.name}: {'resuming' if action == 'resume' else 'running'} ({reason}); log: {log}",
              flush=True)
        began = time.time()
        try:
            code = launch(command, log)
        except (KeyboardInterrupt, Stopped) as err:
            code = 128 + (err.signum if isinstance(err, Stopped) else signal.SIGINT)
            entry.update(status="failed", wall_s=round(time.time() - began, 3), exit_code=code)
            write_manifest(out, manifest)
            said = f" by {err}" if isinstance(err, Stopped) else ""
            print(f"{PROG}: interrupted{said} in stage {stage.name}; the same command resumes it", file=sys.stderr)
            raise SystemExit(code) from None
        entry.update(wall_s=round(time.time() - began, 3), exit_code=code)
        if code == 0 and not complete(out, stage):
            code = entry["exit_code"] = 1
            with log.open("a") as f:
                f.write(f"{PROG}: exited 0 but {out / stage.name} lacks {MARKER}\n")
        elif code == 0 and entry.get("artifact_before") is not None and (
                files_stamp(out / stage.artifact) == entry["artifact_before"]):
            # e.g. Lightning stops on SIGTERM with exit code 0 and saves nothing: the old model is not this run's
            code = entry["exit_code"] = 1
            with log.open("a") as f:
                f.write(f"{PROG}: exited 0 but left {out / stage.artifact} as an earlier run wrote it (stopped "
                        "before saving?)\n")
        if code == LABELS_PENDING_EXIT and stage.stage == "label":
            entry["status"] = "waiting"
            write_manifest(out, manifest)
            raise LabelsPendingError(f"{PROG}: stage {stage.name} waits for human labels: {_last_line(log)}; "
                                     "label them and run the same command again")
        if code != 0:
            entry["status"] = "failed"
            write_manifest(out, manifest)
            last = _last_line(log)
            command_name = f"rlhf {stage.stage}" + ("" if stage.tool else " fit")
            raise StageFailedError(f"{PROG}: stage {stage.name} ({command_name}) failed with exit code {code}; "
                                   f"log: {log}" + (f" (last line: {last})" if last else ""))
        metrics = tool_metrics(out, stage) if stage.tool else val_metrics(out / run_dir)
        entry.update(status="done", run_id=uuid.uuid4().hex[:12], metrics=metrics)
        write_manifest(out, manifest)
        print(f"{PROG}: {stage.name}: done in {entry['wall_s']:.0f} s: {out / stage.artifact}", flush=True)
        if stage.round is not None:
            write_rounds(out, manifest)
    return manifest


def main(argv: list[str] | None = None) -> dict:
    from recipes.cli import EXIT_CODES

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the pipeline file (configs/pipeline/*.yaml)")
    parser.add_argument("--out", help="the run folder (default: the file's `out`)")
    parser.add_argument("--from", dest="start", metavar="NAME", help="run NAME and every later stage afresh")
    parser.add_argument("--rounds", type=int, metavar="N",
                        help="run N rounds (default: the file's rounds: count; 0: the stages before the rounds only)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="added to the file's pipeline-wide args (every training stage), e.g. "
                             "--set seed_everything=1; repeatable")
    parser.add_argument("--dry-run", action="store_true", help="print each stage's action and command; run nothing")
    args = parser.parse_args(argv)
    try:
        pipeline = load(args.config, args.rounds)
        check_tools(pipeline)
        for item in args.set:
            key, eq, value = item.partition("=")
            if not eq or not key.lstrip("-"):
                raise PipelineConfigError(f"{PROG}: --set {item!r}: give KEY=VALUE")
            if key.lstrip("-") in SET_BY_PIPELINE or any(r != "out" for r in REF.findall(value)):
                raise PipelineConfigError(f"{PROG}: --set {item!r}: the pipeline sets {key} itself, or the value "
                                          "names a stage (only ${out} is known to pipeline-wide args)")
            pipeline.args.append((key.lstrip("-"), yaml.safe_load(value)))
        if args.start is not None and args.start not in [s.name for s in pipeline.stages]:
            raise PipelineConfigError(f"{PROG}: --from {args.start}: no such stage in {args.config} (stages: "
                                      f"{', '.join(s.name for s in pipeline.stages)})")
        out = args.out or pipeline.out
        if not out:
            raise PipelineConfigError(f"{args.config}:1: no `out` folder: set one in the file or give --out")
        return run(pipeline, Path(out).expanduser().absolute(), args.start, args.dry_run)
    except (PipelineConfigError, StageFailedError, LabelsPendingError) as err:
        print(str(err), file=sys.stderr)
        raise SystemExit(EXIT_CODES[type(err).__name__]) from None


if __name__ == "__main__":
    main()
