"""The demo pipeline: the whole method end to end on the built-in benchmark, with tiny models.

Stages (each reuses its output when it is already there, so a re-run only redoes what is missing):
1. benchmark data: install missing Debian/npm sources, build ``data/bench-demo`` (``jestclip data build
   --limit 10000``: at most 10,000 drawings per source);
2. reference: train on ``curated`` (IID);
3. cache the reference's embeddings of ``pool``;
4. IID learner on ``pool``;  5. JEST learner on ``pool`` (both evaluated every ``eval_every`` steps);
6. report: curves, speed-up to target, selection diagnostics.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jestclip.train.config import TrainConfig

__all__ = ["DemoConfig", "run_config", "run_demo"]


@dataclass(frozen=True)
class DemoConfig:
    """Everything the demo does; ``reduced()`` is the seconds-long variant CI runs."""

    data: str = "data/bench-demo"  # built here when absent
    out: str = "runs/demo"  # runs and report
    build_limit: int | None = 10_000  # drawings per source (a seeded subset; None: the full benchmark)
    model: str = "jest-micro"
    batch_size: int = 64
    filter_ratio: float = 0.8
    reference_steps: int = 300
    steps: int = 300  # of each learner
    lr: float = 2e-3
    eval_every: int = 100
    eval_limit: int | None = None  # samples per eval suite (None: all)
    diagnostics_batch: int = 64
    gibbs_steps: int = 2000
    seed: int = 0
    device: str = "auto"
    num_workers: int = 2

    @classmethod
    def reduced(cls) -> DemoConfig:
        return cls(
            data="data/bench-reduced",
            out="runs/demo-reduced",
            build_limit=40,
            batch_size=8,
            reference_steps=6,
            steps=6,
            eval_every=3,
            eval_limit=40,
            diagnostics_batch=4,
            gibbs_steps=50,
            num_workers=0,
        )


def _stage(number: int, text: str, started: float) -> None:
    print(f"\n[{number}/6] {text}  (at {time.perf_counter() - started:.0f} s)", flush=True)


def _build_data(cfg: DemoConfig) -> None:
    from jestclip.benchmark import BuildConfig, SourcePaths, build, install_sources, missing_sources

    record = Path(cfg.data) / "build.json"
    if record.exists() and json.loads(record.read_text(encoding="utf-8")).get("complete"):
        print(f"reusing {cfg.data} (build.json says complete)")
        return
    paths = SourcePaths()
    if missing_sources(paths, list(paths.required())):
        print("installing the Debian and npm packages the benchmark is drawn from (jestclip data sources)")
        install_sources(paths.npm_root)
    build(Path(cfg.data), BuildConfig(limit=cfg.build_limit), paths)


def run_config(cfg: DemoConfig, name: str, method: str) -> TrainConfig:
    """The demo's training config for run ``name``: "reference" (IID on curated) or an IID / JEST learner on
    pool, evaluated every ``eval_every`` steps.
    """
    from jestclip.train.config import MethodConfig, TrainConfig
    from jestclip.train.optim import OptimConfig

    reference = name == "reference"
    steps = cfg.reference_steps if reference else cfg.steps
    return TrainConfig(
        run_dir=str(Path(cfg.out) / name),
        model=cfg.model,
        data=str(Path(cfg.data) / ("curated" if reference else "pool")),
        reference_cache="demo-reference" if method != "iid" else None,
        filter_ratio=cfg.filter_ratio,
        method=MethodConfig(method, batch_size=cfg.batch_size, n_chunks=min(16, cfg.batch_size)),
        optim=OptimConfig(lr=cfg.lr, warmup_fraction=0.05),
        steps=steps,
        log_every=max(1, steps // 30),
        checkpoint_every=max(1, steps // 3),
        eval_data=None if reference else cfg.data,
        eval_every=0 if reference else cfg.eval_every,
        eval_limit=cfg.eval_limit,
        seed=cfg.seed,
        device=cfg.device,
        num_workers=cfg.num_workers,
    )


def _train(cfg: DemoConfig, name: str, method: str) -> Path:
    from jestclip.train.loop import train
    from jestclip.train.rundir import RunDir

    run = run_config(cfg, name, method)
    if RunDir(run.run_dir).finished:
        print(f"reusing {run.run_dir} (finished)")
    else:
        train(run)
    return Path(run.run_dir)


def _cache(cfg: DemoConfig, reference_run: Path) -> None:
    import torch

    from jestclip.train.reference import cache_model_embeddings
    from jestclip.train.trained import load_trained

    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    trained = load_trained(reference_run, device=device)  # the reference run's own model, loss, preprocessing
    pool = str(Path(cfg.data) / "pool")
    summary = cache_model_embeddings(trained.model, trained.name, pool, name="demo-reference", device=device)
    print(f"cached: {summary['written']} shards written, {summary['kept']} reused")


def caveat(cfg: DemoConfig) -> str:
    """The report's one line on what the demo's runs can and cannot show."""
    return (
        f"The demo shows the pipeline working, not whether JEST pays: one seed of {cfg.steps} steps of a "
        f"tiny model ({cfg.model}), whose curves swing by about a point between evaluations. Whether JEST "
        "beats IID and a static filter at equal compute is measured over seeds in docs/studies/."
    )


def run_demo(cfg: DemoConfig) -> Path:
    """Run (or finish) every stage; return the report's path."""
    from jestclip.report import load_run, run_diagnostics, write_report

    started = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1), encoding="utf-8")
    _stage(1, f"benchmark data in {cfg.data}", started)
    _build_data(cfg)
    _stage(2, "reference model on curated", started)
    reference = _train(cfg, "reference", "iid")
    _stage(3, "caching the reference's embeddings of pool", started)
    _cache(cfg, reference)
    _stage(4, "IID learner on pool", started)
    iid = _train(cfg, "iid", "iid")
    _stage(5, f"JEST learner on pool (filter ratio {cfg.filter_ratio})", started)
    jest = _train(cfg, "jest", "jest")
    _stage(6, "report", started)
    diagnostics = run_diagnostics(jest, batch_size=cfg.diagnostics_batch, gibbs_steps=cfg.gibbs_steps)
    report = write_report(
        [load_run(iid), load_run(jest)],
        out / "report",
        diagnostics=diagnostics,
        diagnostics_run=str(jest),
        settings={"demo": dataclasses.asdict(cfg)},
        caveat=caveat(cfg),
    )
    print(f"demo finished in {time.perf_counter() - started:.0f} s")
    return report
