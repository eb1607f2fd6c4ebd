"""Triton kernels for the Polar Express iteration on a stack of same-shape matrices.

Every launch covers the whole stack (grid axis 1 = batch index). Operands are passed with
their strides, so a tall matrix G (rows > cols) is iterated as X = G^T without a transposed
copy: the launchers just swap the two matrix strides. bf16 operands, fp32 accumulation.

Two kernels:
  _sym_mm_kernel:  C = alpha * L R^T + beta * D + diag * I   for a result known to be symmetric
                   (X X^T, A A^T with A symmetric, P A with P, A commuting and symmetric).
                   Only tiles on/below the diagonal are computed; each off-diagonal tile is also
                   written mirrored. Saves half of the MACs of these products.
  _mm_kernel:      C = alpha * L R + beta * E              (the line X' = a X + B X).

Importing this module imports triton: `kernels` imports it lazily, only when the Triton backend is
used. Whether the kernels run compiled (CUDA) or in Triton's CPU interpreter (TRITON_INTERPRET=1)
is decided when they are first used, from the environment at that moment.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import torch
import triton
import triton.language as tl

from kernels.polar_express import NORM_EPS, NORM_SAFETY

# Fixed tile sizes for the CPU interpreter (autotuning there would take minutes).
INTERPRETER_CONFIG = {"BLOCK": 32, "BLOCK_K": 32, "BLOCK_M": 32, "BLOCK_N": 32, "GROUP_M": 4}


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1), read now."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# --------------------------------------------------------------------------------------------
# Kernels (plain functions; decorated lazily by _kernels() so the interpreter flag is read late)
# --------------------------------------------------------------------------------------------

def _sym_mm_kernel(
    L, R, D, C,                       # pointers: L, R (B, M, K); D, C (B, M, M)
    M, K, batch,                      # sizes (batch only feeds the autotuning key)
    s_lb, s_lm, s_lk,                 # L strides
    s_rb, s_rm, s_rk,                 # R strides
    s_db, s_dm, s_dn,                 # D strides
    s_cb, s_cm, s_cn,                 # C strides
    alpha, beta, diag,                # fp32 scalars
    HAS_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Program t of the lower triangle: t = i (i + 1) / 2 + j with j <= i, in row order so that
    # neighbouring programs share the row block i of L.
    t = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    i = ((tl.sqrt((8 * t + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    i = tl.where((i + 1) * (i + 2) // 2 <= t, i + 1, i)  # fix fp32 sqrt rounding
    i = tl.where(i * (i + 1) // 2 > t, i - 1, i)
    j = t - i * (i + 1) // 2

    rows = i * BLOCK + tl.arange(0, BLOCK)
    cols = j * BLOCK + tl.arange(0, BLOCK)
    ks = tl.arange(0, BLOCK_K)
    # L tile (BLOCK, BLOCK_K) at rows; R^T tile (BLOCK_K, BLOCK) at cols: R^T[k, c] = R[c, k].
    l_ptrs = L + pid_b * s_lb + rows[:, None] * s_lm + ks[None, :] * s_lk
    r_ptrs = R + pid_b * s_rb + ks[:, None] * s_rk + cols[None, :] * s_rm
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_M and EVEN_K:
            l = tl.load(l_ptrs)
            r = tl.load(r_ptrs)
        else:
            k_left = K - k0
            l = tl.load(l_ptrs, mask=(rows[:, None] < M) & (ks[None, :] < k_left), other=0.0)
            r = tl.load(r_ptrs, mask=(ks[:, None] < k_left) & (cols[None, :] < M), other=0.0)
        if UPCAST:  # the CPU interpreter's tl.dot is wrong on bf16 operands
            l = l.to(tl.float32)
            r = r.to(tl.float32)
        acc = tl.dot(l, r, acc, input_precision=DOT_PRECISION)
        l_ptrs += BLOCK_K * s_lk
        r_ptrs += BLOCK_K * s_rk

    acc = acc * alpha
    tile_mask = (rows[:, None] < M) & (cols[None, :] < M)
    if HAS_D:
        d_ptrs = D + pid_b * s_db + rows[:, None] * s_dm + cols[None, :] * s_dn
        if EVEN_M:
            d = tl.load(d_ptrs)
        else:
            d = tl.load(d_ptrs, mask=tile_mask, other=0.0)
        acc += beta * d.to(tl.float32)
    acc = tl.where(rows[:, None] == cols[None, :], acc + diag, acc)
    out = acc.to(C.dtype.element_ty)

    c_ptrs = C + pid_b * s_cb + rows[:, None] * s_cm + cols[None, :] * s_cn
    if EVEN_M:
        tl.store(c_ptrs, out)
    else:
        tl.store(c_ptrs, out, mask=tile_mask)
    if i != j:  # mirrored tile (j, i); D is symmetric and diag never touches it
        ct_ptrs = C + pid_b * s_cb + cols[:, None] * s_cm + rows[None, :] * s_cn
        out_t = tl.trans(out)
        if EVEN_M:
            tl.store(ct_ptrs, out_t)
        else:
            tl.store(ct_ptrs, out_t, mask=(cols[:, None] < M) & (rows[None, :] < M))


def _mm_kernel(
    L, R, E, C,                       # pointers: L (B, M, K), R (B, K, N), E and C (B, M, N)
    M, N, K, batch,
    s_lb, s_lm, s_lk,
    s_rb, s_rk, s_rn,
    s_eb, s_em, s_en,
    s_cb, s_cm, s_cn,
    alpha, beta,
    HAS_E: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped tile order: GROUP_M row blocks share each column block of R while it sits in L2.
    pid = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    n_pid_m = tl.cdiv(M, BLOCK_M)
    n_pid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * n_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(n_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    l_ptrs = L + pid_b * s_lb + rows[:, None] * s_lm + ks[None, :] * s_lk
    r_ptrs = R + pid_b * s_rb + ks[:, None] * s_rk + cols[None, :] * s_rn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_M and EVEN_N and EVEN_K:
            l = tl.load(l_ptrs)
            r = tl.load(r_ptrs)
        else:
            k_left = K - k0
            l = tl.load(l_ptrs, mask=(rows[:, None] < M) & (ks[None, :] < k_left), other=0.0)
            r = tl.load(r_ptrs, mask=(ks[:, None] < k_left) & (cols[None, :] < N), other=0.0)
        if UPCAST:
            l = l.to(tl.float32)
            r = r.to(tl.float32)
        acc = tl.dot(l, r, acc, input_precision=DOT_PRECISION)
        l_ptrs += BLOCK_K * s_lk
        r_ptrs += BLOCK_K * s_rk

    acc = acc * alpha
    tile_mask = (rows[:, None] < M) & (cols[None, :] < N)
    if HAS_E:
        e_ptrs = E + pid_b * s_eb + rows[:, None] * s_em + cols[None, :] * s_en
        if EVEN_M and EVEN_N:
            e = tl.load(e_ptrs)
        else:
            e = tl.load(e_ptrs, mask=tile_mask, other=0.0)
        acc += beta * e.to(tl.float32)
    c_ptrs = C + pid_b * s_cb + rows[:, None] * s_cm + cols[None, :] * s_cn
    out = acc.to(C.dtype.element_ty)
    if EVEN_M and EVEN_N:
        tl.store(c_ptrs, out)
    else:
        tl.store(c_ptrs, out, mask=tile_mask)


# Autotuning candidates for sm_90 (H100 / H200: 228 KB shared memory per SM), kept short so that
# tuning a new shape takes seconds. The last entry of each list is the only one tried for fp32
# operands (exact fp32 products run on the CUDA cores; tuning them is slow and pointless).
def _sym_configs() -> list:
    shapes = [  # (BLOCK, BLOCK_K, num_warps, num_stages)
        (128, 64, 8, 3), (128, 64, 8, 4), (128, 64, 8, 5), (128, 64, 4, 4), (128, 128, 8, 2),
        (64, 64, 4, 4), (64, 128, 4, 3), (64, 64, 4, 3),
    ]
    return [triton.Config({"BLOCK": b, "BLOCK_K": bk}, num_warps=w, num_stages=s) for b, bk, w, s in shapes]


def _mm_configs() -> list:
    shapes = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
        (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (128, 256, 64, 8, 4),
        (256, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 3),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in shapes
    ]


def _prune_fp32(configs, named_args, **kwargs):
    return [configs[-1]] if named_args["L"].dtype == torch.float32 else configs


_SYM_HEURISTICS = {
    "EVEN_M": lambda a: a["M"] % a["BLOCK"] == 0,
    "EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0,
}
_MM_HEURISTICS = {
    "EVEN_M": lambda a: a["M"] % a["BLOCK_M"] == 0,
    "EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0,
    "EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0,
}

_KERNEL_CACHE: dict[bool, tuple] = {}


def _kernels(interpret: bool) -> tuple:
    """(sym_mm, mm) launchable kernels for the interpreter (fixed tiles) or the GPU (autotuned)."""
    if interpret not in _KERNEL_CACHE:
        sym = triton.heuristics(_SYM_HEURISTICS)(triton.jit(_sym_mm_kernel))
        mm = triton.heuristics(_MM_HEURISTICS)(triton.jit(_mm_kernel))
        if not interpret:
            prune = {"early_config_prune": _prune_fp32}
            sym = triton.autotune(_sym_configs(), key=["M", "K", "batch", "s_lm", "s_lk"], prune_configs_by=prune)(sym)
            mm = triton.autotune(_mm_configs(), key=["M", "N", "K", "batch", "s_lm", "s_rk", "s_cm"],
                                 prune_configs_by=prune)(mm)
        _KERNEL_CACHE[interpret] = (sym, mm)
    return _KERNEL_CACHE[interpret]


# --------------------------------------------------------------------------------------------
# Launchers: check shapes, pick the mode, launch. Outputs are written in place into `out`.
# --------------------------------------------------------------------------------------------

def _mode(*tensors: torch.Tensor) -> bool:
    """Return True for the interpreter, False for compiled CUDA; reject what neither can run."""
    dev = tensors[0].device
    if any(t.device != dev for t in tensors):
        raise ValueError(f"all operands must be on one device, got {[str(t.device) for t in tensors]}")
    if dev.type == "cuda":
        if interpreting():
            raise ValueError("TRITON_INTERPRET=1 is set but the tensors are on CUDA; unset it to run compiled kernels")
        return False
    if interpreting():
        return True
    raise ValueError(
        f"the Triton backend needs CUDA tensors (got {dev}); on CPU use backend='torch', or set "
        "TRITON_INTERPRET=1 before triton is first imported to run the kernels in Triton's interpreter"
    )


def _check_stack(name: str, t: torch.Tensor, shape: tuple) -> None:
    if t.ndim != 3 or tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} (batch, rows, cols), got {tuple(t.shape)}")


def _dot_precision(t: torch.Tensor) -> str:
    # fp32 operands get exact fp32 products (not tf32); bf16/fp16 ignore the setting.
    return "ieee" if t.dtype == torch.float32 else "tf32"


def sym_mm(out: torch.Tensor, L: torch.Tensor, R: torch.Tensor, alpha: float = 1.0,
           D: torch.Tensor | None = None, beta: float = 0.0, diag: float = 0.0,
           config: dict | None = None) -> torch.Tensor:
    """out = alpha * L R^T + beta * D + diag * I, for (B, M, K) L, R whose product is symmetric.

    Only the lower triangle of tiles is computed; the tiles above the diagonal are written as
    their mirror images (diagonal tiles are symmetric up to rounding). The caller guarantees symmetry of L R^T (L = R, or commuting symmetric
    L, R) and of D. Any strides; out (B, M, M) must not overlap the inputs.
    config: explicit tile sizes (BLOCK, BLOCK_K) instead of the default for the mode.
    """
    B, M, K = L.shape
    _check_stack("R", R, (B, M, K))
    _check_stack("out", out, (B, M, M))
    if D is not None:
        _check_stack("D", D, (B, M, M))
    interpret = _mode(out, L, R, *(() if D is None else (D,)))
    if L.dtype != R.dtype:
        raise ValueError(f"L and R must share a dtype, got {L.dtype} and {R.dtype}")
    sym, _ = _kernels(interpret)
    Dt = out if D is None else D  # placeholder pointer when HAS_D is off
    meta = {}
    if interpret:
        meta = {k: v for k, v in {**INTERPRETER_CONFIG, **(config or {})}.items() if k in ("BLOCK", "BLOCK_K")}
    elif config:
        raise ValueError("explicit tile configs are for the interpreter; on CUDA the kernels autotune")

    def grid(meta_):
        n = triton.cdiv(M, meta_["BLOCK"])
        return (n * (n + 1) // 2, B)

    sym[grid](
        L, R, Dt, out, M, K, B,
        *L.stride(), *R.stride(), *Dt.stride(), *out.stride(),
        float(alpha), float(beta), float(diag),
        HAS_D=D is not None, UPCAST=interpret, DOT_PRECISION=_dot_precision(L), **meta,
    )
    return out


def mm(out: torch.Tensor, L: torch.Tensor, R: torch.Tensor, alpha: float = 1.0,
       E: torch.Tensor | None = None, beta: float = 0.0, config: dict | None = None) -> torch.Tensor:
    """out = alpha * L @ R + beta * E for stacks L (B, M, K), R (B, K, N), E and out (B, M, N).

    Any strides; out must not overlap the inputs.
    config: explicit tile sizes (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M) for the interpreter.
    """
    B, M, K = L.shape
    if R.ndim != 3 or R.shape[0] != B or R.shape[1] != K:
        raise ValueError(f"R must have shape ({B}, {K}, N) to multiply L {tuple(L.shape)}, got {tuple(R.shape)}")
    N = R.shape[2]
    _check_stack("out", out, (B, M, N))
    if E is not None:
        _check_stack("E", E, (B, M, N))
    interpret = _mode(out, L, R, *(() if E is None else (E,)))
    if L.dtype != R.dtype:
        raise ValueError(f"L and R must share a dtype, got {L.dtype} and {R.dtype}")
    _, mmk = _kernels(interpret)
    Et = out if E is None else E
    meta = {}
    if interpret:
        keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")
        meta = {k: v for k, v in {**INTERPRETER_CONFIG, **(config or {})}.items() if k in keys}
    elif config:
        raise ValueError("explicit tile configs are for the interpreter; on CUDA the kernels autotune")

    def grid(meta_):
        return (triton.cdiv(M, meta_["BLOCK_M"]) * triton.cdiv(N, meta_["BLOCK_N"]), B)

    mmk[grid](
        L, R, Et, out, M, N, K, B,
        *L.stride(), *R.stride(), *Et.stride(), *out.stride(),
        float(alpha), float(beta),
        HAS_E=E is not None, UPCAST=interpret, DOT_PRECISION=_dot_precision(L), **meta,
    )
    return out


# --------------------------------------------------------------------------------------------
# Iterations built from the two kernels
# --------------------------------------------------------------------------------------------

def _wide_view(T: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The (B, m, n), m <= n, view of a stored (B, rows, cols) stack: a stride swap, no copy."""
    return T.mT if transposed else T


