"""A study as data: named steps (train a run, cache a reference, write a keep list), each with its exact
command, the steps it needs first and how to tell it is done; run in order, skipping finished ones, each
training run's logs (config.json, metrics.jsonl; no weights) copied from runs/ to results/ when it finishes.

Every step is resumable (a run directory resumes; a cache keeps finished shards), so a study's command can be
repeated until it is done, and its runs can span sessions. Paths are relative to the checkout.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["ROOT", "Step", "copy_logs", "keep_logs", "run", "run_steps", "train_step", "with_needs"]


@dataclasses.dataclass(frozen=True)
class Step:
    """One step of a study: its command, the steps it needs first, and where it leaves its result."""

    command: tuple[str, ...]
    needs: tuple[str, ...] = ()
    run_dir: str | None = None  # training runs: their run directory (done when it holds model.pt)
    results: str | None = None  # training runs: where their logs are kept
    cache: tuple[str, str] | None = None  # caches: (pool directory, sidecar name)
    keep_list: str | None = None  # keep lists: their --out directory (done when it holds keep.json)

    def done(self, root: Path = ROOT) -> bool:
        if self.run_dir is not None:
            return (root / self.run_dir / "model.pt").exists()
        if self.keep_list is not None:
            return (root / self.keep_list / "keep.json").exists()
        assert self.cache is not None
        pool, name = self.cache
        shards = sorted((root / pool).glob("*.tar"))
        return bool(shards) and all(s.with_name(f"{s.stem}.{name}.json").exists() for s in shards)


def train_step(
    recipe: str, name: str, overrides: Iterable[str], *, runs: str, results: str, needs: Iterable[str] = ()
) -> Step:
    """`jestclip train RECIPE OVERRIDES run_dir=RUNS/NAME`, its logs kept in RESULTS/NAME."""
    run_dir = f"{runs}/{name}"
    command = ("jestclip", "train", recipe, *overrides, f"run_dir={run_dir}")
    return Step(command, tuple(needs), run_dir=run_dir, results=f"{results}/{name}")


def with_needs(steps: dict[str, Step], names: Iterable[str]) -> list[str]:
    """``names`` with every step they need before them, each once, in order."""
    out: dict[str, None] = {}

    def add(name: str) -> None:
        for need in steps[name].needs:
            add(need)
        out.setdefault(name)

    for name in names:
        add(name)
    return list(out)


def run(argv: list[str] | tuple[str, ...], root: Path = ROOT) -> None:
    """Run a command from the checkout (``jestclip`` from this interpreter's environment), echoing it."""
    print("$", " ".join(argv), flush=True)
    exe = shutil.which(argv[0]) or str(Path(sys.executable).with_name(argv[0]))
    started = time.perf_counter()
    subprocess.run([exe, *argv[1:]], cwd=root, check=True)
    print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)


def copy_logs(run_dir: str | Path, results: str | Path, root: Path = ROOT) -> None:
    """Copy a run directory's config.json and metrics.jsonl (no weights) to ``results``."""
    out = root / results
    out.mkdir(parents=True, exist_ok=True)
    for file in ("config.json", "metrics.jsonl"):
        shutil.copy2(root / run_dir / file, out / file)


def keep_logs(step: Step, root: Path = ROOT) -> None:
    """Copy a finished training step's logs to its results directory."""
    assert step.run_dir is not None and step.results is not None
    copy_logs(step.run_dir, step.results, root)


def run_steps(steps: dict[str, Step], names: Iterable[str], root: Path = ROOT) -> None:
    """Run ``names`` and what they need, in order; finished steps are skipped, finished runs' logs kept."""
    for name in with_needs(steps, names):
        step = steps[name]
        if not step.done(root):
            run(step.command, root)
        if step.run_dir is not None:
            keep_logs(step, root)
