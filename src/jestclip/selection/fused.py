"""A fused Triton kernel for the chunk update of joint selection, and the backend switch that picks it.

Absorbing a chunk of ``c`` chosen pairs into the running conditional scores (``contrastive.py``) needs, for
every candidate k, ``sum_{i in chunk} f(L_ki)`` and ``sum_{i in chunk} f(L_ik)`` (sigmoid: ``f = softplus``
of the biased logit; softmax: a log-sum-exp instead of a sum). The ``torch`` backend builds ``[B, c]``
logit tiles and reduces them; the ``triton-*`` backends compute the same two ``[B]`` reductions in one kernel
per model that keeps each ``[BLOCK_B, BLOCK_C]`` tile in registers, so nothing of size ``[B, c]`` is written
to memory. Their names give the matrix operands' precision; products are accumulated in float32 either way:

==================  =============================================================================
backend             operands of the ``x_k . y_i`` products
==================  =============================================================================
``torch``           the embeddings' own dtype through ``torch.mm`` (the exact path; CPU default)
``triton-fp32``     float32, plain FMA (``input_precision="ieee"``)
``triton-tf32``     float32 rounded to TF32 (10-bit mantissa, to nearest) on the tensor cores
``triton-bf16``     rounded to bfloat16 (to nearest even) on the tensor cores
``triton-bf16x3``   each split into a bfloat16 and the bfloat16 of its remainder; three bf16 products
                    (hi·hi + hi·lo + lo·hi): about 16 mantissa bits at three times bf16's work
``emulated-<p>``    the ``triton-<p>`` arithmetic in torch tiles on any device: operands rounded as
                    the kernel rounds them, float32 products (slow; to measure a precision without a GPU)
==================  =============================================================================

``backend=None`` means ``default_backend(device, loss)``: ``torch`` on the CPU, ``CUDA_DEFAULT_BACKEND[loss]``
on CUDA when Triton is importable. Triton is optional: this module imports it only when a ``triton-*`` backend
runs. With ``TRITON_INTERPRET=1`` set before that call, the kernel runs in Triton's interpreter on CPU
tensors (slow; what the CPU tests use).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys

import torch
from torch import Tensor

__all__ = [
    "BACKENDS",
    "CUDA_DEFAULT_BACKEND",
    "PRECISIONS",
    "backend_chunk_terms",
    "check_backend",
    "chunk_terms",
    "default_backend",
    "emulated_chunk_terms",
    "operand_parts",
    "triton_available",
]

PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "bf16", "bf16x3")
BACKENDS: tuple[str, ...] = (
    "torch",
    *(f"triton-{p}" for p in PRECISIONS),
    *(f"emulated-{p}" for p in PRECISIONS),
)

# The backend `backend=None` means on CUDA, per loss. It stays the exact torch path until a GPU run has
# passed the CUDA tests and measured the agreement table of `benchmarks/gpu.py`, whose report names the
# backend the rule of docs/selection.md ("The fused chunk update") picks; the kernel has not run on a GPU yet.
CUDA_DEFAULT_BACKEND: dict[str, str] = {"sigmoid": "torch", "softmax": "torch"}

_LOSS_CODES = {"sigmoid": 0, "softmax": 1}
_PRECISION_CODES = {"fp32": 0, "tf32": 1, "bf16": 2, "bf16x3": 3}
INTERPRETER_BLOCKS = (64, 32, 32)  # the interpreter runs one program at a time: few, large blocks


def triton_available() -> bool:
    """Whether Triton is installed (looked up, not imported: ``jestclip.selection`` never imports it)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules["triton"] is None (import blocked)
        return False


