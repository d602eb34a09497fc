"""The fused chunk update (``selection/fused.py``) on the CPU: the Triton kernel in Triton's interpreter
against float64 oracles, the backend switch, and the agreement measure.

Triton builds its language library for the interpreter or the GPU when it is first imported, as
``TRITON_INTERPRET`` says then. So the kernel tests set ``TRITON_INTERPRET=1`` and run in this process only
where it has no GPU and Triton is not yet imported for one; otherwise (a CI run of the whole suite, where
open_clip imported Triton earlier, or a GPU machine) ``test_kernel_tests_in_a_fresh_process`` runs this
file again in a fresh process with ``TRITON_INTERPRET=1`` and no visible GPU. Either way CI runs them. Triton
comes with torch's Linux wheels; where it is missing they are skipped, except under CI (``CI`` set), where
that is a failure. The interpreter does not run the GPU's bf16 matrix
instruction (it would multiply bf16 bit patterns as integers): the kernel there computes the same values in
float32, and ``tests/test_cuda.py`` checks the GPU's own path against the same oracle.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from jestclip.selection import (
    LOSSES,
    ConditionalScores,
    Embeddings,
    dense_conditional_scores,
    fused,
    joint_select,
)
from jestclip.selection.agreement import Agreement, choose_default, selection_agreement

from .helpers import gen, learner_and_reference

ROOT = Path(__file__).resolve().parents[2]
HAVE_TRITON = fused.triton_available()
if not HAVE_TRITON and os.environ.get("CI"):
    raise RuntimeError("Triton is missing under CI: the fused kernel's tests would not run")
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed")

# Largest error of each precision against the exact float64 chunk terms, relative to their largest magnitude,
# on the inputs of `pair_inputs`: what each operand rounding costs (fp32: float32 accumulation only).
BOUNDS = {"fp32": 1e-5, "tf32": 3e-3, "bf16": 2e-2, "bf16x3": 1e-4}


def interpreter_here() -> bool:
    """Whether the kernel tests can run in this process: no GPU (so Triton may stay set up for its
    interpreter for the rest of the process) and Triton not already imported for the GPU."""
    if torch.cuda.is_available():
        return False
    standard = sys.modules.get("triton.language.standard")
    return standard is None or type(standard.sum).__name__ == "InterpretedFunction"


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    if not interpreter_here():
        pytest.skip("Triton is set up for the GPU here: test_kernel_tests_in_a_fresh_process runs this test")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@needs_triton
def test_kernel_tests_in_a_fresh_process():
    if interpreter_here():
        pytest.skip("the kernel tests run in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT / "src")}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__))]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-2000:]
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "1 skipped" in summary and int(summary.split(" passed")[0].split()[-1]) >= 30, summary


def pair_inputs(n: int, c: int, dim: int, seed: int, dtype: torch.dtype = torch.float32):
    """Candidates ``[n, dim]`` (normalised, pairs partly aligned) and a chunk of ``c`` of them."""
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=1)
    text = F.normalize(image + torch.randn(n, dim, generator=g, dtype=torch.float64), dim=1)
    chunk = torch.randperm(n, generator=g)[:c]
    return image.to(dtype), text.to(dtype), image[chunk].to(dtype), text[chunk].to(dtype)


def exact(x, y, cx, cy, loss: str, scale: float = 10.0, bias: float = -10.0):
    """The chunk terms from the written formulas in float64, no rounding, no tiling."""
    row = scale * x.double() @ cy.double().T  # L_ki
    col = scale * y.double() @ cx.double().T  # L_ik
    if loss == "sigmoid":
        return F.softplus(row + bias).sum(1), F.softplus(col + bias).sum(1)
    return torch.logsumexp(row, 1), torch.logsumexp(col, 1)


def worst(got, want) -> float:
    return float((got.double() - want).abs().max() / want.abs().max())


@needs_triton
@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("precision", fused.PRECISIONS)
@pytest.mark.parametrize(
    ("n", "c", "dim", "blocks"),
    [(150, 37, 40, (16, 16, 16)), (70, 5, 12, None)],  # many tiles and ragged edges; one partial tile each
)
def test_kernel_computes_the_chunk_terms(loss, precision, n, c, dim, blocks):
    x, y, cx, cy = pair_inputs(n, c, dim, seed=n)
    kwargs = dict(scale=10.0, bias=-10.0, loss=loss, precision=precision)
    row, col = fused.chunk_terms(x, y, cx, cy, **kwargs, blocks=blocks)
    assert row.shape == col.shape == (n,) and row.dtype == torch.float32
    # the kernel's own arithmetic (its operand rounding) done in float64: only float32 accumulation differs
    oracle = fused.emulated_chunk_terms(x, y, cx, cy, **kwargs, dtype=torch.float64)
    assert worst(row, oracle[0]) < 2e-6 and worst(col, oracle[1]) < 2e-6
    want = exact(x, y, cx, cy, loss)
    assert worst(row, want[0]) < BOUNDS[precision] and worst(col, want[1]) < BOUNDS[precision]


@needs_triton
@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("loss", LOSSES)
def test_each_precision_rounds_its_operands(loss):
    """The error against float64 orders bf16 > tf32 > bf16x3 > fp32, each well apart: a precision that
    were ignored (all computed as fp32, or bf16 everywhere) fails here."""
    x, y, cx, cy = pair_inputs(128, 48, 64, seed=5)
    want = exact(x, y, cx, cy, loss)
    errors = {}
    for precision in fused.PRECISIONS:
        row, _ = fused.chunk_terms(x, y, cx, cy, scale=10.0, bias=-10.0, loss=loss, precision=precision)
        errors[precision] = worst(row, want[0])
    assert errors["bf16"] > 3 * errors["tf32"] > 9 * errors["bf16x3"] > 27 * errors["fp32"], errors


@needs_triton
@pytest.mark.usefixtures("interpret")
def test_kernel_reads_strides_and_any_float_dtype():
    """Non-contiguous views and float64/bf16 inputs give what contiguous float32 copies give."""
    x, y, cx, cy = pair_inputs(90, 20, 32, seed=7, dtype=torch.float64)
    kwargs = dict(scale=12.0, bias=-8.0, loss="sigmoid", precision="fp32", blocks=(32, 16, 16))
    want = fused.chunk_terms(*(t.float().contiguous() for t in (x, y, cx, cy)), **kwargs)
    wide = torch.cat([x, y], dim=1)  # x and y as column slices of one [n, 2D] tensor (row stride 2D)
    got = fused.chunk_terms(wide[:, :32], wide[:, 32:], cx.T.contiguous().T, cy, **kwargs)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    bf16 = [t.to(torch.bfloat16) for t in (x, y, cx, cy)]
    torch.testing.assert_close(
        fused.chunk_terms(*bf16, **kwargs), fused.chunk_terms(*(t.float() for t in bf16), **kwargs)
    )


@needs_triton
@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("precision", ["fp32", "bf16x3"])
def test_fused_scores_match_the_dense_oracle(loss, precision):
    """Conditional scores after absorbing a chosen set with the kernel equal the O(B²) float64 oracle."""
    learner, reference = learner_and_reference(96, 24, dtype=torch.float32)
    chosen = torch.randperm(96, generator=gen(1))[:30]
    state = ConditionalScores.from_embeddings(
        learner, reference, scoring="learnability", loss=loss, backend=f"triton-{precision}"
    )
    for part in chosen.split([7, 13, 10]):  # three chunks, as joint_select absorbs them
        state.absorb_indices(part)
    as64 = [Embeddings(e.image.double(), e.text.double(), e.scale, e.bias) for e in (learner, reference)]
    dense = dense_conditional_scores(*as64, chosen, loss=loss)
    mask = torch.isfinite(dense)
    torch.testing.assert_close(state.conditional().double()[mask], dense[mask], rtol=1e-4, atol=1e-4)


@needs_triton
@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("loss", LOSSES)
def test_fused_selection_draws_what_the_torch_path_draws(loss):
    learner, reference = learner_and_reference(160, 20, dtype=torch.float32)
    kwargs = dict(size=40, n_chunks=8, loss=loss)
    expected = joint_select(learner, reference, generator=gen(4), backend="torch", **kwargs)
    fused_picks = joint_select(learner, reference, generator=gen(4), backend="triton-fp32", **kwargs)
    assert torch.equal(fused_picks, expected)
    assert joint_select(learner, reference, generator=gen(4), **kwargs).tolist() == expected.tolist()


def test_the_cpu_default_is_the_torch_path_and_triton_needs_a_device(monkeypatch):
    learner, reference = learner_and_reference(32, dtype=torch.float32)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert fused.default_backend(torch.device("cpu"), "sigmoid") == "torch"
    assert ConditionalScores.from_embeddings(
        learner, reference, scoring="learnability", loss="softmax"
    ).backend == ("torch")
    with pytest.raises(ValueError, match="joint_select: backend must be None or one of"):
        joint_select(learner, reference, size=4, n_chunks=2, backend="triton-fp16")
    if HAVE_TRITON:
        with pytest.raises(ValueError, match=r"TRITON_INTERPRET=1.*on cpu"):
            joint_select(learner, reference, size=4, n_chunks=2, backend="triton-bf16")
    with pytest.raises(ValueError, match="precision must be one of"):
        fused.operand_parts(torch.ones(2), "fp16")
    with pytest.raises(ValueError, match="do not match candidates of dim"):
        fused.emulated_chunk_terms(
            *[torch.ones(4, 3)] * 2,
            *[torch.ones(2, 5)] * 2,
            scale=1.0,
            bias=0.0,
            loss="sigmoid",
            precision="bf16",
        )


def test_emulated_backends_run_anywhere_and_fp32_is_the_torch_path():
    """``emulated-fp32`` computes what ``torch`` computes, bit for bit (float32 tiles, same products)."""
    learner, reference = learner_and_reference(120, 16, dtype=torch.float32)
    kwargs = dict(size=30, n_chunks=6, loss="sigmoid")
    expected = joint_select(learner, reference, generator=gen(2), **kwargs)
    assert torch.equal(
        joint_select(learner, reference, generator=gen(2), backend="emulated-fp32", **kwargs), expected
    )


def test_operand_parts_round_as_documented():
    x = torch.tensor([1.0 + 2**-11, 1.0 + 3 * 2**-12, -(1.0 + 2**-11), 1.0 + 2**-8 + 2**-9, float("inf")])
    (tf32,) = fused.operand_parts(x, "tf32")  # ties away from zero at 10 mantissa bits
    assert tf32.tolist() == [1.0 + 2**-10, 1.0 + 2**-10, -(1.0 + 2**-10), 1.0 + 2**-8 + 2**-9, float("inf")]
    (bf16,) = fused.operand_parts(x[3:4], "bf16")  # ties to even at 7 bits: 1 + 3·2^-9 -> 1 + 2^-7
    assert bf16.tolist() == [1.0 + 2**-7]
    hi, lo = fused.operand_parts(torch.tensor([1.0 + 2**-9 + 2**-12, 1.0 + 2**-9 + 2**-20]), "bf16x3")
    assert hi.tolist() == [1.0, 1.0] and lo.tolist() == [2**-9 + 2**-12, 2**-9]  # lo keeps 8 bits too


def test_selection_works_without_triton():
    """``import jestclip.selection`` never imports Triton, and works with it blocked; asking for a triton
    backend then says it is missing."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from jestclip.selection import Embeddings, joint_select\n"
        "e = Embeddings(torch.eye(8), torch.eye(8), 10.0, -10.0)\n"
        "print(joint_select(e, e, size=3, n_chunks=3, generator=torch.Generator().manual_seed(0)).tolist())\n"
        "try:\n"
        "    joint_select(e, e, size=3, n_chunks=3, backend='triton-bf16')\n"
        "except ValueError as exn:\n"
        "    print(exn)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    picks, message = done.stdout.strip().splitlines()
    assert len(set(eval(picks))) == 3
    assert message == "joint_select: backend='triton-bf16' needs Triton, which is not installed"
    imported = subprocess.run(
        [sys.executable, "-c", "import sys, jestclip.selection; print('triton' in sys.modules)"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert imported.stdout.strip() == "False", imported.stderr[-2000:]


def scaled(n: int, dim: int, scale: float, seed: int) -> Embeddings:
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, dim, generator=g), dim=1)
    text = F.normalize(image + torch.randn(n, dim, generator=g), dim=1)
    return Embeddings(image, text, scale, -10.0)


