"""Spectral-ORD: Muon with an orthogonal-radial decomposition of the momentum-smoothed gradient.

For each weight matrix W (M, N) and G = g_eff, the momentum-smoothed gradient that Muon would orthogonalise
(Nesterov lerp of the averaged gradient and the momentum buffer), with <A, B> the Frobenius inner product:
    rho    = <G, W> / ||W||^2           (0 when W = 0, e.g. zero-initialised projections)
    G_par  = rho W                      (radial part: scales W, i.e. all its singular values together)
    G_perp = G - G_par                  (orthogonal part; G itself when decompose is off)
    P      = Polar(G_perp)              (kernels.msign, as in Muon)
    P      = P - (<P, W> / ||W||^2) W   (only with reproject: Polar(G_perp) is not orthogonal to W in general)
    U      = P + c G_par,   c = alpha                        (scale_mode "raw", the form of the notes)
                            c = alpha ||P|| / ||G||          (scale_mode "matched")
    W     <- W (1 - lr wd wd_mul) - lr max(1, M/N)^0.5 U     (weight decay and lr exactly as Muon)
alpha = spectral_lr_mul. "matched" measures G_par in the units of the polar term: G is rescaled to the norm of P
before its radial part is taken, so ||c G_par|| / ||P|| = alpha ||G_par|| / ||G|| = alpha * spectral_frac, the
radial term gets the share of the update that it has of the gradient. In "raw" mode P has entries ~1/sqrt(N)
while G_par is in gradient units, so alpha = 1 may add almost nothing (see the term_ratio diagnostic).
rho is taken against the current W, before this step's weight decay. 3-D parameters (B, M, N) are B separate
matrices (one rho each). The radial term is always added (c G_par with c = 0 adds exact zeros), so alpha = 0 with
decompose off is bit-identical to Muon; decompose defaults to "on iff alpha != 0".

Radial brake (brake_outward / brake_inward < 1; prior art: the "radial brake" of the modded-nanogpt track-3
optimizer benchmark, PR #294). With D = -lr s U the step (s: the base's step multiplier, max(1, M/N)^0.5 x lr_mul
by default) and d = 1 - lr wd wd_mul the (plain) decay:
    r      = <D, W> / ||W||^2               (radial coefficient of the step; outward when r > 0)
    k      = brake_outward if r > 0 else brake_inward
    W'     = d W + D + (k - 1) r W          (the radial part of the step scaled by k, the tangent part kept)
    W     <- W' * max(d ||W|| + k r ||W||, 0) / ||W'||
The last line undoes the norm growth that the tangent part adds at second order: the new norm is the old one
(decayed) plus the damped radial change. Per matrix (each slice of a 3-D stack); a matrix with W = 0 has no
radial direction and takes the plain step. brake_outward = brake_inward = 1 is the plain step (the same code
as Muon: bit-identical). The usual setting brakes outward moves only: brake_outward 0.5, brake_inward 1.

Diagnostics (diagnostics_every = N > 0): measured during the steps with s = 0, N, 2N, ..., where s =
group["step"] counts the steps completed before (s = 0 is the first step); one record per
matrix (a 3-D parameter gives one per slice, with "slice"):
    rho, spectral_frac = ||G_par|| / ||G||, term_ratio = ||c G_par|| / ||P|| (the two update terms as applied),
    par_polar_ratio = ||G_par|| / ||P|| (alpha-free), cos_polar_w = cos(P, W) before re-projection,
    g_norm, w_norm, radial_snr = mean(rho_k)^2 / (var(rho_k) / K) over the K ranks' raw (pre-momentum)
    gradients, rho_k = <G_k, W> / ||W||^2 (None without a process group, K = 1).
`optimizer.diagnostics` is a list with one dict per diagnostic step: {"step": s, "matrices": [records]}, each
record naming its parameter by `param_names[i]` (names of the params in the order given) or by index i.
Under a process group each owner measures its own slice; the records are all-gathered so every rank holds the
full list, and only rank 0 appends them to `diagnostics_path` (JSON lines, one line per diagnostic step).
load_state_dict drops the diagnostics of steps at or past the restored step (rolled-back warm-up steps).
"""
from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

