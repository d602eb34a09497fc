"""The Triton kernel behind ``fused.chunk_terms``. Imports Triton: ``fused`` imports this module only when a
``triton-*`` backend runs, so the rest of ``jestclip.selection`` works without Triton.

The kernel is a plain function wrapped on first use (``kernel``), not decorated at import, so that
``TRITON_INTERPRET=1`` set after this module was imported still selects the interpreter.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import triton
import triton.language as tl

__all__ = ["FMA_CONFIGS", "TENSOR_CORE_CONFIGS", "kernel"]

# (BLOCK_B, BLOCK_C, BLOCK_D, num_warps, num_stages): what triton.autotune chooses from, per operand kind.
# Guesses for Hopper, not measured: benchmarks/gpu.py records the times, not which configuration won.
TENSOR_CORE_CONFIGS = ((128, 64, 64, 8, 3), (128, 128, 32, 8, 3), (64, 64, 64, 4, 3), (128, 64, 32, 4, 4))
FMA_CONFIGS = ((64, 64, 32, 4, 2), (128, 64, 32, 8, 2), (64, 32, 32, 4, 3))


@functools.lru_cache(maxsize=8)
def kernel(interpret: bool, tuned: bool, fma: bool) -> Callable:
    """``chunk_terms_kernel`` interpreted, or compiled for the GPU; ``tuned``: autotuned over the block
    shapes of ``FMA_CONFIGS`` (``fma``, the float32 precision) or ``TENSOR_CORE_CONFIGS``, once per
    (B, D, loss, precision): a training run tunes once."""
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(chunk_terms_kernel)
    jitted = triton.jit(chunk_terms_kernel)
    if not tuned:
        return jitted
    configs = [
        triton.Config({"BLOCK_B": b, "BLOCK_C": c, "BLOCK_D": d}, num_warps=w, num_stages=s)
        for b, c, d, w, s in (FMA_CONFIGS if fma else TENSOR_CORE_CONFIGS)
    ]
    return triton.autotune(configs=configs, key=["B", "D", "LOSS", "PRECISION"])(jitted)


def chunk_terms_kernel(
    x_ptr,  # candidates' images [B, D]
    y_ptr,  # candidates' texts [B, D]
    cx_ptr,  # chunk's images [C, D]
    cy_ptr,  # chunk's texts [C, D]
    row_ptr,  # out [B] float32: f(L_ki) over the chunk's i, summed (sigmoid) or log-sum-exp'd (softmax)
    col_ptr,  # out [B] float32: the same of L_ik
    B,
    C,
    D,
    stride_xb,
    stride_xd,
    stride_yb,
    stride_yd,
    stride_cxb,
    stride_cxd,
    stride_cyb,
    stride_cyd,
    scale,
    bias,
    LOSS: tl.constexpr,  # 0 sigmoid, 1 softmax
    PRECISION: tl.constexpr,  # 0 fp32 (ieee), 1 tf32, 2 bf16, 3 bf16x3
    INTERPRET: tl.constexpr,  # the interpreter multiplies bf16 bit patterns as integers: bf16 in fp32 there
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per BLOCK_B candidates; the [BLOCK_B, BLOCK_C] logit tiles live in registers only."""
    pid = tl.program_id(0)
    offs_b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    offs_b64 = offs_b.to(tl.int64)
    for direction in tl.static_range(2):
        # direction 0 ("row"): candidate images against the chunk's texts; 1 ("col"): texts against images
        if direction == 0:
            a_ptr, stride_ab, stride_ad = x_ptr, stride_xb, stride_xd
            c_ptr, stride_cb, stride_cd = cy_ptr, stride_cyb, stride_cyd
        else:
            a_ptr, stride_ab, stride_ad = y_ptr, stride_yb, stride_yd
            c_ptr, stride_cb, stride_cd = cx_ptr, stride_cxb, stride_cxd
        total = tl.zeros([BLOCK_B], dtype=tl.float32)  # sigmoid: running sum; softmax: running sum of exp
        peak = tl.full([BLOCK_B], float("-inf"), dtype=tl.float32)  # softmax: running max
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < C
            offs_c64 = offs_c.to(tl.int64)
            acc = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                mask_d = offs_d < D
                a = tl.load(
                    a_ptr + offs_b64[:, None] * stride_ab + offs_d[None, :] * stride_ad,
                    mask=mask_b[:, None] & mask_d[None, :],
                    other=0.0,
                )
                ct = tl.load(  # [BLOCK_D, BLOCK_C]: the chunk's rows as columns
                    c_ptr + offs_c64[None, :] * stride_cb + offs_d[:, None] * stride_cd,
                    mask=mask_d[:, None] & mask_c[None, :],
                    other=0.0,
                )
                if PRECISION == 0:
                    acc = tl.dot(a.to(tl.float32), ct.to(tl.float32), acc, input_precision="ieee")
                elif PRECISION == 1:
                    # to nearest (ties away) at 10 mantissa bits: the tf32 dot itself would truncate
                    a_bits = a.to(tl.float32).to(tl.int32, bitcast=True)
                    c_bits = ct.to(tl.float32).to(tl.int32, bitcast=True)
                    a = ((a_bits + 0x1000) & -0x2000).to(tl.float32, bitcast=True)
                    ct = ((c_bits + 0x1000) & -0x2000).to(tl.float32, bitcast=True)
                    acc = tl.dot(a, ct, acc, input_precision="tf32")
                elif INTERPRET:
                    # bf16 (2) and bf16x3 (3) in the interpreter: to nearest even at 7 mantissa bits in
                    # integer arithmetic (its own float32 -> bfloat16 cast truncates), exact float32 products
                    a = a.to(tl.float32)
                    ct = ct.to(tl.float32)
                    a_bits = a.to(tl.int32, bitcast=True)
                    c_bits = ct.to(tl.int32, bitcast=True)
                    a_hi = ((a_bits + 0x7FFF + ((a_bits >> 16) & 1)) & -0x10000).to(tl.float32, bitcast=True)
                    c_hi = ((c_bits + 0x7FFF + ((c_bits >> 16) & 1)) & -0x10000).to(tl.float32, bitcast=True)
                    acc = tl.dot(a_hi, c_hi, acc, input_precision="ieee")
                    if PRECISION == 3:
                        a_bits = (a - a_hi).to(tl.int32, bitcast=True)
                        c_bits = (ct - c_hi).to(tl.int32, bitcast=True)
                        a_lo = ((a_bits + 0x7FFF + ((a_bits >> 16) & 1)) & -0x10000).to(
                            tl.float32, bitcast=True
                        )
                        c_lo = ((c_bits + 0x7FFF + ((c_bits >> 16) & 1)) & -0x10000).to(
                            tl.float32, bitcast=True
                        )
                        acc = tl.dot(a_hi, c_lo, acc, input_precision="ieee")
                        acc = tl.dot(a_lo, c_hi, acc, input_precision="ieee")
                else:
                    # bf16: one product of the operands rounded to bfloat16; bf16x3: each operand split into
                    # a bfloat16 and the bfloat16 of its remainder, and the three products that matter
                    a = a.to(tl.float32)
                    ct = ct.to(tl.float32)
                    a_hi = a.to(tl.bfloat16)
                    c_hi = ct.to(tl.bfloat16)
                    acc = tl.dot(a_hi, c_hi, acc)
                    if PRECISION == 3:
                        a_lo = (a - a_hi.to(tl.float32)).to(tl.bfloat16)
                        c_lo = (ct - c_hi.to(tl.float32)).to(tl.bfloat16)
                        acc = tl.dot(a_hi, c_lo, acc)
                        acc = tl.dot(a_lo, c_hi, acc)
            logits = acc * scale
            if LOSS == 0:
                z = logits + bias
                # softplus(z) = max(z, 0) + log1p(e), e = exp(-|z|) in (0, 1]; log1p by its series below
                # 1/16 (error < 1e-8 relative), where log(1 + e) would lose e's low bits to rounding 1 + e
                e = tl.exp(-tl.abs(z))
                series = e * (1.0 + e * (-0.5 + e * (1.0 / 3 + e * (-0.25 + e * (0.2 - e * (1.0 / 6))))))
                log1p = tl.where(e < 0.0625, series, tl.log(1.0 + e))
                terms = tl.maximum(z, 0.0) + log1p
                total += tl.sum(tl.where(mask_c[None, :], terms, 0.0), axis=1)
            else:
                logits = tl.where(mask_c[None, :], logits, float("-inf"))
                new_peak = tl.maximum(peak, tl.max(logits, axis=1))
                total = total * tl.exp(peak - new_peak) + tl.sum(tl.exp(logits - new_peak[:, None]), axis=1)
                peak = new_peak
        if LOSS == 0:
            out = total
        else:
            out = peak + tl.log(total)
        if direction == 0:
            tl.store(row_ptr + offs_b64, out, mask=mask_b)
        else:
            tl.store(col_ptr + offs_b64, out, mask=mask_b)
