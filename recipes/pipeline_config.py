"""The `rlhf pipeline` file read with the line of every key and checked whole before any stage runs
(recipes/pipeline.py documents the format and runs it); every problem is one `file:line: reason` line.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

PROG = "rlhf pipeline"
KEYS = ("out", "args", "stages", "rounds")
ROUND_KEYS = ("count", "stages")
STAGE_KEYS = ("name", "stage", "config", "args", "members")
SET_BY_PIPELINE = ("model.save_dir", "trainer.default_root_dir", "ckpt_path", "members", "config")
# tools a stage can run besides the five training stages: (module run with python -m, its first arguments,
# the module whose build_parser() reads its flags)
TOOLS = {
    "generate": ("recipes.cli", ["generate"], "recipes.generate"),  # K samples per prompt -> OUT/<name>.jsonl
    "label": ("datamodules.labelling", [], "datamodules.labelling"),  # samples -> rankings, data so far + new
    "relabel": ("recipes.cli", ["relabel"], "recipes.relabel"),  # samples -> SFT rows of the prompts they fulfil
    "eval": ("recipes.cli", ["eval"], "recipes.eval"),  # win rate / judge score / KL -> OUT/<name>/eval.json
    # answers critiqued and revised under a constitution -> OUT/<name>.jsonl of SFT rows (Constitutional AI)
    "critique-revise": ("recipes.cli", ["critique-revise"], "recipes.critique_revise"),
}
# ${name}, ${round}, ${out}, ${name|fallback} (fallback may hold ${out})
REF = re.compile(r"\$\{((?:[^{}]|\$\{[^{}]*\})*)\}")
NAME = re.compile(r"[A-Za-z0-9_-]+")


class PipelineConfigError(ValueError):
    """The pipeline file is wrong: str() is one `file:line: reason` line per problem."""


# ---- reading the file, with line numbers ----

class _Map(dict):
    line: int = 0
    lines: dict


class _List(list):
    line: int = 0
    lines: list


class _Loader(yaml.SafeLoader):
    """SafeLoader whose mappings and lists remember the (1-based) line of each key / item; duplicate keys are
    recorded in `errors` (PyYAML keeps the last silently)."""

    def __init__(self, stream):
        super().__init__(stream)
        self.errors: list[tuple[int, str]] = []


def _mapping(loader: _Loader, node) -> _Map:
    out = _Map()
    out.line, out.lines = node.start_mark.line + 1, {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if key in out:
            loader.errors.append((line, f"duplicate key {key!r} (also on line {out.lines[key]})"))
        out[key], out.lines[key] = loader.construct_object(value_node, deep=True), line
    return out


def _sequence(loader: _Loader, node) -> _List:
    out = _List(loader.construct_object(n, deep=True) for n in node.value)
    out.line, out.lines = node.start_mark.line + 1, [n.start_mark.line + 1 for n in node.value]
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _sequence)


@dataclass
class Stage:
    name: str  # a round's stage: r<round>.<name>
    stage: str  # sft | reward | dpo | ppo | rs | generate | label | eval | relabel | critique-revise
    configs: list[str]
    args: list[tuple[str, object]]  # (key, value as written, ${name} unresolved; a round's: names made concrete)
    members: int | None = None
    refs: list[str] = field(default_factory=list)  # stages it references, in order
    round: int | None = None  # 1.. for a round's stage
    line: int = 0  # of the stage in the pipeline file

    @property
    def tool(self) -> bool:
        return self.stage in TOOLS

    @property
    def artifact(self) -> str:
        """Its output, relative to the run folder: a model folder, a .jsonl file (generate, label, relabel,
        critique-revise) or an eval folder; what ${name} stands for."""
        return f"{self.name}.jsonl" if self.stage in ("generate", "label", "relabel", "critique-revise") else self.name


@dataclass
class Pipeline:
    path: str
    out: str | None
    args: list[tuple[str, object]]
    stages: list[Stage]  # the stages before the rounds, then each round's, in order
    rounds: int = 0


def _refs(value) -> list[str]:
    if isinstance(value, str):
        return REF.findall(value)
    if isinstance(value, dict):
        return [r for v in value.values() for r in _refs(v)]
    if isinstance(value, list):
        return [r for v in value for r in _refs(v)]
    return []


def _stage_refs(args: list[tuple[str, object]]) -> list[str]:
    """The stages the args reference, in order (${out} is the run folder, not a stage)."""
    return list(dict.fromkeys(r for _, v in args for r in _refs(v) if r != "out"))


def _substitute(value, sub):
    """value with each ${ref} replaced by sub(ref): a string, or a number when the ref is the whole value."""
    if isinstance(value, str):
        whole = REF.fullmatch(value)
        if whole and not isinstance(sub(whole.group(1)), str):
            return sub(whole.group(1))
        return REF.sub(lambda m: str(sub(m.group(1))), value)
    if isinstance(value, dict):
        return {k: _substitute(v, sub) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, sub) for v in value]
    return value


def in_round(stage: Stage, k: int, before: list[str]) -> Stage:
    """A round's stage template made concrete for round k: ${round} -> k; ${x} of a stage earlier in the round ->
    ${r<k>.x}; ${x|fallback} of any stage of the round -> round k-1's ${r<k-1>.x}, or in round 1 the fallback
    (a stage before the rounds, or a path)."""

    def sub(ref: str):
        name, bar, fallback = ref.partition("|")
        if name == "round":
            return k
        if name == "out":
            return "${out}"
        if bar:  # checked by load(): a stage of the round
            if k > 1:
                return f"${{r{k - 1}.{name}}}"
            if NAME.fullmatch(fallback):
                return f"${{{fallback}}}"
            # a path, which may hold ${out}, ${round} and stages before the rounds (checked by load())
            return _substitute(fallback, lambda inner: k if inner == "round" else f"${{{inner}}}")
        if name in before:
            return f"${{r{k}.{name}}}"
        return f"${{{name}}}"

    args = [(key, _substitute(value, sub)) for key, value in stage.args]
    refs = _stage_refs(args)
    return Stage(f"r{k}.{stage.name}", stage.stage, stage.configs, args, stage.members, refs, k, stage.line)


def load(path: str, rounds: int | None = None) -> Pipeline:
    """The pipeline file, checked whole: PipelineConfigError listing every problem, one `file:line:` line each.
    Its rounds are expanded (`rounds` overrides the file's count)."""
    from recipes.cli import STAGES

    try:
        text = Path(path).read_text()
    except OSError as err:
        raise PipelineConfigError(f"{path}: cannot read the pipeline file ({err.strerror})") from None
    loader = _Loader(text)
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        raise PipelineConfigError(f"{path}:{mark.line + 1 if mark else 1}: not valid YAML: {err.problem}") from None
    finally:
        loader.dispose()
    errors = list(loader.errors)

    def check_ref(ref: str, at: int, where: str, defined: list[str], round_names: list[str] | None) -> None:
        name, bar, fallback = ref.partition("|")
        if name == "out" and not bar:  # the run folder
            return
        if round_names is None:  # before the rounds
            if name == "round" or bar:
                errors.append((at, f"{where}args: ${{{ref}}}: ${{round}} and ${{name|fallback}} are for the stages "
                                   "of `rounds`"))
            elif name not in defined:
                errors.append((at, f"{where}args: ${{{ref}}} names no stage defined before this stage "
                                   "(references must point backwards, so no cycles)"))
            return
        if name == "round" and not bar:
            return
        later = [n for n in round_names if n not in defined]
        if bar:
            if name not in round_names:
                errors.append((at, f"{where}args: ${{{ref}}}: `name|fallback` is the previous round's stage `name`, "
                                   f"or `fallback` in round 1; {name!r} is not a stage of the round"))
            if not fallback or (NAME.fullmatch(fallback) and fallback not in defined):
                errors.append((at, f"{where}args: ${{{ref}}}: the fallback must be a stage defined before the rounds "
                                   "or a path (with a /)"))
            for inner in REF.findall(fallback):  # a path's own references: round 1 has no previous round
                if inner not in ("out", "round") and (inner not in defined or inner in round_names):
                    errors.append((at, f"{where}args: ${{{ref}}}: the fallback's ${{{inner}}} is none of ${{out}}, "
                                       "${round} or a stage defined before the rounds"))
        elif name in later:
            errors.append((at, f"{where}args: ${{{ref}}} is this stage or a later one of the round: for the previous "
                               f"round's, give round 1 a fallback: ${{{name}|STAGE_OR_PATH}}"))
        elif name not in defined:
            errors.append((at, f"{where}args: ${{{ref}}} names no stage defined before this stage "
                               "(references must point backwards, so no cycles)"))

    def check_args(args, line: int, where: str, defined: list[str] | None, round_names=None, tool=False):
        if args is None:
            return []
        if not isinstance(args, dict):
            errors.append((line, f"{where}args must be a mapping of key: value (e.g. trainer.max_steps: 10)"))
            return []
        for key, value in args.items():
            at = args.lines[key]
            reserved = ("out",) if tool else SET_BY_PIPELINE
            if str(key).lstrip("-") in reserved:
                errors.append((at, f"{where}args: {key} is set by the pipeline (save_dir and a tool's out: "
                                   "OUT/<name>, run root: OUT/<name>.run, config: the `config` key, members: the "
                                   "`members` key)"))
            for ref in _refs(value):
                if defined is None and ref != "out":
                    errors.append((at, f"{where}args: ${{{ref}}}: the pipeline-wide args cannot reference stages"))
                elif defined is not None:
                    check_ref(ref, at, where, defined, round_names)
        return [(str(k).lstrip("-"), v) for k, v in args.items()]

    def read_stages(raw, line: int, names: list[str], round_names: list[str] | None) -> list[Stage]:
        """Checks a list of stages; `names` (the stages defined so far) grows as it goes."""
        stages = []
        if not isinstance(raw, list) or not raw:
            errors.append((line, "stages must be a non-empty list of stages"))
            return stages
        for item, item_line in zip(raw, raw.lines if isinstance(raw, _List) else []):
            if not isinstance(item, dict):
                errors.append((item_line, "a stage is a mapping with keys " + ", ".join(STAGE_KEYS)))
                continue
            at = item.lines.get
            for key in item:
                if key not in STAGE_KEYS:
                    errors.append((item.lines[key],
                                   f"unknown stage key {key!r} (the keys are {', '.join(STAGE_KEYS)})"))
            name = item.get("name")
            if not isinstance(name, str) or not NAME.fullmatch(name) or name in ("round", "out"):
                errors.append((at("name", item_line), f"stage name {name!r}: give each stage a name of letters, "
                                                      "digits, _ or - (not `round` or `out`)"))
                name = None
            elif name in names:
                errors.append((at("name"), f"duplicate stage name {name!r}"))
            where = f"stage {name}: " if name else ""
            stage = item.get("stage")
            if stage not in STAGES and stage not in TOOLS:
                errors.append((at("stage", item_line), f"{where}unknown stage {stage!r} (one of "
                                                       f"{', '.join([*STAGES, *TOOLS])})"))
            configs = item.get("config")
            configs = [configs] if isinstance(configs, str) else configs
            if stage in TOOLS:
                if "config" in item:
                    errors.append((at("config"), f"{where}config: a {stage} stage takes its options as args"))
                configs = []
            elif not isinstance(configs, list) or not configs:
                errors.append((at("config", item_line), f"{where}config: give one or more --config files"))
                configs = []
            for i, config in enumerate(configs):
                line_i = configs.lines[i] if isinstance(configs, _List) else at("config")
                if not isinstance(config, str) or not Path(config).is_file():
                    errors.append((line_i, f"{where}config file {config!r} not found (paths are relative to the "
                                           f"current folder, {os.getcwd()})"))
            members = item.get("members")
            if "members" in item:
                if stage != "reward":
                    errors.append((at("members"), f"{where}members trains a reward-model ensemble: only for stage "
                                                  "reward"))
                elif isinstance(members, bool) or not isinstance(members, int) or members < 2:
                    errors.append((at("members"), f"{where}members must be a whole number >= 2, got {members!r}"))
            args = check_args(item.get("args"), at("args", item_line), where, list(names), round_names,
                              stage in TOOLS)
            if name:
                names.append(name)
            stages.append(Stage(name or "", stage, [str(c) for c in configs], args, members,
                                _stage_refs(args), line=item_line))
        return stages

    if not isinstance(data, dict):
        raise PipelineConfigError(f"{path}:1: a pipeline file is a mapping with keys {', '.join(KEYS)}")
    for key in data:
        if key not in KEYS:
            errors.append((data.lines[key], f"unknown key {key!r} (the keys are {', '.join(KEYS)})"))
    out = data.get("out")
    if out is not None and not isinstance(out, str):
        errors.append((data.lines["out"], "out must be a folder path"))
    common = check_args(data.get("args"), data.lines.get("args", 1), "", None)
    names: list[str] = []
    stages = read_stages(data.get("stages"), data.lines.get("stages", data.line), names, None)
    templates, count = [], 0
    if "rounds" in data:
        block = data["rounds"]
        if not isinstance(block, dict):
            errors.append((data.lines["rounds"], "rounds is a mapping with keys count and stages"))
        else:
            for key in block:
                if key not in ROUND_KEYS:
                    errors.append((block.lines[key], f"rounds: unknown key {key!r} (the keys are count, stages)"))
            count = block.get("count", 1)
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                errors.append((block.lines.get("count", block.line), f"rounds: count must be a whole number >= 1, "
                                                                     f"got {count!r}"))
            raw = block.get("stages")
            round_names = [i.get("name") for i in raw if isinstance(i, dict)] if isinstance(raw, list) else []
            templates = read_stages(raw, block.lines.get("stages", block.line), names, round_names)
    if errors:
        raise PipelineConfigError("\n".join(f"{path}:{line}: {reason}" for line, reason in sorted(errors)))
    count = count if rounds is None else rounds
    if templates and count < 0:  # --rounds 0: the stages before the rounds only
        raise PipelineConfigError(f"{PROG}: --rounds must be >= 0, got {count}")
    for k in range(1, count + 1 if templates else 1):
        for i, template in enumerate(templates):
            stages.append(in_round(template, k, [t.name for t in templates[:i]]))
    return Pipeline(path, out, common, stages, count if templates else 0)
