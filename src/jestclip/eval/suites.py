"""Evaluation suites: a set of shards plus what to measure on them.

A suite directory (``OUT/eval/<suite>/`` from ``jestclip data build``) holds shards and a ``manifest.json``
with ``classes`` (``{label field: [class names]}``), prompt ``templates`` and ``tasks``:
``zeroshot:FIELD``, ``fewshot:FIELD`` and ``retrieval``. Samples carry their class ids in their JSON as
``labels: {FIELD: id}`` (or a top-level ``FIELD: id``) and, for retrieval, an optional ``concept``: captions
and images of the same concept count as matches (without one, identical captions do).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from jestclip.data.loader import expand_urls

__all__ = ["DEFAULT_TEMPLATES", "EvalSuite", "custom_suite", "find_suites"]

DEFAULT_TEMPLATES = ("a photo of {}.", "a picture of {}.", "an image of {}.")
TASK_KINDS = ("zeroshot", "fewshot", "retrieval")


@dataclass(frozen=True)
class EvalSuite:
    name: str
    urls: list[str]
    tasks: list[str]
    classes: dict[str, list[str]] = field(default_factory=dict)
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))

    def __post_init__(self) -> None:
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
        bad = [t for t in self.templates if "{}" not in t]
        if bad:
            raise ValueError(f"suite {self.name!r}: templates {bad} have no '{{}}' for the class name")

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
            urls=expand_urls(directory),
            tasks=list(manifest["tasks"]),
            classes={k: list(v) for k, v in manifest["classes"].items()},
            templates=list(manifest["templates"]),
        )


def find_suites(path: str | Path, names: list[str] | None = None) -> list[EvalSuite]:
    """The suites under ``path``: a suite directory, a directory of suites (``OUT/eval``) or a benchmark root
    (``OUT``, which holds ``eval/``). ``names`` keeps only those suites, in that order.
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"eval data {path} is not a directory")
    if (path / "manifest.json").exists() and any(path.glob("*.tar")):
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
        names = [n for n in names if n]
        if not names:
            raise ValueError(f"classes file {classes_file} names no classes")
        classes[label_field] = names
        tasks = [f"zeroshot:{label_field}", *([f"fewshot:{label_field}"] if fewshot else []), "retrieval"]
    return EvalSuite(
        name=name,
        urls=expand_urls(shards),
        tasks=tasks,
        classes=classes,
        templates=list(templates or DEFAULT_TEMPLATES),
    )