def _stack3(G: torch.Tensor, what: str) -> torch.Tensor:
    """Validated (B, rows, cols) view (or copy) of a (..., rows, cols) float tensor."""
    if G.ndim < 2:
        raise ValueError(f"{what} needs a matrix or a stack of matrices, got shape {tuple(G.shape)}")
    if not G.is_floating_point():
        raise ValueError(f"{what} needs a floating-point tensor, got {G.dtype}")
    return G.reshape(math.prod(G.shape[:-2]), G.shape[-2], G.shape[-1])


# CUDA graphs: one msign is ~15 kernel launches whose Python launch cost (~50 us each through
# the autotuner) exceeds their GPU time at the medium-track sizes, so each (shape, dtype, recipe)
# is captured once and replayed. Set USE_CUDA_GRAPHS = False (or pass cuda_graph=False) to launch
# eagerly; calls made while a graph is being captured always launch eagerly.
USE_CUDA_GRAPHS = True
_GRAPHS: dict[tuple, "_GraphedCall"] = {}


class _GraphedCall:
    """fn(static_input) captured in a CUDA graph; __call__ copies in, replays, returns a fresh copy."""

    def __init__(self, fn, like: torch.Tensor):
        self.static_in = torch.randn(like.shape, device=like.device).to(like.dtype)
        side = torch.cuda.Stream(like.device)
        side.wait_stream(torch.cuda.current_stream(like.device))
        with torch.cuda.stream(side):
            fn(self.static_in)  # autotunes and compiles every kernel outside the capture
        torch.cuda.current_stream(like.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = fn(self.static_in)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.static_in.copy_(x)
        self.graph.replay()
        return self.static_out.clone()


def clear_graph_cache() -> None:
    """Drop the captured graphs (and the GPU memory their buffers hold)."""
    _GRAPHS.clear()


def _run(key: tuple, fn, G3: torch.Tensor, cuda_graph: bool | None) -> torch.Tensor:
    """fn(G3), through a cached CUDA graph when on CUDA and enabled."""
    if cuda_graph is None:
        cuda_graph = USE_CUDA_GRAPHS
    if not (cuda_graph and G3.is_cuda) or torch.cuda.is_current_stream_capturing():
        return fn(G3)
    key = (key, tuple(G3.shape), G3.dtype, G3.device)
    if key not in _GRAPHS:
        _GRAPHS[key] = _GraphedCall(fn, G3)
    return _GRAPHS[key](G3)


def _polar_launch(G3: torch.Tensor, coeffs: tuple, compute_dtype: torch.dtype) -> torch.Tensor:
    """The kernel sequence of polar_iterate on a (B, rows, cols) stack; returns a new (B, rows, cols)."""
    batch, rows, cols = G3.shape
    transposed = rows > cols  # iterate on X = G^T through strides
    m = min(rows, cols)
    # X0 in compute dtype, stored like G (B, rows, cols): one elementwise pass.
    norm = torch.linalg.vector_norm(G3, dim=(-2, -1), keepdim=True, dtype=torch.float32)
    X = torch.empty((batch, rows, cols), dtype=compute_dtype, device=G3.device)
    torch.mul(G3, 1.0 / (norm * NORM_SAFETY + NORM_EPS), out=X)
    X_next = torch.empty_like(X)
    out = torch.empty((batch, rows, cols), dtype=G3.dtype, device=G3.device)
    A = torch.empty((batch, m, m), dtype=compute_dtype, device=G3.device)
    Bm = torch.empty_like(A)
    for step, (a, b, c) in enumerate(coeffs):
        Xw = _wide_view(X, transposed)                        # (B, m, n)
        sym_mm(A, Xw, Xw)                                     # A = X X^T
        sym_mm(Bm, A, A, alpha=c, D=A, beta=b)                # B = c A A + b A
        dst = out if step == len(coeffs) - 1 else X_next
        mm(_wide_view(dst, transposed), Bm, Xw, E=Xw, beta=a)  # X' = B X + a X
        X, X_next = dst, X
    return out


def polar_iterate(G: torch.Tensor, coeffs: Sequence[tuple[float, float, float]],
                  compute_dtype: torch.dtype | None = None, cuda_graph: bool | None = None) -> torch.Tensor:
    """Odd-polynomial polar iteration on a stack G (..., rows, cols); returns G's shape and dtype.

    X0 = G / (||G||_F * 1.02 + 1e-6) per matrix, then for each (a, b, c):
        A = X X^T;  B = c A A^T + b A;  X = a X + B X     on the wide side (m <= n).
    compute_dtype: storage dtype of X, A, B between kernels (default bfloat16 on CUDA,
    float32 on CPU); products accumulate in fp32. The last line writes G's dtype directly.
    cuda_graph: replay a captured CUDA graph per shape (default USE_CUDA_GRAPHS; CUDA only).
    """
    G3 = _stack3(G, "msign")
    coeffs = tuple(tuple(float(v) for v in abc) for abc in coeffs)
    if len(coeffs) == 0 or any(len(abc) != 3 for abc in coeffs):
        raise ValueError("polar_iterate needs one or more (a, b, c) coefficient triples")
    if compute_dtype is None:
        compute_dtype = torch.bfloat16 if G.is_cuda else torch.float32
    if G.numel() == 0:
        return torch.empty_like(G)
    out = _run(("polar", coeffs, compute_dtype), lambda x: _polar_launch(x, coeffs, compute_dtype), G3, cuda_graph)
    return out.reshape(G.shape)


def _gram_poly_launch(G3: torch.Tensor, coeffs: tuple, compute_dtype: torch.dtype) -> torch.Tensor:
    batch, rows, cols = G3.shape
    transposed = rows > cols
    m = min(rows, cols)
    X = G3.to(compute_dtype)
    Xw = _wide_view(X, transposed)
    out = torch.empty((batch, rows, cols), dtype=G3.dtype, device=G3.device)
    A = torch.empty((batch, m, m), dtype=compute_dtype, device=G3.device)
    sym_mm(A, Xw, Xw)                                          # A = X X^T
    # P = c_d A + c_{d-1} I (elementwise), then P <- P A + c_k I down to k = 0.
    P = A * coeffs[-1]
    P.diagonal(dim1=-2, dim2=-1).add_(coeffs[-2])
    P_next = torch.empty_like(A)
    for ck in reversed(coeffs[:-2]):
        sym_mm(P_next, P, A, diag=ck)                          # P A (symmetric: P and A commute)
        P, P_next = P_next, P
    mm(_wide_view(out, transposed), P, Xw)                     # out = P X
    return out


def gram_poly(G: torch.Tensor, coeffs: Sequence[float], compute_dtype: torch.dtype | None = None,
              cuda_graph: bool | None = None) -> torch.Tensor:
    """G g(G^T G) with g(x) = sum_k coeffs[k] x^k, on the short side; G's shape and dtype.

    Wide G (rows <= cols) uses the equal form g(G G^T) G. Horner's rule runs on the small
    (m, m) Gram matrix with the symmetric kernel (each step P <- P A + c_k I), then one
    (m, m) x (m, n) product. compute_dtype and cuda_graph as in polar_iterate.
    """
    G3 = _stack3(G, "gram_poly")
    coeffs = tuple(float(c) for c in coeffs)
    if len(coeffs) == 0:
        raise ValueError("gram_poly needs at least one coefficient")
    if len(coeffs) == 1 or G.numel() == 0:  # g is a constant
        return G * coeffs[0] if coeffs else torch.empty_like(G)
    if compute_dtype is None:
        compute_dtype = torch.bfloat16 if G.is_cuda else torch.float32
    out = _run(("gram_poly", coeffs, compute_dtype), lambda x: _gram_poly_launch(x, coeffs, compute_dtype),
               G3, cuda_graph)
    return out.reshape(G.shape)