def _interpreting() -> bool:
    """``TRITON_INTERPRET`` as Triton reads it: the kernel runs in the interpreter (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on", "y")


def _check_triton_mode(interpret: bool) -> None:
    """Triton builds its language library for the interpreter or the GPU when first imported, by
    ``TRITON_INTERPRET`` then: a kernel run the other way fails deep inside Triton, so say it here."""
    standard = sys.modules["triton.language.standard"]
    built_for_interpreter = type(standard.sum).__name__ == "InterpretedFunction"
    if built_for_interpreter != interpret:
        built = "its interpreter" if built_for_interpreter else "the GPU"
        needed = (
            "the interpreter (CPU tensors, TRITON_INTERPRET=1)" if interpret else "the GPU (CUDA tensors)"
        )
        raise ValueError(
            f"chunk_terms: Triton was imported for {built} but this call needs {needed}: one process runs "
            "Triton one way, as TRITON_INTERPRET said when triton was first imported"
        )


def default_backend(device: torch.device, loss: str) -> str:
    """The backend ``backend=None`` means for ``loss`` on ``device``: ``torch`` on the CPU, else
    ``CUDA_DEFAULT_BACKEND[loss]`` when Triton is importable (and ``torch`` when it is not)."""
    if torch.device(device).type != "cuda" or not triton_available():
        return "torch"
    return CUDA_DEFAULT_BACKEND.get(loss, "torch")


def check_backend(backend: str | None, device: torch.device, caller: str, loss: str = "sigmoid") -> str:
    """``backend`` (``None``: ``default_backend(device, loss)``), checked to run on ``device``.

    Raises a ValueError naming ``caller`` for an unknown name, a ``triton-*`` backend without Triton, or one
    on a device that is neither CUDA nor the CPU under ``TRITON_INTERPRET=1``.
    """
    if backend is None:
        return default_backend(device, loss)
    if backend not in BACKENDS:
        raise ValueError(f"{caller}: backend must be None or one of {BACKENDS}, got {backend!r}")
    if backend.startswith("triton-"):
        if not triton_available():
            raise ValueError(f"{caller}: backend={backend!r} needs Triton, which is not installed")
        kind = torch.device(device).type
        if kind != "cuda" and not (kind == "cpu" and _interpreting()):
            raise ValueError(
                f"{caller}: backend={backend!r} runs on CUDA tensors, or on CPU tensors in Triton's "
                f"interpreter (TRITON_INTERPRET=1); the embeddings are on {device}"
            )
    return backend


def operand_parts(x: Tensor, precision: str) -> list[Tensor]:
    """The float32 parts the kernel multiplies for operand ``x`` at ``precision`` (same shape as ``x``).

    fp32: ``[x]``; tf32: ``[x]`` with its mantissa rounded to 10 bits, to nearest with ties away from zero
    (the kernel's bit arithmetic; inf and nan stay so); bf16: ``[x]`` rounded to bfloat16, to nearest even;
    bf16x3: ``[hi, lo]``, hi = x in bfloat16 and lo = (x - hi) in bfloat16 (the kernel multiplies
    hi·hi' + hi·lo' + lo·hi'). Raises ValueError for an unknown precision.
    """
    if precision not in _PRECISION_CODES:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    x = x.to(torch.float32)
    if precision in ("bf16", "bf16x3"):
        hi = x.to(torch.bfloat16).to(torch.float32)
        return [hi] if precision == "bf16" else [hi, (x - hi).to(torch.bfloat16).to(torch.float32)]
    if precision == "tf32":
        bits = x.contiguous().view(torch.int32)
        return [torch.where(torch.isfinite(x), (bits + 0x1000) & -0x2000, bits).view(torch.float32)]
    return [x]


def _emulated_product(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """``a @ b.T`` of operands split by ``operand_parts``: the kernel's products, none of lo·lo'."""
    out = a[0] @ b[0].T
    if len(a) > 1:
        out = out + a[0] @ b[1].T + a[1] @ b[0].T
    return out


def _check_chunk(cand_image: Tensor, cand_text: Tensor, chunk_image: Tensor, chunk_text: Tensor) -> None:
    if cand_image.ndim != 2 or cand_image.shape != cand_text.shape:
        raise ValueError(
            f"candidate embeddings must be two [B, D] tensors, got {tuple(cand_image.shape)} and "
            f"{tuple(cand_text.shape)}"
        )
    dim = cand_image.shape[1]
    if chunk_image.ndim != 2 or chunk_image.shape != chunk_text.shape or chunk_image.shape[1] != dim:
        raise ValueError(
            f"chunk embeddings {tuple(chunk_image.shape)}/{tuple(chunk_text.shape)} do not match "
            f"candidates of dim {dim}"
        )


def emulated_chunk_terms(
    cand_image: Tensor,
    cand_text: Tensor,
    chunk_image: Tensor,
    chunk_text: Tensor,
    *,
    scale: float,
    bias: float,
    loss: str,
    precision: str,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """``chunk_terms`` in torch tiles: the operands rounded as the kernel rounds them, the products and the
    reductions in ``dtype`` (float32 as the kernel; float64 makes it an oracle for the kernel's arithmetic).

    Materialises two ``[B, c]`` tiles: for measuring and testing, not for speed. Same shapes and errors as
    ``chunk_terms``.
    """
    _check_chunk(cand_image, cand_text, chunk_image, chunk_text)
    if loss not in _LOSS_CODES:
        raise ValueError(f"loss must be one of {tuple(_LOSS_CODES)}, got {loss!r}")
    x, y = ([part.to(dtype) for part in operand_parts(t, precision)] for t in (cand_image, cand_text))
    cx, cy = ([part.to(dtype) for part in operand_parts(t, precision)] for t in (chunk_image, chunk_text))
    fill = 0.0 if loss == "sigmoid" else float("-inf")
    out = [torch.full((cand_image.shape[0],), fill, dtype=dtype, device=cand_image.device) for _ in range(2)]
    step = max(1, (1 << 26) // max(1, cand_image.shape[0]))  # chunk rows per tile: at most 2^26 elements
    for start in range(0, chunk_image.shape[0], step):
        rows = slice(start, start + step)
        # [B, rows]: L_ki (row) and L_ik (col), without bias
        tiles = (_emulated_product(x, [p[rows] for p in cy]), _emulated_product(y, [p[rows] for p in cx]))
        for k, tile in enumerate(tiles):
            tile = tile * scale
            if loss == "sigmoid":
                out[k] += torch.nn.functional.softplus(tile + bias).sum(dim=1)
            else:
                out[k] = torch.logaddexp(out[k], torch.logsumexp(tile, dim=1))
    return out[0], out[1]


def backend_chunk_terms(
    backend: str,
    cand_image: Tensor,
    cand_text: Tensor,
    chunk_image: Tensor,
    chunk_text: Tensor,
    scale: float,
    bias: float,
    loss: str,
) -> tuple[Tensor, Tensor]:
    """``chunk_terms`` (``triton-<p>``) or ``emulated_chunk_terms`` (``emulated-<p>``) of ``backend``.

    The ``torch`` backend has no such call (``contrastive.RunningTerms`` builds its tiles itself): a
    ValueError, as for any name not in ``BACKENDS``.
    """
    kind, _, precision = backend.partition("-")
    if backend not in BACKENDS or kind == "torch":
        raise ValueError(
            f"backend_chunk_terms: backend must be a triton-* or emulated-* one, got {backend!r}"
        )
    fn = chunk_terms if kind == "triton" else emulated_chunk_terms
    return fn(
        cand_image, cand_text, chunk_image, chunk_text, scale=scale, bias=bias, loss=loss, precision=precision
    )


def chunk_terms(
    cand_image: Tensor,
    cand_text: Tensor,
    chunk_image: Tensor,
    chunk_text: Tensor,
    *,
    scale: float,
    bias: float,
    loss: str,
    precision: str,
    blocks: tuple[int, int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """One model's chunk increments for all B candidates, in one Triton kernel (no ``[B, c]`` tile stored).

    cand_image, cand_text: ``[B, D]``; chunk_image, chunk_text: ``[c, D]``, any float dtype, on one
    CUDA device (or the CPU under ``TRITON_INTERPRET=1``). With ``L_ki = scale * x_k . y_i`` (x image,
    y text; plus ``bias`` for sigmoid) returns float32 ``(row, col)``, each ``[B]``:

    - sigmoid: ``row_k = sum_i softplus(L_ki + bias)``, ``col_k = sum_i softplus(L_ik + bias)``, the
      off-diagonal pair losses of Algorithm 2 that ``SigmoidTerms`` adds up;
    - softmax: ``row_k = LSE_i L_ki``, ``col_k = LSE_i L_ik``, Algorithm 3's terms over the chunk, which
      ``SoftmaxTerms`` merges with ``logaddexp``.

    An empty chunk gives zeros (sigmoid) or ``-inf`` (softmax); a candidate with non-finite embeddings, nan.

    ``precision`` (``PRECISIONS``) rounds the matrix operands; accumulation is float32. ``blocks``:
    ``(BLOCK_B, BLOCK_C, BLOCK_D)``, powers of two >= 16, instead of autotuning (and of
    ``INTERPRETER_BLOCKS`` in the interpreter). Raises ValueError on mismatched shapes, an unknown loss or
    precision, or a device the kernel cannot run on.
    """
    _check_chunk(cand_image, cand_text, chunk_image, chunk_text)
    if loss not in _LOSS_CODES:
        raise ValueError(f"loss must be one of {tuple(_LOSS_CODES)}, got {loss!r}")
    if precision not in _PRECISION_CODES:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = cand_image.device
    if len({t.device for t in (cand_image, cand_text, chunk_image, chunk_text)}) != 1:
        raise ValueError("chunk_terms: candidates and chunk must be on one device")
    check_backend(f"triton-{precision}", device, "chunk_terms")
    n, dim = cand_image.shape
    c = chunk_image.shape[0]
    row = torch.empty(n, dtype=torch.float32, device=device)
    col = torch.empty(n, dtype=torch.float32, device=device)
    if n == 0 or c == 0:
        fill = 0.0 if loss == "sigmoid" else float("-inf")
        return row.fill_(fill), col.fill_(fill)
    interpret = _interpreting() and device.type == "cpu"
    if blocks is None and interpret:
        blocks = INTERPRETER_BLOCKS
    args = (
        cand_image, cand_text, chunk_image, chunk_text, row, col, n, c, dim,
        *cand_image.stride(), *cand_text.stride(), *chunk_image.stride(), *chunk_text.stride(),
        float(scale), float(bias),
    )  # fmt: skip
    constants = {
        "LOSS": _LOSS_CODES[loss],
        "PRECISION": _PRECISION_CODES[precision],
        "INTERPRET": interpret,
    }
    from jestclip.selection.fused_kernel import kernel  # imports triton

    _check_triton_mode(interpret)
    fma = precision == "fp32"
    if blocks is not None and (len(blocks) != 3 or any(b < 16 or b & (b - 1) for b in blocks)):
        raise ValueError(f"chunk_terms: blocks must be three powers of two >= 16, got {blocks}")
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with on_device:  # Triton launches on the current CUDA device
        if blocks is not None:
            block_b, block_c, block_d = blocks
            grid = (-(-n // block_b),)
            kernel(interpret, False, fma)[grid](
                *args, **constants, BLOCK_B=block_b, BLOCK_C=block_c, BLOCK_D=block_d
            )
        else:
            kernel(interpret, True, fma)[lambda meta: (-(-n // meta["BLOCK_B"]),)](*args, **constants)
    return row, col
