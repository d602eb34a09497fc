"""Smoke tests of the measuring scripts benchmarks/loader.py and benchmarks/gpu.py in their tiny CPU modes."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
ENV.pop("TRITON_INTERPRET", None)  # the scripts' Triton rows run only where a test asks for the interpreter


def run_script(name: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "benchmarks" / name), *args]
    return subprocess.run(command, cwd=ROOT, env=env or ENV, capture_output=True, text=True, timeout=120)


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    """Cells of the markdown rows whose first cell starts with ``first_cell``."""
    rows = [
        [c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("|")
    ]
    return [r for r in rows if r[0].startswith(first_cell)]


def number(cell: str) -> float:
    return float(re.match(r"[\d,.]+", cell).group(0).replace(",", ""))


def test_loader_script_quick_measures_workers_and_decoding(tmp_path):
    done = run_script("loader.py", "--quick", "--jpeg-dir", str(tmp_path / "jpeg"))
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert len(list((tmp_path / "jpeg").glob("*.tar"))) == 2  # 96 generated JPEGs, 48 per shard
    rows = table_rows(out, "generated 256-px JPEG")
    assert [r[2].split(" ")[0] for r in rows][-1] == "1" and rows[0][2].startswith("0 (main process")
    assert all(number(r[3]) > 0 and r[1] == "ViT-B-16 (224 px)" for r in rows)
    per_worker = number(rows[-1][4])  # the 1-worker row feeds the estimate
    iid = table_rows(out, "IID")[0]
    # the per-worker rate is printed rounded to a whole image/s: 3072 / it is off by up to 0.5 / per_worker
    # relative (25.7 from 119.5 img/s printed as 119 on a loaded machine), plus the estimate's own rounding;
    # the two roundings add up: the bound is their sum, not the larger of them (14.70 vs 14.63 at 210 img/s)
    estimate = pytest.approx(3072 / per_worker, abs=0.051 + 0.6 * 3072 / per_worker**2)
    assert iid[2] == "512" and number(iid[5]) == estimate
    jest = [r for r in table_rows(out, "JEST") if r[1] in ("0.8", "0.9")]
    assert [r[2] for r in jest] == ["2,560", "5,120"]
    assert "replace them with the step times benchmarks/gpu.py measures" in out
    draft = table_rows(out, "256 px")[0]
    assert draft[3].endswith("(1x)") and number(draft[5]) > 0  # 256 px -> 224: no smaller scale fits
    assert ("skipped, no CUDA" in out) != torch.cuda.is_available()
    large = out.split("reduced-size decode | speed-up |")[1]
    (row,) = table_rows(large, "1")  # the loader on 512-px JPEGs, one worker, both decodes
    assert number(row[1]) > 0 and number(row[2]) > 0
    assert len(list((tmp_path / "jpeg" / "512").glob("*.tar"))) == 1  # 48 generated 512-px JPEGs


def test_gpu_script_tiny_cpu_prints_and_writes_every_table(tmp_path):
    tests = tmp_path / "fake_tests"
    tests.mkdir()
    fake = "import pytest\n\ndef test_on_cuda():\n    pass\n\ndef test_cuda_skip():\n    pytest.skip('no')\n"
    (tests / "test_fake.py").write_text(fake + "\ndef test_other():\n    pass\n")
    out_file = tmp_path / "report" / "gpu.md"
    args = ["--device", "cpu", "--tiny", "--steps", "1", "--warmup", "0", "--select-sizes", "256,512"]
    args += ["--compile-backend", "aot_eager", "--small-compile", "off,reduce-overhead"]  # traced, no codegen
    done = run_script("gpu.py", *args, "--out", str(out_file), "--pytest-path", str(tests))
    assert done.returncode == 0, done.stderr[-2000:]
    report = out_file.read_text()
    assert report.strip() in done.stdout
    assert re.search(r"^### CPU .* — \d{4}-\d\d-\d\d$", report, re.M)
    assert "1 passed, 1 skipped, 1 deselected" in report and "(exit status 0)" in report
    steps = {r[0]: r for r in table_rows(report, "") if r[0] in ("iid", "jest", "flexi-jest")}
    assert [steps[m][1] for m in ("iid", "jest", "flexi-jest")] == ["8", "40", "40"]
    assert number(steps["iid"][2]) > 0 and steps["iid"][3] == "1.00x" and "<= 2.5x" in steps["jest"][4]
    parts = table_rows(report, "")
    for part in ("scoring forward", "selection", "batch score", "learning (forward, backward, AdamW)"):
        row = next(r for r in parts if r[0] == part)
        assert number(row[1]) > 0 and "`aten::" in row[4]
    selection = {
        (r[0], r[1], r[3]): r
        for r in table_rows(report, "")
        if len(r) == 9 and r[0] in ("sigmoid", "softmax")
    }
    assert {(loss, n) for loss, n, _ in selection} == {
        ("sigmoid", "256"),
        ("sigmoid", "512"),
        ("softmax", "512"),
    }
    for key in (("sigmoid", "256", "torch"), ("sigmoid", "512", "literal"), ("softmax", "512", "torch")):
        assert number(selection[key][4]) > 0, key
    assert (
        selection[("sigmoid", "256", "torch")][2] == "51"
        and selection[("sigmoid", "512", "torch")][5] == "102 (102)"
    )
    assert selection[("sigmoid", "512", "triton-bf16")][4] in (
        "needs CUDA (or TRITON_INTERPRET=1)",
        "Triton is not installed",
    )
    agreement = [r for r in table_rows(report, "") if len(r) == 11 and r[0] in ("sigmoid", "softmax")]
    assert len(agreement) == 2 * 2 * 3  # losses x inputs x emulated precisions (fp32's is the torch path)
    assert {r[3] for r in agreement} == {"emulated-tf32", "emulated-bf16", "emulated-bf16x3"}
    assert all(0 < number(r[4]) <= 1 and r[10] in ("yes", "no") for r in agreement)
    assert "No default is picked on the CPU" in report
    speed = [r for r in table_rows(report, "") if len(r) == 8 and r[0] in gpu_script().SPEED_VARIANTS]
    variants, methods = ("before", "bf16-scoring", "bf16-scoring+compile"), ("iid", "jest", "flexi-jest")
    assert [(r[0], r[1]) for r in speed] == [(v, m) for v in variants for m in methods]
    assert all(number(r[3]) > 0 and number(r[5]) > 0 and r[6] == "—" for r in speed)  # no peak on the CPU
    assert all(r[4] == "1.00x" for r in speed if r[1] == "iid") and "<= 1.35x" in speed[2][7]
    small = [r for r in table_rows(report, "") if len(r) == 4 and r[0] in ("off", "reduce-overhead")]
    assert [r[0] for r in small] == ["off", "reduce-overhead"] and all(number(r[2]) > 0 for r in small)
    assert ">= 40/s" in small[0][3]


def gpu_script():
    return load_script("gpu")


def test_gpu_script_times_the_fused_kernel(tmp_path):
    """The kernel's timing rows run (in Triton's interpreter, with no GPU visible), both losses."""
    gpu = load_script("gpu")
    if not gpu.triton_available():
        pytest.skip("Triton is not installed")
    env = {**ENV, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    args = ["--device", "cpu", "--tiny", "--parts", "selection", "--select-sizes", "128", "--dim", "32"]
    done = run_script("gpu.py", *args, "--implementations", "torch,triton-bf16x3", env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [r for r in table_rows(done.stdout, "") if r[0] in ("sigmoid", "softmax")]
    assert [(r[0], r[3]) for r in rows] == [
        (loss, impl) for loss in ("sigmoid", "softmax") for impl in ("torch", "triton-bf16x3")
    ]
    assert all(number(r[4]) > 0 and r[5] == "26 (26)" for r in rows)


def test_gpu_script_picks_the_default_by_the_rule():
    gpu = load_script("gpu")
    learner = gpu.random_embeddings(128, 32, torch.device("cpu"), torch.Generator().manual_seed(0), 100.0)
    other = gpu.random_embeddings(128, 32, torch.device("cpu"), torch.Generator().manual_seed(1))
    found = gpu.selection_agreement(
        other, learner, size=26, backends=["emulated-bf16x3", "emulated-bf16"], seeds=[0]
    )
    assert found[0].qualifies  # split bf16 moves no pick at this size
    rows = [dataclasses.replace(r, backend=r.backend.replace("emulated", "triton")) for r in found]
    times = {"torch": 9.0, "triton-bf16x3": 3.0, "triton-bf16": 1.0}
    fast = "triton-bf16x3" if not rows[1].qualifies else "triton-bf16"
    lines = gpu.decision_lines({"sigmoid": rows}, {"sigmoid": times}, 163840, torch.device("cuda"))
    assert lines[0] == (
        f"- sigmoid: the rule picks `{fast}` ({times[fast]:,.1f} ms at B = 163,840): "
        "`CUDA_DEFAULT_BACKEND['sigmoid']` in `src/jestclip/selection/fused.py`"
    )
    assert lines[1] == "- softmax: not measured in this run (parts selection and agreement both needed)"
    worse = [dataclasses.replace(r, same_picks=0.5) for r in rows]
    none = gpu.decision_lines(
        {"sigmoid": worse}, {"sigmoid": {"triton-bf16": 1.0}}, 163840, torch.device("cuda")
    )
    assert none[0] == "- sigmoid: no timed backend qualifies; keep `torch`"
    assert gpu.decision_lines({}, {}, 1, torch.device("cpu"))[0].startswith("No default is picked on the CPU")


def test_profile_time_goes_to_the_range_it_ran_in():
    gpu = load_script("gpu")
    x = torch.randn(256, 256)
    pieces = [("scoring forward", lambda: x @ x), ("selection", lambda: torch.sqrt(x.abs()))]
    ops = gpu.profile_pieces(pieces, torch.device("cpu"), steps=2)
    assert "aten::mm" in ops["scoring forward"] and "aten::mm" not in ops["selection"]
    assert "aten::sqrt" in ops["selection"] and "aten::sqrt" not in ops["scoring forward"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_gpu_script_without_cuda_says_so_in_one_line():
    done = run_script("gpu.py", "--pytest-path", "tests/test_benchmarks.py")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("--device cuda: CUDA is not available")


def test_scale_benchmark_runs_its_filter_and_startup_modes_small(tmp_path):
    done = run_script(
        "scale.py",
        "filter",
        "--root",
        str(tmp_path / "f"),
        "--shards",
        "6",
        "--rows",
        "50",
        "--ranks",
        "1",
        "2",
        "--in-memory",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = table_rows(done.stdout, "300")
    assert [r[1:3] for r in rows] == [["streamed", "1"], ["streamed", "2"], ["whole pool in memory", "1"]]
    done = run_script(
        "scale.py", "startup", "--root", str(tmp_path / "s"), "--shards", "40", "--rows", "8", "--world", "4"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    opened = [int(r[2]) for r in table_rows(done.stdout, "40")]
    assert opened == [10, 40]  # rank 0 of 4 opens its own shards; a memory pool opens all


def test_scale_benchmark_measures_caching_on_any_shards_with_the_model_asked_for(tmp_path):
    from .data.test_loader import make_shards

    make_shards(tmp_path, 3, 20)  # no manifests: the pairs are counted by decoding them
    args = ("--data", str(tmp_path), "--shards", "2", "--processes", "1", "--batch-size", "16")
    done = run_script("scale.py", "cache", *args, "--model", "jest-tiny", "--workers", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (
        "2 shards of" in done.stdout
        and "40 pairs; jest-tiny on cpu, batch 16, 1 loader workers" in done.stdout
    )
    (row,) = table_rows(done.stdout, "cache-reference")
    assert row[1] == "1" and number(row[4]) > 0 and number(row[4]) == number(row[5])
    assert number(table_rows(done.stdout, "model alone")[0][4]) > 0
