"""Evaluation suites: a set of shards plus what to measure on them.

A suite directory (``OUT/eval/<suite>/`` from ``jestclip data build``) holds shards and a ``manifest.json``
with ``classes`` (``{label field: [class names]}``), prompt ``templates`` and ``tasks``:
``zeroshot:FIELD``, ``fewshot:FIELD`` and ``retrieval``. Samples carry their class ids in their JSON as
``labels: {FIELD: id}`` (or a top-level ``FIELD: id``) and, for retrieval, an optional ``concept``: captions
and images of the same concept count as matches (without one, identical captions do).
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from pathlib import Path

from jestclip.data.loader import caption_is_empty, distinct_shards, expand_urls, shard_files

__all__ = ["DEFAULT_TEMPLATES", "EvalSuite", "custom_suite", "find_suites", "template_problem"]

DEFAULT_TEMPLATES = ("a photo of {}.", "a picture of {}.", "an image of {}.")
TASK_KINDS = ("zeroshot", "fewshot", "retrieval")


def template_problem(template: object) -> str | None:
    """Why ``template`` cannot turn a class name into a prompt, or None when it can: it must be a string
    whose only ``str.format`` field is the class name, ``{}`` (or ``{0}``, any number of times; ``{{``
    and ``}}`` are literal braces), as open_clip's zero-shot classifier fills it with ``template.format(c)``.
    """
    if not isinstance(template, str):
        return f"is a {type(template).__name__}, not a string"
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exn:  # a lone brace
        return f"is not a format string ({exn})"
    if not fields:
        return "has no '{}' for the class name"
    others = sorted({name for name in fields if name not in ("", "0")})
    if others:
        return f"has field(s) {others} besides the class name's '{{}}'"
    if fields.count("") > 1:
        return f"has {fields.count('')} '{{}}' fields for the one class name (repeat it as '{{0}}')"
    try:
        template.format("class name")
    except (ValueError, IndexError, KeyError) as exn:  # '{}' mixed with '{0}', a field in a format spec
        return f"cannot be filled in ({type(exn).__name__}: {exn})"
    return None


@dataclass(frozen=True)
class EvalSuite:
    """Shards and what to measure on them; checked when built (tasks, class names, prompt templates), so a
    suite that would fail at its evaluation fails before any sample is encoded or any step is trained."""

    name: str
    urls: list[str]
    tasks: list[str]
    classes: dict[str, list[str]] = field(default_factory=dict)
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))

    def __post_init__(self) -> None:
        for what, value in (("tasks", self.tasks), ("templates", self.templates)):
            if not isinstance(value, list | tuple) or not all(isinstance(x, str) for x in value):
                raise ValueError(f"suite {self.name!r}: {what} must be a list of strings, got {value!r}")
        if not isinstance(self.classes, dict):
            raise ValueError(f"suite {self.name!r}: classes must map label fields to class names")
        for label, names in self.classes.items():
            if not isinstance(names, list | tuple) or not all(
                isinstance(n, str) and not caption_is_empty(n) for n in names
            ):  # empty once open_clip's tokenizer cleans it ('&nbsp;'): every prompt would be the template's
                raise ValueError(
                    f"suite {self.name!r}: classes of {label!r} must be a list of non-empty class names, "
                    f"got {names!r}"
                )
        for task in self.tasks:
            kind, _, label = task.partition(":")
            if kind not in TASK_KINDS or (kind == "retrieval") != (label == ""):
                raise ValueError(
                    f"suite {self.name!r}: task {task!r} is not 'zeroshot:FIELD', 'fewshot:FIELD' "
                    "or 'retrieval'"
                )
            if kind == "zeroshot" and not self.classes.get(label):
                raise ValueError(f"suite {self.name!r}: task {task!r} needs class names for {label!r}")
        if any(t.startswith("zeroshot:") for t in self.tasks) and not self.templates:
            raise ValueError(f"suite {self.name!r}: zero-shot tasks need at least one prompt template")
        for template in self.templates:
            problem = template_problem(template)
            if problem is not None:
                raise ValueError(f"suite {self.name!r}: prompt template {template!r} {problem}")

    @property
    def label_fields(self) -> list[str]:
        """Label fields that some task reads, in task order."""
        fields: list[str] = []
        for task in self.tasks:
            label = task.partition(":")[2]
            if label and label not in fields:
                fields.append(label)
        return fields

    @classmethod
    def from_dir(cls, directory: str | Path) -> EvalSuite:
        directory = Path(directory)
        manifest_path = directory / "manifest.json"
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"{directory} is not an eval suite: it has no manifest.json") from None
        except json.JSONDecodeError as exn:
            raise ValueError(f"{manifest_path}: not valid JSON ({exn})") from None
        missing = [k for k in ("tasks", "classes", "templates") if k not in manifest]
        if missing:
            raise ValueError(f"{manifest_path} lacks {missing}; it is not an eval suite manifest")
        return cls(
            name=directory.name,
            urls=distinct_shards(expand_urls(directory))[0],
            tasks=manifest["tasks"],
            classes=manifest["classes"],
            templates=manifest["templates"],
        )  # checked as they are (a string is no list of class names)


def find_suites(path: str | Path, names: list[str] | None = None) -> list[EvalSuite]:
    """The suites under ``path``: a suite directory, a directory of suites (``OUT/eval``) or a benchmark root
    (``OUT``, which holds ``eval/``). ``names`` keeps only those suites, in that order.
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"eval data {path} is not a directory")
    if (path / "manifest.json").exists() and shard_files(path):  # every shard form the loader reads
        suites = [EvalSuite.from_dir(path)]
    else:
        root = path / "eval" if (path / "eval").is_dir() else path
        suites = [EvalSuite.from_dir(d) for d in sorted(root.iterdir()) if (d / "manifest.json").exists()]
        if not suites:
            raise ValueError(f"no eval suites (directories with manifest.json) under {path}")
    if names:
        by_name = {s.name: s for s in suites}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ValueError(f"unknown suite(s) {unknown} under {path}; found {sorted(by_name)}")
        suites = [by_name[n] for n in names]
    return suites


def custom_suite(
    shards: str | list[str],
    *,
    name: str = "custom",
    classes_file: str | Path | None = None,
    label_field: str = "label",
    templates: list[str] | None = None,
    fewshot: bool = True,
) -> EvalSuite:
    """A suite over any shards: retrieval on their captions, plus zero-shot (and few-shot) classification when
    ``classes_file`` (one class name per line, line i = class id i) is given; ids come from ``label_field``.
    """
    tasks = ["retrieval"]
    classes: dict[str, list[str]] = {}
    if classes_file is not None:
        names = [line.strip() for line in Path(classes_file).read_text(encoding="utf-8").splitlines()]
        while names and not names[-1]:  # trailing blank lines
            names.pop()
        if not names:
            raise ValueError(f"classes file {classes_file} names no classes")
        blank = next((i for i, n in enumerate(names) if caption_is_empty(n)), None)
        if blank is not None:  # dropping it would shift the id of every class after it
            raise ValueError(
                f"classes file {classes_file}: line {blank + 1} (class id {blank}) names no class "
                f"({names[blank]!r}); line i names class id i, so give every id a name"
            )
        classes[label_field] = names
        tasks = [f"zeroshot:{label_field}", *([f"fewshot:{label_field}"] if fewshot else []), "retrieval"]
    return EvalSuite(
        name=name,
        urls=distinct_shards(expand_urls(shards))[0],  # each shard once, as the stream reads it
        tasks=tasks,
        classes=classes,
        templates=list(templates or DEFAULT_TEMPLATES),
    )
