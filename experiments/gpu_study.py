"""Study III's compute-matched comparison at a GPU regime, in one command that stops at a wall-clock budget.

    python -m experiments.gpu_study --out /tmp/gpu-study --shards 12  # one H100/H200: jest-small, b = 256
    python -m experiments.gpu_study --tiny --bench B --out O --work W  # CPU smoke test: jest-micro

On the swapped pool (``BENCH/pool-swap50``; derived into ``--work`` with `jestclip data corrupt BENCH/pool ...
--swap-captions 0.5 --seed 0` when the benchmark has none), one seed each, every run *scheduled for IID's
FLOPs* (docs/studies/study3.md): IID and the static filter keeping Q = 0.5 (an IID step each, the regime's
``steps``), JEST f = 0.8 and Flexi-JEST f = 0.8 with the steps that IID's FLOPs buy them
(``jestclip.train.startup.scheduled_steps``), and Study III's chosen selection schedule
(``experiments.study3.CHOSEN``, when chosen), all scoring with one strong reference — the learner's
architecture and schedule trained IID on the clean pool (``BENCH/pool``, the swapped pool's clean counterpart;
docs/studies/study2.md says why). In order, each a `jestclip` command printed before it runs:

1. ``ref-strong``: the reference's training run; 2. its embeddings of the swapped pool (`cache-reference`,
   sidecars ``gpu-study-strong`` beside the swapped pool's shards); 3. the keep list (`jestclip filter --keep
   0.5`); 4. the runs; 5. `jestclip report` of the runs (baseline IID, the reference's cost, selection
   diagnostics of the JEST run) into ``OUT/report``.

Every run trains from memory (``data_in_memory=true``) under ``--work``/NAME, evaluated at its start, half-way
and its end; its config.json and metrics.jsonl are copied to ``OUT/runs/NAME``. After each run the script
prints its measured step time (median seconds per step between training lines, so evaluations drop out) and
the FLOP rate it achieved; ``OUT/gpu_study.md`` collects them with the device, date and command.

**Budget.** ``--budget`` seconds (default 540: the 9 minutes a 10-minute device call leaves) bound the whole
command; the last ``report_s`` of it are kept for the report. A step still running when the training budget
is spent gets SIGTERM (a training run checkpoints; `cache-reference` and `data corrupt` keep what they wrote),
the script says where it stopped and exits with status 3; the same command resumes: finished steps are
skipped (a run directory with model.pt, a cache whose every shard has its header, a keep list with keep.json).

**Regime and timing** (``FULL``): `jest-small` (22.3 M parameters, 64-px images, patch 8), b = 256, f = 0.8
(B = 1,280), 16 chunks, AdamW lr 1e-3 (configs/iid.py's, not tuned for this regime), 5% warm-up then cosine,
500 IID steps (128,000 examples learned). FLOPs (models/flops.py; forward 0.954 GFLOP per pair): an IID or
filter step 0.733 TFLOP, a JEST step 1.954 TFLOP (8/3 of IID: the scoring forward is recomputed with
gradients), so JEST gets 187 steps of IID's 500. Measured on one H200 (2026-11-30, docs/benchmarks.md) with
``--shards 12 --steps 500`` (Study II's runs): IID-cost steps 0.065–0.070 s (~10.5 TFLOP/s: these width-256
layers are launch-bound), JEST 0.2125 s; each run ~75 s with its process start, in-memory decoding and three
evaluations (one eval shard per suite); corrupting, caching and filtering 12 shards ~55 s. At those rates
the reference, IID, the filter, JEST and Flexi-JEST fit ~9 minutes with the report; the chosen schedule
makes it ~10: a second call with the same command finishes what the first left (it resumes).

**On this workplace's device machine** nothing is fetched and at most 64 MiB travel with the working tree,
so the 475 MB pool and 60 MB of eval suites do not: carry a subset (a few pool shards with its manifest.json
and the first shard of each eval suite with its manifest, as ``--bench``), carry the wheels of open_clip and
webdataset (the image has torch, not them), use ``--work /tmp/gpu-study`` (checkpoints stay there) and pack
``--out`` into one archive (at most 8 files come back).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = "gpu-study-strong"  # the reference's sidecar name
METRIC = "eval/gallery_r5"  # the studies' primary metric (docs/studies/study2.md)
KEEP = 0.5  # Q of the static filter
STOPPED = 3  # exit status when the budget ran out (rerun to resume)
TERM_GRACE_S = 60.0  # after SIGTERM, how long a step may take to checkpoint before it is killed


@dataclasses.dataclass(frozen=True)
class Settings:
    """The regime: learner, batch, schedule and evaluation of every run (the reference's too)."""

    model: str
    batch: int
    n_chunks: int
    steps: int  # of an IID run; the others get what IID's FLOPs over them buy
    eval_limit: int | None
    lr: float
    log_every: int
    num_workers: int
    report_s: float  # of the budget, kept for the report
    diagnostics: tuple[str, ...]  # extra `jestclip report` arguments


FULL = Settings("jest-small", 256, 16, 500, None, 1e-3, 20, 4, 60.0, ())
# b = 4: a super-batch of 20 is served from the tiny pool's Q = 0.5 keep list of 48 pairs (the chosen form)
TINY = Settings(
    "jest-micro", 4, 2, 8, 100, 1e-3, 1, 0, 20.0, ("--gibbs-steps", "20", "--diagnostics-batch", "4")
)
JEST = ["method.method=jest", "filter_ratio=0.8", f"reference_cache={CACHE}"]
FLEXI = ["method.method=flexi-jest", "filter_ratio=0.8", "method.approx=flexi", "method.approx_fraction=0.5"]
# Study III's pilot forms, as overrides here (the keep list is added where a form uses one)
SCHEDULES: dict[str, list[str]] = {
    "jest-first25": [*JEST, "method.schedule.end=0.25"],
    "jest-anneal": [*JEST, "method.schedule.final_filter_ratio=0.0"],
    "flexi-jest-keep50": [*FLEXI, f"reference_cache={CACHE}", "keep_list=KEEP"],
}


def runs() -> dict[str, list[str]]:
    """Run name -> method overrides ("KEEP" stands for the keep list), in order of importance: what a budget
    cut short is the least needed. Every run but IID's and the filter's is scheduled for IID's FLOPs."""
    from experiments.study3 import CHOSEN

    out = {
        "iid": [],
        "filter-q50": ["method.method=filter", "keep_list=KEEP"],
        "jest-f08-iidflops": JEST,
        "flexi-jest-f08-iidflops": [*FLEXI, f"reference_cache={CACHE}"],
    }
    if CHOSEN is not None:
        out[CHOSEN] = SCHEDULES[CHOSEN]
    return out


def shard_list(pool: Path, names_from: Path, shards: int | None) -> list[str]:
    """The shards of ``pool`` named as the first ``shards`` (None: all) of ``names_from``: the swapped pool
    has the clean pool's shard names (`data corrupt`), so they are known before it is written."""
    found = sorted(names_from.glob("*.tar"))
    if not found:
        raise SystemExit(f"gpu_study: no .tar shards in {names_from}")
    return [str(pool / p.name) for p in found[:shards]]


@dataclasses.dataclass(frozen=True)
class Plan:
    """Every step's command and done-check, from the arguments."""

    s: Settings
    bench: Path
    work: Path
    out: Path
    device: str
    shards: int | None

    @property
    def noisy(self) -> Path:
        own = self.bench / "pool-swap50"
        return own if own.is_dir() else self.work / "pool-swap50"

    def pool_args(self, pool: Path) -> list[str]:
        """The pool directory, or with ``shards`` its first shards (as the clean pool names them)."""
        return [str(pool)] if self.shards is None else shard_list(pool, self.bench / "pool", self.shards)

    def run_steps(self, extra: list[str]) -> int:
        """Steps of a run with ``extra``: the regime's for an IID-cost method, else what IID's FLOPs over the
        regime's steps buy it (``scheduled_steps``)."""
        from jestclip.train.config import apply_overrides, load_recipe
        from jestclip.train.startup import StepCosts, scheduled_steps

        base = apply_overrides(load_recipe(ROOT / "configs/iid.py"), self.settings([]))
        cfg = apply_overrides(base, extra)
        if not cfg.method.description.selects:
            return self.s.steps
        budget = self.s.steps * StepCosts.measure(base).total(self.s.batch)
        return scheduled_steps(cfg, budget)

    def settings(self, extra: list[str], steps: int | None = None) -> list[str]:
        """The regime's overrides of configs/iid.py for a run of ``steps`` (default: the regime's)."""
        s, steps = self.s, steps or self.s.steps
        return [
            f"model={s.model}",
            f"eval_data={self.bench}",
            f"method.batch_size={s.batch}",
            f"method.n_chunks={s.n_chunks}",
            f"optim.lr={s.lr}",
            "optim.warmup_fraction=0.05",
            f"steps={steps}",
            f"log_every={s.log_every}",
            f"checkpoint_every={max(1, steps // 4)}",
            f"eval_every={max(1, steps // 2)}",
            f"eval_limit={json.dumps(s.eval_limit)}",
            f"num_workers={s.num_workers}",
            f"device={self.device}",
            "data_in_memory=true",
            "seed=0",
            *extra,
        ]

    def train(self, name: str, data: str, extra: list[str]) -> list[str]:
        extra = [
            o.replace("KEEP", str(self.work / "keep-q50")) if o == "keep_list=KEEP" else o for o in extra
        ]
        steps = self.run_steps(extra)
        return [
            "jestclip",
            "train",
            "configs/iid.py",
            f"data={data}",
            *self.settings(extra, steps),
            f"run_dir={self.work / name}",
        ]

    def steps(self) -> list[tuple[str, list[str]]]:
        """(name, command) of every step, in order."""
        noisy, clean = self.pool_args(self.noisy), "::".join(self.pool_args(self.bench / "pool"))
        steps = []
        if not (self.bench / "pool-swap50").is_dir():
            corrupt = ["jestclip", "data", "corrupt", str(self.bench / "pool"), str(self.noisy)]
            steps.append(("corrupt", [*corrupt, "--swap-captions", "0.5", "--seed", "0"]))
        steps.append(("ref-strong", self.train("ref-strong", clean, [])))
        cache = ["jestclip", "cache-reference", *noisy, "--model", self.s.model, "--name", CACHE]
        cache += ["--checkpoint", str(self.work / "ref-strong" / "model.pt"), "--device", self.device]
        steps.append(("cache", cache))
        keep = ["jestclip", "filter", *noisy, "--keep", str(KEEP), "--out", str(self.work / "keep-q50")]
        steps.append(("keep", [*keep, "--reference-cache", CACHE]))
        for name, extra in runs().items():
            steps.append((name, self.train(name, "::".join(noisy), extra)))
        return steps

    def done(self, name: str) -> bool:
        """Whether step ``name`` finished (see the module docstring)."""
        if name == "corrupt":
            manifest = self.noisy / "manifest.json"
            return manifest.exists() and bool(json.loads(manifest.read_text()).get("complete"))
        if name == "cache":
            shards = [Path(p) for p in shard_list(self.noisy, self.bench / "pool", self.shards)]
            return all(p.with_name(f"{p.stem}.{CACHE}.json").exists() for p in shards)
        if name == "keep":
            return (self.work / "keep-q50" / "keep.json").exists()
        return (self.work / name / "model.pt").exists()

    def report(self) -> list[str]:
        """The `jestclip report` of the four runs, from their copied logs."""
        return [
            "jestclip",
            "report",
            *(str(self.out / "runs" / name) for name in runs()),
            "--baseline",
            "iid",
            "--metric",
            METRIC,
            "--reference-run",
            str(self.out / "runs" / "ref-strong"),
            "--diagnostics-run",
            str(self.work / "jest-f08-iidflops"),
            "--device",
            self.device,
            *self.s.diagnostics,
            "--out",
            str(self.out / "report"),
        ]


def run_step(command: list[str], deadline: float) -> bool:
    """Run a command (`jestclip`: this checkout's, on this Python) until it ends or ``deadline``
    (time.monotonic()); then SIGTERM, and kill after ``TERM_GRACE_S``. True when it ended by itself; a
    SystemExit naming the command when it failed."""
    print("$", " ".join(command), flush=True)
    src = str(ROOT / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    argv = [sys.executable, "-m", "jestclip.cli", *command[1:]] if command[0] == "jestclip" else command
    proc = subprocess.Popen(argv, cwd=ROOT, env=env)
    try:
        status = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=TERM_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return False
    if status != 0:
        raise SystemExit(f"gpu_study: `{' '.join(command[:3])} ...` failed (exit status {status})")
    return True


def step_rate(run_dir: Path) -> tuple[float, float, int] | None:
    """(median seconds per step, median FLOP/s, last step) over consecutive training lines of a run (a resumed
    run's clock restarts: pairs across the restart are left out); None before two training lines."""
    from jestclip.report import load_run

    if not (run_dir / "metrics.jsonl").exists():
        return None
    train = [x for x in load_run(run_dir).train if "wall_s" in x]
    pairs = [
        (b["step"] - a["step"], b["wall_s"] - a["wall_s"], b["flops_total"] - a["flops_total"])
        for a, b in itertools.pairwise(train)
        if b["step"] > a["step"] and b["wall_s"] > a["wall_s"]
    ]
    if not pairs:
        return None
    per_step = statistics.median(dt / ds for ds, dt, _ in pairs)
    rate = statistics.median(df / dt for _, dt, df in pairs)
    return per_step, rate, int(train[-1]["step"])


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({os.cpu_count()} cores)"


class Notes:
    """The markdown record ``OUT/gpu_study.md``: the header, then a row per step, rewritten after each."""

    def __init__(self, path: Path, header: list[str]) -> None:
        self.path, self.header, self.rows = path, header, []

    def add(self, row: str) -> None:
        print(row, flush=True)
        self.rows.append(row)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        table = ["| step | wall s | ended | s / step (median) | TFLOP/s (median) | last step |"]
        table.append("|---|---:|---|---:|---:|---:|")
        self.path.write_text("\n".join([*self.header, "", *table, *self.rows]) + "\n")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="logs, report and gpu_study.md go here")
    parser.add_argument(
        "--bench", type=Path, default=Path("data/bench"), help="benchmark root (pool/, eval/)"
    )
    parser.add_argument(
        "--work", type=Path, default=Path("runs/gpu_study"), help="run directories, keep list"
    )
    parser.add_argument(
        "--budget", type=float, default=540.0, help="wall-clock seconds for the whole command"
    )
    parser.add_argument("--tiny", action="store_true", help="jest-micro, b = 8, 4 steps (CPU smoke test)")
    parser.add_argument("--device", help="cuda (default) or cpu (--tiny's default)")
    parser.add_argument("--shards", type=int, help="use only the first N shards of each pool")
    parser.add_argument(
        "--steps", type=int, help="steps of every run (evaluated at 0, half-way and the end), to fit a budget"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = time.monotonic()
    s = TINY if args.tiny else FULL
    if args.steps is not None:
        if args.steps < 4:
            raise SystemExit(f"gpu_study: --steps must be >= 4, got {args.steps}")
        s = dataclasses.replace(s, steps=args.steps)
    device = args.device or ("cpu" if args.tiny else "cuda")
    if not (args.bench / "pool").is_dir() or not (args.bench / "eval").is_dir():
        raise SystemExit(
            f"gpu_study: --bench {args.bench} holds no pool/ and eval/ (a `jestclip data build`)"
        )
    if args.shards is not None and args.shards < 1:
        raise SystemExit(f"gpu_study: --shards must be >= 1, got {args.shards}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("gpu_study: --device cuda: CUDA is not available here (use --tiny)")
    root = lambda p: p if p.is_absolute() else Path.cwd() / p  # noqa: E731 (commands run in ROOT)
    plan = Plan(s, root(args.bench), root(args.work), root(args.out), device, args.shards)
    training_deadline = started + args.budget - s.report_s
    notes = Notes(
        plan.out / "gpu_study.md",
        [
            f"### {device_name(device)} — {datetime.date.today()}",
            "",
            f"Command: `python -m experiments.gpu_study {' '.join(argv)}` · {s.model}, b = {s.batch}, "
            f"IID's FLOPs over {s.steps} steps · budget {args.budget:.0f} s · noisy pool {plan.noisy}",
        ],
    )
    print("\n".join(notes.header), flush=True)
    for name, command in plan.steps():
        if plan.done(name):
            print(f"[{time.monotonic() - started:5.0f} s] {name}: done before, skipped", flush=True)
            continue
        left = training_deadline - time.monotonic()
        print(f"[{time.monotonic() - started:5.0f} s] {name} ({left:.0f} s of the budget left)", flush=True)
        begun = time.monotonic()
        ended = run_step(command, training_deadline)
        wall = time.monotonic() - begun
        rate = step_rate(plan.work / name)
        if (plan.work / name / "metrics.jsonl").exists():
            copy = plan.out / "runs" / name
            copy.mkdir(parents=True, exist_ok=True)
            for file in ("config.json", "metrics.jsonl"):
                shutil.copy2(plan.work / name / file, copy / file)
        timing = "| | |" if rate is None else f"| {rate[0]:.4f} | {rate[1] / 1e12:.2f} | {rate[2]:,}"
        notes.add(f"| {name} | {wall:.1f} | {'yes' if ended else 'stopped (budget)'} {timing} |")
        if not ended:
            print(
                f"gpu_study: the budget ran out during {name}; rerun the same command to resume "
                f"({time.monotonic() - started:.0f} s)",
                flush=True,
            )
            return STOPPED
    begun = time.monotonic()
    if not run_step(plan.report(), started + args.budget):
        print("gpu_study: the budget ran out during the report; rerun the same command", flush=True)
        return STOPPED
    notes.add(f"| report | {time.monotonic() - begun:.1f} | yes | | | |")
    print(f"gpu_study: done in {time.monotonic() - started:.0f} s; {plan.out / 'report' / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