def test_agreement_measures_what_a_precision_changes():
    """emulated-fp32 is the torch path: same picks, zero error. bf16 operands with a scale-100 reference
    move sampling logits by more than the Gumbel noise's scale; bf16x3 by far less."""
    learner, reference = scaled(512, 64, 10.0, 0), scaled(512, 64, 100.0, 1)
    rows = selection_agreement(
        learner,
        reference,
        size=102,
        backends=["emulated-fp32", "emulated-bf16", "emulated-bf16x3"],
        seeds=[0, 1],
    )
    same, bf16, split = rows
    assert [r.backend for r in rows] == ["emulated-fp32", "emulated-bf16", "emulated-bf16x3"]
    assert same.same_picks == same.min_same_picks == 1.0 and same.same_chunks == same.n_chunks == 16
    assert same.max_error == same.relative_error == 0.0 and same.qualifies
    assert 0.0 < same.noise_picks < 1.0 and bf16.noise_picks == same.noise_picks
    assert bf16.logit_error > 1.0 and bf16.logit_error == pytest.approx(100 * bf16.max_error)
    assert 0.0 < 30 * split.max_error < bf16.max_error and 0.0 < split.relative_error < bf16.relative_error
    assert bf16.same_picks <= split.same_picks


@needs_triton
@pytest.mark.usefixtures("interpret")
def test_agreement_of_the_kernel_itself():
    learner, reference = learner_and_reference(128, 16, dtype=torch.float32)
    (row,) = selection_agreement(learner, reference, size=32, n_chunks=4, backends=["triton-fp32"], seeds=[3])
    assert row.same_picks == 1.0 and row.same_chunks == 4 and 0.0 <= row.relative_error < 1e-5


def agreement_row(backend: str, same: float, noise: float = 0.9) -> Agreement:
    return Agreement(backend, same, same, 16, 16, noise, 0.0, 0.0, 100.0)


def test_the_default_is_the_fastest_backend_that_qualifies_everywhere():
    rows = [
        agreement_row("triton-bf16", 0.95),
        agreement_row("triton-bf16x3", 0.995),
        agreement_row("triton-fp32", 1.0),
    ]
    times = {"torch": 900.0, "triton-fp32": 500.0, "triton-bf16x3": 120.0, "triton-bf16": 40.0}
    assert choose_default(rows, times) == "triton-bf16x3"  # bf16 changes half of what a redraw does
    assert choose_default([*rows, agreement_row("triton-bf16x3", 0.98, noise=0.99)], times) == "triton-fp32"
    assert choose_default(rows, {"torch": 900.0}) == "torch"
    assert choose_default(rows, {"triton-bf16": 1.0}) is None
    with pytest.raises(ValueError, match="seeds must name at least one seed"):
        selection_agreement(*learner_and_reference(16), size=4, backends=[], seeds=[])
