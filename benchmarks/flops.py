"""Forward FLOPs of the shipped model configs, exact and approximate, and the per-step cost of each method.

    python benchmarks/flops.py [--configs jest-micro,jest-tiny,jest-small] [--batch 256 --filter-ratio 0.8]

Prints markdown tables (FlopCounterMode counts; see jestclip.models.flops). Paste them into docs/benchmarks.md
with the command, machine and date.
"""

from __future__ import annotations

import argparse
import logging

import open_clip

from jestclip.models import APPROXIMATIONS, create_model, forward_flops, step_flops


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", default="jest-micro,jest-tiny,jest-small")
    parser.add_argument("--batch", type=int, default=256, help="learner batch b")
    parser.add_argument("--filter-ratio", type=float, default=0.8)
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns that no pretrained weights were loaded

    super_batch = round(args.batch / (1 - args.filter_ratio))
    print(
        "| config | params | image fwd GFLOP | text fwd GFLOP | "
        + " | ".join(f"A ({a})" for a in APPROXIMATIONS)
    )
    print("|---|---:|---:|---:|" + "---:|" * len(APPROXIMATIONS))
    steps = []
    for name in args.configs.split(","):
        model = create_model(name)
        cfg = open_clip.get_model_config(name)
        size, ctx = cfg["vision_cfg"]["image_size"], cfg["text_cfg"]["context_length"]
        full = forward_flops(model, image_size=size, context_length=ctx)
        approx = {
            a: forward_flops(model, image_size=size, context_length=ctx, approx=a) for a in APPROXIMATIONS
        }
        params = sum(p.numel() for p in model.parameters())
        ratios = " | ".join(f"{approx[a].image / full.image:.3f}" for a in APPROXIMATIONS)
        print(
            f"| {name} | {params / 1e6:.1f} M | {full.image / 1e9:.4f} | {full.text / 1e9:.4f} | {ratios} |"
        )
        iid = step_flops(batch=args.batch, super_batch=args.batch, learner=full).total
        jest = step_flops(
            batch=args.batch, super_batch=super_batch, learner=full, scorer=full, reuse_scoring_forward=True
        ).total
        flexi = step_flops(
            batch=args.batch,
            super_batch=super_batch,
            learner=full,
            scorer=approx["flexi"],
            approx_learner=approx["flexi"],
            approx_fraction=0.5,
        ).total
        steps.append((name, iid, jest, flexi))
    setting = f"b = {args.batch}, B = {super_batch} (f = {args.filter_ratio}), cached reference"
    print(f"\nPer training step, {setting}:\n")
    print("| config | IID TFLOP | JEST TFLOP, A.4 (× IID) | Flexi-JEST TFLOP (× IID) |\n|---|---:|---:|---:|")
    for name, iid, jest, flexi in steps:
        jest_cell = f"{jest / 1e12:.3f} ({jest / iid:.2f})"
        flexi_cell = f"{flexi / 1e12:.3f} ({flexi / iid:.2f})"
        print(f"| {name} | {iid / 1e12:.3f} | {jest_cell} | {flexi_cell} |")


if __name__ == "__main__":
    main()
