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
KEYS = ("out", "args", "stages")
STAGE_KEYS = ("name", "stage", "config", "args", "members")
SET_BY_PIPELINE = ("model.save_dir", "trainer.default_root_dir", "ckpt_path", "members", "config")
REF = re.compile(r"\$\{([^}]*)\}")
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
    name: str
    stage: str
    configs: list[str]
    args: list[tuple[str, object]]  # (key, value as written: ${name} unresolved)
    members: int | None = None
    refs: list[str] = field(default_factory=list)  # stages it references, in order


@dataclass
class Pipeline:
    path: str
    out: str | None
    args: list[tuple[str, object]]
    stages: list[Stage]


def _refs(value) -> list[str]:
    if isinstance(value, str):
        return REF.findall(value)
    if isinstance(value, dict):
        return [r for v in value.values() for r in _refs(v)]
    if isinstance(value, list):
        return [r for v in value for r in _refs(v)]
    return []


def load(path: str) -> Pipeline:
    """The pipeline file, checked whole: PipelineConfigError listing every problem, one `file:line:` line each."""
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

    def check_args(args, line: int, where: str, defined: list[str] | None) -> list[tuple[str, object]]:
        if args is None:
            return []
        if not isinstance(args, dict):
            errors.append((line, f"{where}args must be a mapping of key: value (e.g. trainer.max_steps: 10)"))
            return []
        for key, value in args.items():
            at = args.lines[key]
            if str(key).lstrip("-") in SET_BY_PIPELINE:
                errors.append((at, f"{where}args: {key} is set by the pipeline (save_dir: OUT/<name>, run root: "
                                   "OUT/<name>.run, config: the `config` key, members: the `members` key)"))
            for ref in _refs(value):
                if defined is None:
                    errors.append((at, f"{where}args: ${{{ref}}}: the pipeline-wide args cannot reference stages"))
                elif ref not in defined:
                    errors.append((at, f"{where}args: ${{{ref}}} names no stage defined before this stage "
                                       "(references must point backwards, so no cycles)"))
        return [(str(k).lstrip("-"), v) for k, v in args.items()]

    if not isinstance(data, dict):
        raise PipelineConfigError(f"{path}:1: a pipeline file is a mapping with keys {', '.join(KEYS)}")
    for key in data:
        if key not in KEYS:
            errors.append((data.lines[key], f"unknown key {key!r} (the keys are {', '.join(KEYS)})"))
    out = data.get("out")
    if out is not None and not isinstance(out, str):
        errors.append((data.lines["out"], "out must be a folder path"))
    common = check_args(data.get("args"), data.lines.get("args", 1), "", None)
    stages, names = [], []
    raw = data.get("stages")
    if not isinstance(raw, list) or not raw:
        errors.append((data.lines.get("stages", data.line), "stages must be a non-empty list of stages"))
        raw = []
    for item, item_line in zip(raw, raw.lines if isinstance(raw, _List) else []):
        if not isinstance(item, dict):
            errors.append((item_line, "a stage is a mapping with keys " + ", ".join(STAGE_KEYS)))
            continue
        line = item.lines.get
        for key in item:
            if key not in STAGE_KEYS:
                errors.append((item.lines[key], f"unknown stage key {key!r} (the keys are {', '.join(STAGE_KEYS)})"))
        name = item.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            errors.append((line("name", item_line), f"stage name {name!r}: give each stage a name of letters, "
                                                    "digits, _ or -"))
            name = None
        elif name in names:
            errors.append((line("name"), f"duplicate stage name {name!r}"))
        where = f"stage {name}: " if name else ""
        stage = item.get("stage")
        if stage not in STAGES:
            errors.append((line("stage", item_line), f"{where}unknown stage {stage!r} (one of {', '.join(STAGES)})"))
        configs = item.get("config")
        configs = [configs] if isinstance(configs, str) else configs
        if not isinstance(configs, list) or not configs:
            errors.append((line("config", item_line), f"{where}config: give one or more --config files"))
            configs = []
        for i, config in enumerate(configs):
            at = configs.lines[i] if isinstance(configs, _List) else line("config")
            if not isinstance(config, str) or not Path(config).is_file():
                errors.append((at, f"{where}config file {config!r} not found (paths are relative to the current "
                                   f"folder, {os.getcwd()})"))
        members = item.get("members")
        if "members" in item:
            if stage != "reward":
                errors.append((line("members"), f"{where}members trains a reward-model ensemble: only for stage "
                                                "reward"))
            elif isinstance(members, bool) or not isinstance(members, int) or members < 2:
                errors.append((line("members"), f"{where}members must be a whole number >= 2, got {members!r}"))
        args = check_args(item.get("args"), line("args", item_line), where, list(names))
        if name:
            names.append(name)
        stages.append(Stage(name or "", stage, [str(c) for c in configs], args, members,
                            list(dict.fromkeys(r for _, v in args for r in _refs(v)))))
    if errors:
        raise PipelineConfigError("\n".join(f"{path}:{line}: {reason}" for line, reason in sorted(errors)))
    return Pipeline(path, out, common, stages)
