"""Time and peak memory of `joint_select` against a literal translation of the paper's Algorithm 1.

Each (implementation, B) pair runs in a fresh subprocess so that peak memory is its own:
CPU peak = growth of the process's maximum resident set size over its size once the inputs exist;
CUDA peak = ``torch.cuda.max_memory_allocated`` over the inputs' allocation.

    python benchmarks/selection.py                       # CPU, B = 1,024 ... 16,384, D = 512
    python benchmarks/selection.py --device cuda --dim 768 --sizes 8192,40960,81920,163840

Prints a markdown table (paste it into docs/benchmarks.md with the command, machine and date).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from jestclip.selection import Embeddings, joint_select

FILTER_RATIO = 0.8
N_CHUNKS = 16
GAIN = 100.0


def literal_algorithm1(
    learner: Embeddings, reference: Embeddings, generator: torch.Generator
) -> torch.Tensor:
    """Algorithms 1 and 2 of the paper, line by line in PyTorch (sigmoid loss, learnability).

    One change so that it runs at all: ``exp(logits)`` overflows to inf (the paper's gain of 100 times
    sums over thousands of pairs), which ``torch.multinomial`` rejects, so the weights are
    ``exp(logits - max)``: same cost, same sampling. Sampling is with replacement, as ``random.choice``'s
    default, and the chunk size is truncated as written.
    """

    def sigmoid_nll(emb: Embeddings) -> torch.Tensor:  # Algorithm 2
        logits = emb.image @ emb.text.T  # [B, B]
        logits = logits * emb.scale + emb.bias
        eye = torch.eye(emb.n, device=logits.device)
        m1_diag1 = -torch.ones_like(logits) + 2 * eye
        return -F.logsigmoid(m1_diag1 * logits)  # [B, B]

    scores = (sigmoid_nll(learner) - sigmoid_nll(reference)) * GAIN
    n_images = scores.shape[0]
    n_draws = int(n_images * (1 - FILTER_RATIO) / N_CHUNKS)
    logits_ii = torch.diag(scores)
    inds = torch.multinomial(torch.exp(logits_ii - logits_ii.max()), n_draws, True, generator=generator)
    for _ in range(N_CHUNKS - 1):
        is_sampled = torch.eye(n_images, device=scores.device)[inds].sum(dim=0)
        logits_ij = (scores * is_sampled.reshape(n_images, 1)).sum(dim=0)
        logits_ji = (scores * is_sampled.reshape(1, n_images)).sum(dim=1)
        logits = logits_ii + logits_ij + logits_ji
        logits = logits - is_sampled * 1e8
        new_inds = torch.multinomial(torch.exp(logits - logits.max()), n_draws, True, generator=generator)
        inds = torch.cat((inds, new_inds))
    return inds


def make_inputs(n: int, dim: int, device: str, dtype: torch.dtype) -> tuple[Embeddings, Embeddings]:
    g = torch.Generator(device=device).manual_seed(0)

    def one(scale: float, bias: float, noise: float) -> Embeddings:
        image = F.normalize(torch.randn(n, dim, generator=g, device=device), dim=1)
        text = F.normalize(image + noise * torch.randn(n, dim, generator=g, device=device), dim=1)
        return Embeddings(image.to(dtype), text.to(dtype), scale, bias)

    return one(10.0, -10.0, 1.2), one(14.0, -6.0, 0.5)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(impl: str, n: int, dim: int, device: str, dtype: str, loss: str, reps: int) -> dict:
    torch.manual_seed(0)
    learner, reference = make_inputs(n, dim, device, getattr(torch, dtype))
    generator = torch.Generator(device=device).manual_seed(1)
    size = n // 5

    def run() -> torch.Tensor:
        if impl == "literal":
            return literal_algorithm1(learner, reference, generator)
        return joint_select(
            learner, reference, size=size, n_chunks=N_CHUNKS, loss=loss, gain=GAIN, generator=generator
        )

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = rss_bytes()
    times, out = [], None
    for _ in range(reps + 1):  # first run is a warm-up
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = run()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {
        "impl": impl,
        "n": n,
        "selected": int(out.numel()),
        "distinct": int(out.unique().numel()),
        "time_s": statistics.median(times[1:]),
        "peak_bytes": peak,
    }


def machine_description(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--sizes", default="1024,2048,4096,8192,16384", help="comma-separated B values")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--loss", default="sigmoid", choices=["sigmoid", "softmax"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--impls", default="jestclip,literal")
    parser.add_argument(
        "--skip-literal-above", type=int, default=10**9, help="B beyond which the literal OOMs"
    )
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "B"), help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the raw results here")
    args = parser.parse_args()

    if args.worker:
        impl, n = args.worker[0], int(args.worker[1])
        print(json.dumps(worker(impl, n, args.dim, args.device, args.dtype, args.loss, args.reps)))
        return

    results = []
    for n in (int(s) for s in args.sizes.split(",")):
        for impl in args.impls.split(","):
            if impl == "literal" and n > args.skip_literal_above:
                results.append({"impl": impl, "n": n, "error": "skipped (out of memory)"})
                continue
            cmd = [sys.executable, __file__, "--worker", impl, str(n), "--device", args.device]
            cmd += [
                "--dim",
                str(args.dim),
                "--dtype",
                args.dtype,
                "--loss",
                args.loss,
                "--reps",
                str(args.reps),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
                results.append({"impl": impl, "n": n, "error": last[:120]})
            else:
                results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)

    print(
        f"\n{machine_description(args.device)}; D={args.dim}, {args.dtype}, loss={args.loss}, size=B/5, "
        f"{N_CHUNKS} chunks, median of {args.reps} after a warm-up\n"
    )
    print("| B | implementation | selected (distinct) | time | peak memory |")
    print("|---:|---|---|---:|---:|")
    for r in results:
        if "error" in r:
            print(f"| {r['n']:,} | {r['impl']} | — | — | {r['error']} |")
        else:
            print(
                f"| {r['n']:,} | {r['impl']} | {r['selected']:,} ({r['distinct']:,}) | "
                f"{r['time_s'] * 1e3:,.1f} ms | {r['peak_bytes'] / 2**20:,.1f} MiB |"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
