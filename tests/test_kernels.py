"""Kernels against independent references: float64 torch products, a float64 run of the Polar
Express recurrence, and SVD-based spectral functions.

The Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set here before the
kernels are first built; `kernels` imports triton lazily). Outputs are filled with NaN before
each launch, so an element the kernel fails to write shows up.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import kernels  # noqa: E402
from kernels import msign, msign_reference, polar_coeffs  # noqa: E402

triton = pytest.importorskip("triton")
from kernels import triton_polar as tp  # noqa: E402

if not tp.interpreting():
    pytest.skip("TRITON_INTERPRET is set to something other than 1", allow_module_level=True)

# Default interpreter tiles are 32 x 32 x 32: sizes below include multiples (32, 64, 96) and not.
TOL = {torch.float32: 2e-6, torch.bfloat16: 1e-2}  # relative Frobenius error vs float64


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def nan_like(shape, dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype)


def stack(B, rows, cols, dtype, tall, seed):
    """(B, rows, cols) operand; tall=True gives a strided view of a (B, cols, rows) tensor."""
    gen = torch.Generator().manual_seed(seed)
    if tall:
        return torch.randn(B, cols, rows, generator=gen).to(dtype).mT
    return torch.randn(B, rows, cols, generator=gen).to(dtype)


CASES = [  # (batch, m, k): multiples and non-multiples of 32, batch 1 to 17
    (1, 32, 64),
    (3, 40, 72),
    (2, 70, 33),
    (17, 9, 20),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tall", [False, True])
@pytest.mark.parametrize("B,m,k", CASES)
def test_sym_mm_gram(B, m, k, tall, dtype):
    X = stack(B, m, k, dtype, tall, seed=B * 1000 + m + k)
    A = nan_like((B, m, m), dtype)
    tp.sym_mm(A, X, X)
    ref = X.double() @ X.double().mT
    assert not torch.isnan(A).any(), "some output elements were never written"
    assert rel_err(A, ref) < TOL[dtype]
    assert rel_err(A, A.mT) < TOL[dtype]  # the mirrored half matches the computed half


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,m", [(1, 32), (3, 50), (17, 12)])
def test_sym_mm_fused_epilogue(B, m, dtype):
    """C = c A A + b A + d I on a symmetric A (the line B = b A + c A A of the iteration)."""
    X = stack(B, m, m + 7, torch.float64, False, seed=m)
    A = (X @ X.mT / m).to(dtype)
    C = nan_like((B, m, m), dtype)
    tp.sym_mm(C, A, A, alpha=0.7, D=A, beta=-1.3, diag=0.25)
    A64 = A.double()
    ref = 0.7 * A64 @ A64 - 1.3 * A64 + 0.25 * torch.eye(m, dtype=torch.float64)
    assert not torch.isnan(C).any()
    assert rel_err(C, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tall", [False, True])
@pytest.mark.parametrize("B,m,n", [(1, 32, 96), (3, 40, 72), (17, 9, 20), (2, 33, 65)])
def test_mm_with_epilogue(B, m, n, tall, dtype):
    """out = alpha L R + beta E with R, E, out in the tall (strided) layout when tall=True."""
    L = stack(B, m, m, dtype, False, seed=n)
    R = stack(B, m, n, dtype, tall, seed=n + 1)
    stored = nan_like((B, n, m) if tall else (B, m, n), dtype)
    out = stored.mT if tall else stored
    tp.mm(out, L, R, alpha=1.5, E=R, beta=-2.0)
    ref = 1.5 * L.double() @ R.double() - 2.0 * R.double()
    assert not torch.isnan(stored).any()
    assert rel_err(out, ref) < TOL[dtype]


def test_small_tiles_cover_triangle_and_groups():
    """Small, non-square tiles: many triangle tiles (index math) and grouped mm ordering."""
    X = stack(2, 80, 50, torch.float32, True, seed=5)
    A = nan_like((2, 80, 80), torch.float32)
    tp.sym_mm(A, X, X, config={"BLOCK": 16, "BLOCK_K": 16})  # 5 x 5 tile grid, 15 tiles
    assert rel_err(A, X.double() @ X.double().mT) < TOL[torch.float32]
    Y = stack(2, 80, 44, torch.float32, False, seed=6)
    out = nan_like((2, 80, 44), torch.float32)
    tp.mm(out, A, Y, config={"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2})
    assert rel_err(out, A.double() @ Y.double()) < TOL[torch.float32]


def test_kernel_argument_errors():
    X = torch.randn(2, 8, 12)
    with pytest.raises(ValueError, match="out must have shape"):
        tp.sym_mm(torch.empty(2, 8, 9), X, X)
    with pytest.raises(ValueError, match="R must have shape"):
        tp.mm(torch.empty(2, 8, 8), X, torch.randn(2, 8, 8))
    with pytest.raises(ValueError, match="share a dtype"):
        tp.sym_mm(torch.empty(2, 8, 8), X, X.double())


@pytest.mark.parametrize("shape", [(3, 40, 72), (72, 40), (2, 33, 33), (17, 20, 9)])
def test_msign_triton_matches_float64_recurrence(shape):
    """Whole 5-step msign (Triton, fp32 iterates) against the same recurrence in float64."""
    G = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    ref = msign_reference(G.double(), 5, compute_dtype=torch.float64)
    out = msign(G, 5, backend="triton")
    assert out.shape == G.shape and out.dtype == G.dtype
    assert (out.double() - ref).abs().max().item() < 2e-5
    # it is also a polar factor: singular values pushed into Polar Express's band
    s = torch.linalg.svdvals(out.double())
    s_ref = torch.linalg.svdvals(ref)
    assert torch.allclose(s, s_ref, atol=1e-4)


def test_msign_triton_bf16_iterates():
    """bf16 storage between kernels (the CUDA default) stays close to the float64 recurrence."""
    G = torch.randn(2, 48, 80, generator=torch.Generator().manual_seed(11))
    ref = msign_reference(G.double(), 5, compute_dtype=torch.float64)
    out = msign(G, 5, backend="triton", compute_dtype=torch.bfloat16)
    torch_bf16 = msign_reference(G, 5, compute_dtype=torch.bfloat16)
    # bf16 rounding of the iterates, amplified on the small singular directions of a small matrix
    assert rel_err(out, ref) < 8e-2
    assert rel_err(out, ref) < 2 * rel_err(torch_bf16, ref)  # comparable to plain torch in bf16


def test_msign_triton_bf16_input():
    """bf16 in, bf16 out; compared with the float64 recurrence on the same bf16 values."""
    G = torch.randn(3, 24, 40, generator=torch.Generator().manual_seed(12)).to(torch.bfloat16)
    out = msign(G, 5, backend="triton")
    assert out.dtype == torch.bfloat16 and out.shape == G.shape
    ref = msign_reference(G.double(), 5, compute_dtype=torch.float64)
    assert rel_err(out, ref) < 1e-2  # bf16 rounding of the result


def test_msign_dispatch_and_errors(monkeypatch):
    G = torch.randn(3, 16, 24)
    assert kernels.resolve_backend(G, None) == "torch"  # CPU tensors take the torch reference
    assert torch.equal(msign(G), msign_reference(G))
    with pytest.raises(ValueError, match="unknown backend"):
        msign(G, backend="cuda")
    with pytest.raises(ValueError, match="steps >= 1"):
        msign(G, steps=0)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # read at call time
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        msign(G, backend="triton")


def svd_function(G: torch.Tensor, f) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return U @ torch.diag_embed(f(S)) @ Vh


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shape", [(2, 24, 40), (40, 24)])
def test_soft_msign_matches_svd(shape, backend):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    mean_s2 = (torch.linalg.svdvals(G.double()) ** 2).mean().item()
    for rel_c in (0.01, 0.1, 1.0):
        c = rel_c * mean_s2
        out = kernels.soft_msign(G, c, backend=backend)
        ref = svd_function(G, lambda s: s / torch.sqrt(s ** 2 + c))
        assert out.shape == G.shape
        assert (out.double() - ref).abs().max().item() < 1e-5, f"c = {rel_c} * mean(s^2)"


@pytest.mark.parametrize("backend,dtype,tol", [("torch", torch.float64, 1e-6), ("triton", torch.float32, 1e-4)])
def test_soft_msign_accurate_down_to_documented_c(backend, dtype, tol):
    """Singular values spread over 5 decades; c = 1e-6 ||G||_F^2 is the documented lower limit."""
    gen = torch.Generator().manual_seed(8)
    U, _ = torch.linalg.qr(torch.randn(32, 32, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(48, 32, generator=gen, dtype=torch.float64))
    S = torch.logspace(-5, 0, 32, dtype=torch.float64)
    G = U @ torch.diag(S) @ V.T
    c = 1e-6 * (G.norm() ** 2).item()
    out = kernels.soft_msign(G.to(dtype), c, backend=backend, compute_dtype=dtype)
    ref = U @ torch.diag(S / torch.sqrt(S ** 2 + c)) @ V.T
    assert (out.double() - ref).abs().max().item() < tol


def test_soft_msign_per_matrix_c_and_errors():
    G = torch.randn(3, 20, 12, generator=torch.Generator().manual_seed(4))
    c = torch.tensor([0.5, 2.0, 8.0])
    out = kernels.soft_msign(G, c, backend="torch")
    for i in range(3):
        ref = svd_function(G[i], lambda s: s / torch.sqrt(s ** 2 + c[i].item()))
        assert (out[i].double() - ref).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="c > 0"):
        kernels.soft_msign(G, 0.0)
    with pytest.raises(ValueError, match="one per matrix"):
        kernels.soft_msign(G, torch.ones(2))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shape", [(2, 24, 56), (56, 24)])
def test_gram_poly_matches_svd(shape, backend):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    G = G / torch.linalg.matrix_norm(G, ord=2, keepdim=True)  # singular values in (0, 1]
    coeffs = (1.0, -0.8, 0.3, 0.05)
    out = kernels.gram_poly(G, coeffs, backend=backend)
    ref = svd_function(G, lambda s: s * sum(ck * s ** (2 * k) for k, ck in enumerate(coeffs)))
    assert (out.double() - ref).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="at least one coefficient"):
        kernels.gram_poly(G, [], backend=backend)


def test_polar_coeffs_polish():
    assert polar_coeffs(5, 0) == list(kernels.POLAR_EXPRESS_COEFFS)
    assert polar_coeffs(5, 2)[-1] == kernels.NEWTON_SCHULZ_QUINTIC
    with pytest.raises(ValueError, match="polish"):
        polar_coeffs(5, -1)


def test_bench_runs_on_cpu(tmp_path):
    """The benchmark script itself (tiny shape, interpreter) so that it cannot rot."""
    import json

    from bench import bench_msign

    out = tmp_path / "bench.json"
    bench_msign.main(["--cpu", "--shapes", "1x16x24", "--backends", "torch,triton", "--reps", "1",
                      "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["info"]["torch"] == torch.__version__ and report["info"]["triton"] == triton.__version__
    assert {r["backend"] for r in report["results"]} == {"torch", "triton"}
    rec = report["results"][0]
    full, sym = bench_msign.flop_counts((1, 16, 24), 5)
    assert rec["flops_full"] == full == 5 * (4 * 16 * 16 * 24 + 2 * 16 ** 3)
    assert rec["flops_sym"] == sym == 5 * (3 * 16 * 16 * 24 + 16 ** 3)
    assert rec["ms"] > 0 and report["matmul"]["tflops"] > 0
