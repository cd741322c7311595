"""A constitution (Constitutional AI, Bai et al. 2022): principles a model critiques and revises its answers under,
and an AI judge compares two answers under. One YAML file, read by `rlhf critique-revise` and the AI judge labeller:

    principles:                      # a non-empty list
      - name: harmless               # unique, letters, digits, _ or -
        critique: "Point out ..."    # the critique request (required)
        revision: "Rewrite ..."      # the revision request (required)
        comparison: "Which ..."      # optional: the question an AI judge asks comparing two answers
    critique_template: "\\n\\nCritique Request: {request}\\n\\nCritique:"   # optional, models without a chat
    revision_template: "\\n\\nRevision Request: {request}\\n\\nRevision:"   # template: text appended to the
                                                                           # conversation; {request} is the request
    judge_template: "..."            # optional: the judge labeller's own

Every problem (unknown key, a principle without critique or revision, an empty list, a template without
{request}) is reported at once as `file:line: reason` lines, before any model loads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from core.sources import DataError

KEYS = ("principles", "critique_template", "revision_template", "judge_template")
PRINCIPLE_KEYS = ("name", "critique", "revision", "comparison")
NAME = re.compile(r"[A-Za-z0-9_-]+")
CRITIQUE_TEMPLATE = "\n\nCritique Request: {request}\n\nCritique:"
REVISION_TEMPLATE = "\n\nRevision Request: {request}\n\nRevision:"


class ConstitutionError(DataError):
    """A bad constitution file: str() is one `file:line: reason` line per problem."""


@dataclass(frozen=True)
class Principle:
    name: str
    critique: str
    revision: str
    comparison: str | None = None


@dataclass(frozen=True)
class Constitution:
    path: str
    principles: tuple[Principle, ...]
    critique_template: str = CRITIQUE_TEMPLATE
    revision_template: str = REVISION_TEMPLATE
    judge_template: str | None = None


def _text(node) -> str | None:
    """A scalar node's string (None for anything else, e.g. a number, a list, null)."""
    if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:str":
        return node.value
    return None


def _quote(node) -> str:
    """A hint for a scalar YAML reads as something else (`name: true` is a boolean, `name: 1` a number)."""
    if isinstance(node, yaml.ScalarNode) and node.tag != "tag:yaml.org,2002:str" and node.value:
        return f" (YAML reads {node.value!r} as a {node.tag.rsplit(':', 1)[-1]}: quote it)"
    return ""


def _entries(node: yaml.MappingNode, errors: list) -> dict[str, tuple[int, yaml.Node]]:
    """key -> (line, value node); duplicate keys are errors (PyYAML would keep the last silently)."""
    out: dict[str, tuple[int, yaml.Node]] = {}
    for key_node, value_node in node.value:
        key, line = str(key_node.value), key_node.start_mark.line + 1
        if key in out:
            errors.append((line, f"duplicate key {key!r} (also on line {out[key][0]})"))
        out[key] = (line, value_node)
    return out


def load_constitution(path: str | Path) -> Constitution:
    """The constitution at `path`, checked whole: ConstitutionError listing every problem."""
    path = str(path)
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except OSError as err:
        raise ConstitutionError(f"{path}: cannot read the constitution file ({err.strerror})") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        raise ConstitutionError(f"{path}:{mark.line + 1 if mark else 1}: not valid YAML: {err.problem}") from None
    if not isinstance(root, yaml.MappingNode):
        raise ConstitutionError(f"{path}:1: a constitution is a mapping with keys {', '.join(KEYS)}")
    errors: list[tuple[int, str]] = []
    top = _entries(root, errors)
    for key, (line, _) in top.items():
        if key not in KEYS:
            errors.append((line, f"unknown key {key!r} (the keys are {', '.join(KEYS)})"))
    templates = {}
    for key, default in (("critique_template", CRITIQUE_TEMPLATE), ("revision_template", REVISION_TEMPLATE),
                         ("judge_template", None)):
        if key not in top:
            templates[key] = default
            continue
        line, node = top[key]
        value = _text(node)
        if value is None or not value.strip():
            errors.append((line, f"{key} must be a non-empty string{_quote(node)}"))
        elif key == "judge_template":
            pass  # the judge labeller checks its own template
        elif "{request}" not in value:
            errors.append((line, f"{key} must hold {{request}} (where the principle's request goes)"))
        else:
            try:
                value.format(request="x")
            except (KeyError, IndexError, ValueError) as err:
                errors.append((line, f"{key}: only {{request}} may be a placeholder (write other braces as "
                                     f"{{{{ }}}}): {err!r}"))
        templates[key] = value
    principles = []
    if "principles" not in top:
        errors.append((root.start_mark.line + 1, "missing key 'principles' (a non-empty list of principles)"))
    else:
        line, node = top["principles"]
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            errors.append((line, "principles must be a non-empty list of {name, critique, revision, comparison}"))
        else:
            names: dict[str, int] = {}
            for item in node.value:
                at = item.start_mark.line + 1
                if not isinstance(item, yaml.MappingNode):
                    errors.append((at, "a principle is a mapping with keys " + ", ".join(PRINCIPLE_KEYS)))
                    continue
                fields = _entries(item, errors)
                for key, (key_line, _) in fields.items():
                    if key not in PRINCIPLE_KEYS:
                        errors.append((key_line, f"unknown principle key {key!r} (the keys are "
                                                 f"{', '.join(PRINCIPLE_KEYS)})"))
                values = {}
                for key in PRINCIPLE_KEYS:
                    if key not in fields:
                        if key != "comparison":
                            label = _text(fields["name"][1]) if "name" in fields else None
                            who = f"principle {label!r}" if label else "a principle"
                            errors.append((at, f"{who} has no {key!r} ({key} request)" if key != "name"
                                               else f"{who} has no 'name'"))
                        values[key] = None
                        continue
                    key_line, value_node = fields[key]
                    value = _text(value_node)
                    if value is None or not value.strip():
                        errors.append((key_line, f"principle {key} must be a non-empty string{_quote(value_node)}"))
                    values[key] = value
                name = values["name"]
                if name is not None and name.strip():
                    if not NAME.fullmatch(name):
                        errors.append((fields["name"][0], f"principle name {name!r}: letters, digits, _ or - only"))
                    elif name in names:
                        errors.append((fields["name"][0], f"duplicate principle name {name!r} (also on line "
                                                          f"{names[name]})"))
                    names.setdefault(name, fields["name"][0])
                if all(values[k] for k in ("name", "critique", "revision")):
                    principles.append(Principle(values["name"], values["critique"], values["revision"],
                                                values["comparison"]))
    if errors:
        raise ConstitutionError("\n".join(f"{path}:{line}: {reason}" for line, reason in sorted(errors)))
    return Constitution(path, tuple(principles), templates["critique_template"], templates["revision_template"],
                        templates["judge_template"])