from optimizers.distributed import Bucket, PendingGrads, ShardedMatrixOptimizer, dist_info, grad_or_zeros
from optimizers.muon import Muon

SCALE_MODES = ("raw", "matched")
MATRIX_DIMS = (-2, -1)


def frob_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<a, b> over the last two dims (..., 1, 1), accumulated in at least float32 (bf16 inputs are upcast)."""
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return (a.to(dtype) * b.to(dtype)).sum(dim=MATRIX_DIMS, keepdim=True)


def safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den with den = 0 giving 0 (num is 0 there in every use: a zero W or a zero G)."""
    return num / den.clamp_min(torch.finfo(den.dtype).tiny)


def radial_split(G: torch.Tensor, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rho (..., 1, 1) (>= float32) and G_par = rho W (G's dtype) per matrix of the stacks G, W (..., M, N)."""
    rho = safe_div(frob_dot(G, W), frob_dot(W, W))
    return rho, (rho * W.to(rho.dtype)).to(G.dtype)


def spectral_ord_direction(G: torch.Tensor, W: torch.Tensor, polar, spectral_lr_mul: float, decompose: bool,
                           scale_mode: str = "raw", reproject: bool = False) -> tuple[torch.Tensor, dict]:
    """U = Polar(G_perp or G) [re-projected] + c G_par for stacks (..., M, N); see the module docstring.

    polar: the orthogonalisation, a function of one stack. Returns U and the parts for diagnostics
    (rho, G_par, polar_raw = P before re-projection, polar = P, coef = c with shape (..., 1, 1)).
    """
    rho, G_par = radial_split(G, W)
    G_perp = G - G_par if decompose else G
    polar_raw = polar(G_perp)
    P = polar_raw
    if reproject:
        W_coef = safe_div(frob_dot(P, W), frob_dot(W, W))
        P = P - (W_coef * W.to(W_coef.dtype)).to(P.dtype)
    if scale_mode == "matched":
        coef = spectral_lr_mul * safe_div(frob_dot(P, P).sqrt(), frob_dot(G, G).sqrt())
    else:
        coef = torch.full_like(rho, spectral_lr_mul)
    update = P + (coef * G_par.to(coef.dtype)).to(P.dtype)
    return update, dict(rho=rho, G_par=G_par, polar_raw=polar_raw, polar=P, coef=coef)


def radial_brake(W: torch.Tensor, step: torch.Tensor, decay: float, outward: float, inward: float) -> torch.Tensor:
    """The braked new weights for stacks W, step (..., M, N): decay W + step with the radial part of step scaled by
    `outward` (r > 0) or `inward` (r <= 0) and the norm set to decay ||W|| + k r ||W|| (module docstring).
    Computed in at least float32; returns W's dtype."""
    dtype = torch.promote_types(W.dtype, torch.float32)
    W32, step32 = W.to(dtype), step.to(dtype)
    w_sq = frob_dot(W32, W32)  # (..., 1, 1)
    r = safe_div(frob_dot(step32, W32), w_sq)
    k = torch.where(r > 0, torch.full_like(r, outward), torch.full_like(r, inward))
    moved = decay * W32 + step32 + (k - 1) * r * W32
    w_norm = w_sq.sqrt()
    target = (decay * w_norm + k * r * w_norm).clamp_min(0)
    rescaled = moved * safe_div(target, frob_dot(moved, moved).sqrt())
    return torch.where(w_sq > 0, rescaled, moved).to(W.dtype)


def radial_snr(rho_k: torch.Tensor) -> float | None:
    """mean(rho_k)^2 / (var(rho_k) / K) for K >= 2 replicate values (None when K < 2 or the spread is 0)."""
    K = rho_k.numel()
    if K < 2:
        return None
    var_of_mean = rho_k.double().var(unbiased=True) / K
    return (rho_k.double().mean() ** 2 / var_of_mean).item() if var_of_mean > 0 else None


class SpectralORD(Muon):
    """Muon with orthogonal-radial decomposition; see the module docstring for the maths and diagnostics.

    Args (besides Muon's lr, momentum, nesterov, weight_decay, msign_steps, msign_backend, cautious_weight_decay,
    shape_scale):
        spectral_lr_mul: alpha, weight of the radial term G_par (group key, like lr).
        decompose: orthogonalise G_perp (True) or G (False); None = on iff spectral_lr_mul != 0.
        scale_mode: "raw" (U = P + alpha G_par) or "matched" (G_par rescaled by ||P|| / ||G||).
        reproject: remove P's component along W.
        brake_outward, brake_inward: fractions in [0, 1] of an outward / inward radial step that are kept (the
            radial brake of the module docstring; 1 and 1: no brake).
        diagnostics_every: measure every N steps (0 = off); diagnostics_path: JSON-lines file rank 0 appends to.
        param_names: names of the parameters, in the order of the flattened param groups given here.
    """

    def __init__(self, params, lr: float = 0.025, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, msign_steps: int = 5, msign_backend: str | None = None,
                 spectral_lr_mul: float = 0.0, decompose: bool | None = None, scale_mode: str = "raw",
                 reproject: bool = False, brake_outward: float = 1.0, brake_inward: float = 1.0,
                 diagnostics_every: int = 0, diagnostics_path: str | None = None,
                 param_names: list[str] | None = None, cautious_weight_decay: bool = False,
                 shape_scale: str = "muon"):
        if isinstance(diagnostics_every, bool) or not isinstance(diagnostics_every, int) or diagnostics_every < 0:
            raise ValueError(f"diagnostics_every must be an integer >= 0 (0 = off), got {diagnostics_every!r}")
        if diagnostics_path is not None and diagnostics_every == 0:
            raise ValueError("diagnostics_path is set but diagnostics_every is 0: set diagnostics_every=N to "
                             "measure every N steps, or drop diagnostics_path")
        self.diagnostics_every = diagnostics_every
        self.diagnostics_path = diagnostics_path
        self.diagnostics: list[dict] = []  # one {"step": s, "matrices": [records]} per diagnostic step
        self._written = 0  # entries of self.diagnostics already appended to the file
        self._line_offsets: list[int] = []  # rank 0: byte offset of each written entry in diagnostics_path
        self._pending_records: list[dict] = []
        self._replicate_rho: dict[torch.Tensor, torch.Tensor] = {}  # param -> (K, B) on diagnostic steps
        defaults = self.muon_defaults(lr, momentum, nesterov, weight_decay, msign_steps, msign_backend,
                                      cautious_weight_decay, shape_scale)
        defaults.update(spectral_lr_mul=spectral_lr_mul, decompose=decompose, scale_mode=scale_mode,
                        reproject=reproject, brake_outward=brake_outward, brake_inward=brake_inward)
        ShardedMatrixOptimizer.__init__(self, params, defaults)
        all_params = [p for group in self.param_groups for p in group["params"]]
        if param_names is not None and len(param_names) != len(all_params):
            raise ValueError(f"param_names has {len(param_names)} names for {len(all_params)} parameters; "
                             "give one name per parameter, in the order of the param groups")
        self.param_names = list(param_names) if param_names is not None else None
        self._param_index = {p: i for i, p in enumerate(all_params)}

    def validate_group(self, group: dict) -> None:
        super().validate_group(group)
        alpha = group["spectral_lr_mul"]
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha != alpha:
            raise ValueError(f"spectral_lr_mul must be a finite number, got {alpha!r}")
        if group["decompose"] not in (None, True, False):
            raise ValueError(f"decompose must be true, false or None (= on iff spectral_lr_mul != 0), "
                             f"got {group['decompose']!r}")
        if group["reproject"] not in (True, False):
            raise ValueError(f"reproject must be true or false, got {group['reproject']!r}")
        if group["scale_mode"] not in SCALE_MODES:
            raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {group['scale_mode']!r}")
        for key in ("brake_outward", "brake_inward"):
            value = group[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"{key} must be a number in [0, 1] (the kept fraction of a radial step; 1 = no "
                                 f"brake), got {value!r}")
        if group["cautious_weight_decay"] and (group["brake_outward"] != 1 or group["brake_inward"] != 1):
            raise ValueError("the radial brake uses plain weight decay; set cautious_weight_decay=false or turn the "
                             "brake off (brake_outward=1, brake_inward=1)")

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_param_index"):  # a group added after construction: index continues the order
            for p in self.param_groups[-1]["params"]:
                self._param_index.setdefault(p, len(self._param_index))

    # ---- maths -----------------------------------------------------------------------------------------
    def direction(self, group, owned, W, g_eff):
        alpha = float(group["spectral_lr_mul"])
        decompose = group["decompose"] if group["decompose"] is not None else alpha != 0
        def polar(X):
            return Muon.direction(self, group, owned, W, X)
        update, parts = spectral_ord_direction(g_eff, W, polar, alpha, decompose, group["scale_mode"],
                                               group["reproject"])
        if self._is_diagnostic_step(group["step"]):
            self._record(group["step"], owned, W, g_eff, parts)
        return update.to(W.dtype)

    def apply_update(self, group, W, update, step_lr):
        outward, inward = float(group["brake_outward"]), float(group["brake_inward"])
        if outward == 1.0 and inward == 1.0:
            return super().apply_update(group, W, update, step_lr)
        decay = 1 - group["lr"] * group["weight_decay"] * group["weight_decay_mul"]
        W.copy_(radial_brake(W, update * -step_lr, decay, outward, inward))

    # ---- diagnostics -----------------------------------------------------------------------------------
    def _is_diagnostic_step(self, step: int) -> bool:
        return self.diagnostics_every > 0 and step % self.diagnostics_every == 0

    def reduce_gradients(self, bucket: Bucket) -> PendingGrads:
        if bucket.world_size > 1 and self._is_diagnostic_step(bucket.group["step"]):
            self._gather_replicate_rho(bucket)
        return super().reduce_gradients(bucket)

    def _gather_replicate_rho(self, bucket: Bucket) -> None:
        """Every rank's rho_k = <G_k, W> / ||W||^2 of its raw local gradient, for each matrix of the bucket."""
        W = torch.stack(bucket.params)  # (n, *shape), identical on all ranks
        G = torch.stack([grad_or_zeros(p) for p in bucket.params])
        local = safe_div(frob_dot(G, W), frob_dot(W, W)).flatten()  # (n * B,)
        every = torch.empty(bucket.world_size * local.numel(), dtype=local.dtype, device=local.device)
        dist.all_gather_into_tensor(every, local)
        every = every.view(bucket.world_size, len(bucket.params), -1)  # (K, n, B)
        for i, p in enumerate(bucket.params):
            self._replicate_rho[p] = every[:, i]

    def _record(self, step: int, owned, W, G, parts) -> None:
        """Append one record per owned matrix (per slice for 3-D) to the pending list."""
        def norm(x):
            return frob_dot(x, x).sqrt().flatten(1)  # (n_own, B) with B = 1 for 2-D params

        G_par, P_raw, P = parts["G_par"], parts["polar_raw"], parts["polar"]
        g_norm, w_norm, par_norm, p_norm = norm(G), norm(W), norm(G_par), norm(P)
        values = dict(
            rho=parts["rho"].flatten(1),
            spectral_frac=safe_div(par_norm, g_norm),
            term_ratio=safe_div(parts["coef"].flatten(1).abs() * par_norm, p_norm),
            par_polar_ratio=safe_div(par_norm, p_norm),
            cos_polar_w=safe_div(frob_dot(P_raw, W).flatten(1), norm(P_raw) * w_norm),
            g_norm=g_norm,
            w_norm=w_norm,
        )
        values = {k: v.tolist() for k, v in values.items()}  # one host sync per bucket, diagnostic steps only
        for j, p in enumerate(owned):
            index = self._param_index.get(p, -1)
            replicas = self._replicate_rho.get(p)  # (K, B) or None
            for b in range(len(values["rho"][j])):
                record = dict(step=step, name=self._name(index), index=index)
                if W.ndim == 4:  # a stack of matrices: one record per slice
                    record["slice"] = b
                record.update({k: v[j][b] for k, v in values.items()})
                record["radial_snr"] = radial_snr(replicas[:, b]) if replicas is not None else None
                self._pending_records.append(record)

    def _name(self, index: int) -> str:
        return self.param_names[index] if self.param_names is not None and index >= 0 else str(index)

    def step(self, closure=None):
        steps_before = [group["step"] for group in self.param_groups]
        loss = super().step(closure)
        self._replicate_rho.clear()
        # the same decision on every rank (it depends only on the step counts), so the gather cannot hang
        if any(self._is_diagnostic_step(s) for s in steps_before):
            self._collect_diagnostics()
        return loss

    def _collect_diagnostics(self) -> None:
        """Gather this step's records from all owners into self.diagnostics; rank 0 appends them to the file."""
        rank, world_size = dist_info()
        records, self._pending_records = self._pending_records, []
        if world_size > 1:
            per_rank: list = [None] * world_size
            dist.all_gather_object(per_rank, records)
            records = [r for rank_records in per_rank for r in rank_records]
        by_step: dict[int, list[dict]] = {}
        for record in records:
            by_step.setdefault(record.pop("step"), []).append(record)
        for step in sorted(by_step):
            matrices = sorted(by_step[step], key=lambda r: (r["index"], r.get("slice", 0)))
            self.diagnostics.append(dict(step=step, matrices=matrices))
        if self.diagnostics_path is not None:
            self.write_diagnostics()

    def write_diagnostics(self) -> None:
        """Append the diagnostic steps not yet written to diagnostics_path as JSON lines (rank 0 only).

        Called automatically after each diagnostic step when diagnostics_path is set.
        """
        if self.diagnostics_path is None:
            raise ValueError("no diagnostics file: construct the optimizer with diagnostics_path=...")
        if dist_info()[0] == 0:
            os.makedirs(os.path.dirname(os.path.abspath(self.diagnostics_path)), exist_ok=True)
            with open(self.diagnostics_path, "a") as f:
                for entry in self.diagnostics[self._written:]:
                    self._line_offsets.append(f.tell())  # where this entry's line starts, for rewinding
                    f.write(json.dumps(entry) + "\n")
        self._written = len(self.diagnostics)

    def load_state_dict(self, state_dict: dict) -> None:
        """Also forget diagnostics of steps at or past the restored step count (e.g. untimed warm-up steps
        whose state is rolled back): they are dropped from `diagnostics` and cut from the file if this
        optimizer wrote them."""
        super().load_state_dict(state_dict)
        restored = min(group["step"] for group in self.param_groups)
        kept = 0
        while kept < len(self.diagnostics) and self.diagnostics[kept]["step"] < restored:
            kept += 1
        if kept < self._written and self._line_offsets:
            with open(self.diagnostics_path, "r+") as f:
                f.truncate(self._line_offsets[kept])
            del self._line_offsets[kept:]
        del self.diagnostics[kept:]
        self._written = min(self._written, kept)
