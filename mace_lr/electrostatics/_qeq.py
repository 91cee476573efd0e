r"""Charge equilibration: the Gaussian-charge operator, constrained solvers, implicit derivatives.

Charges minimise the quadratic energy (physics.md, "QEq")

.. math:: E_Q(q) = \sum_i \chi_i q_i + \tfrac12 q^\top A q, \qquad
          A_{ij} = \delta_{ij}\Big(J_i + \frac{k_e}{\sqrt{\pi}\,\sigma_i}\Big)
                 + k_e \sum_{\mathbf n}{}' \frac{\operatorname{erf}(r_{ij,\mathbf n}/\sqrt2\gamma_{ij})}
                   {r_{ij,\mathbf n}},
          \quad \gamma_{ij} = \sqrt{\sigma_i^2 + \sigma_j^2}

subject to fixed charge sums over groups of atoms (one group per structure, or separate
groups for an electrolyte and a constant-potential electrode pair). ``σ_i`` is the
standard deviation of atom i's Gaussian charge density, ``k_e/(√π σ_i)`` its self-energy.

The Coulomb part is the electrostatics engine's potential of Gaussian charges with one
common width ``s0`` (Ewald/P3M for periodic cells, slab correction, exact open sum), plus
a short-ranged pair correction ``k_e [erf(r/√2γ_ij) − erf(r/√2 s0)]/r`` on a neighbour list
(it decays like ``erfc``); the dense solver assembles the same operator column by column,
so both solvers see the same matrix.

Derivatives. The solve itself runs without autograd. Differentiable charges are then
built by Newton steps from the converged solution,
``q ← q − B P (A q + χ)``, where ``B`` is the constrained inverse of the frozen matrix and
``P`` removes group means. Each step has the value of its input (the residual is zero at
convergence), but its derivative is the implicit-function derivative: one step gives exact
first derivatives of ``q*`` (forces, Born charges, parameter gradients), two steps exact
second derivatives (training on forces when the energy is not stationary in ``q``, as
with a fourth-generation readout). Applying ``B`` in the backward pass is another
constrained solve with the same solver, so dense and CG give the same derivatives.

The QEq energy itself is stationary in ``q`` on the constraint surface, so its first
derivatives (forces, stress, energy-loss gradients) are taken at fixed charges and need
no backward solve; a term with zero value and zero first derivatives,
``−½ δqᵀ A δq`` with ``δq = q − q*``, carries the ``−∂q*ᵀ A ∂q*`` part of its second
derivatives (training on forces). Losses on the charges themselves still go through
``B``.
"""

from __future__ import annotations

import logging
import math
from typing import Dict, Optional, Sequence, Tuple

import torch

from ._cached import CachedOperator, assignment_matrices, cached_matvec, sparse_product
from ._engine import (
    _cached_parameters,
    _note_net_charge,
    _reciprocal_space,
    coulomb_potential_single,
    validate_inputs,
)
from ._kernels import COULOMB_CONSTANT, truncated_short_range_kernel

logger = logging.getLogger(__name__)

_SQRT2 = math.sqrt(2.0)
_SQRTPI = math.sqrt(math.pi)


class ChargeEquilibrationError(RuntimeError):
    """A charge solve did not reach its tolerance (the charges would be wrong)."""


def _erfcinv(y: float) -> float:
    from scipy.special import erfcinv

    return float(erfcinv(y))


class GaussianCoulombOperator:
    """The QEq matrix ``A`` of one structure as a matrix-vector product.

    Args:
        positions: [N, 3] Å (may require grad).
        cell: [3, 3] Å.
        pbc: three booleans (bulk, open or ``[T, T, F]`` slab).
        widths: [N] Gaussian standard deviations σ_i, Å (may require grad).
        hardness: [N] J_i, eV/e² (may require grad).
        accuracy: relative accuracy of the periodic sums and of the pair-correction cutoff.
        method: engine method (``"auto"``, ``"ewald"``, ``"p3m"``).
        base_smearing: common width ``s0`` of the engine sum, Å (0: point charges).
    """

    def __init__(
        self,
        positions: torch.Tensor,
        cell: torch.Tensor,
        pbc: Sequence[bool],
        widths: torch.Tensor,
        hardness: torch.Tensor,
        accuracy: float = 1e-6,
        method: str = "auto",
        base_smearing: float = 0.0,
        _pairs: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
        _frozen: bool = False,
        _merged_values: Optional[torch.Tensor] = None,
    ) -> None:
        n = positions.shape[0]
        if widths.shape != (n,) or hardness.shape != (n,):
            raise ValueError(
                f"`widths` and `hardness` must have shape [{n}], got {tuple(widths.shape)} "
                f"and {tuple(hardness.shape)}"
            )
        if bool((widths.detach() <= 0).any()):
            raise ValueError("Gaussian widths must be > 0 Å")
        self.positions = positions
        self.cell = cell
        self.pbc = tuple(bool(p) for p in pbc)
        self.widths = widths
        self.hardness = hardness
        self.accuracy = float(accuracy)
        self.method = method
        self.base_smearing = float(base_smearing)
        self.diagonal = hardness + COULOMB_CONSTANT / (_SQRTPI * widths)
        # pair correction erf(r/√2γ) − erf(r/√2 s0), decaying with the widest kernel
        widest = max(self.base_smearing, _SQRT2 * float(widths.detach().max())) if n else 0.0
        self.pair_cutoff = _SQRT2 * widest * _erfcinv(self.accuracy)
        self._params = None
        self._merged: Optional[torch.Tensor] = None
        self._correction: Optional[torch.Tensor] = None
        self._cached: Optional[CachedOperator] = None
        self._frozen = bool(_frozen)
        if self.pbc == (True, True, True) and n:
            # the engine's checks (shapes, a cell with volume) before choosing parameters
            validate_inputs(positions, positions.detach().new_zeros(n), cell, self.pbc)
            # one pair list holds both the Ewald real-space kernel and the width
            # correction: one neighbour list per geometry, shared with the frozen copy
            self._params = _cached_parameters(cell, n, self.base_smearing, self.accuracy, method)
            if _pairs is None:
                _pairs = _pair_list(positions, cell, max(self._params.rcut, self.pair_cutoff), self.pbc)
            self.pairs = _pairs
            self._merged = _merged_values if _merged_values is not None else self._merged_real_space()
            if _frozen and self._params.method == "p3m":
                i, j, _ = self.pairs
                self._cached = CachedOperator(
                    positions, cell, self._params, self.base_smearing, i, j, self._merged, self.diagonal
                )
        else:
            if _pairs is None:
                _pairs = _pair_list(positions, cell, self.pair_cutoff, self.pbc)
            self.pairs = _pairs
            self._correction = self._pair_values()

    def _merged_real_space(self) -> torch.Tensor:
        """Real-space matrix elements on the merged list (differentiable), eV/e².

        The engine's Ewald short-range kernel within its cutoff plus the width correction
        ``erf(r/√2γ) − erf(r/√2 s0)`` within the pair cutoff. With P3M the k-space part
        of frozen copies is precomputed too (:class:`~._cached.CachedOperator`); otherwise
        it is the engine's.
        """
        params = self._params
        s0 = self.base_smearing
        i, j, shifts = self.pairs
        vec = self.positions[j] - self.positions[i] + shifts.to(self.positions.dtype) @ self.cell
        dist = torch.linalg.norm(vec, dim=-1)
        values = torch.zeros_like(dist)
        if params.rcut > 0:
            values = truncated_short_range_kernel(dist, s0, params.split, params.rcut)
        gamma = torch.sqrt(self.widths[i] ** 2 + self.widths[j] ** 2)
        base = torch.erf(dist / (_SQRT2 * s0)) if s0 > 0 else torch.ones_like(dist)
        correction = (torch.erf(dist / (_SQRT2 * gamma)) - base) / dist
        values = values + torch.where(dist < self.pair_cutoff, correction, torch.zeros_like(dist))
        return COULOMB_CONSTANT * values

    def _pair_values(self) -> torch.Tensor:
        i, j, shifts = self.pairs
        if i.numel() == 0:
            return self.positions.new_zeros(0)
        # distances in torch, so the correction is differentiable in positions and cell
        vec = self.positions[j] - self.positions[i] + shifts.to(self.positions.dtype) @ self.cell
        dist = torch.linalg.norm(vec, dim=-1)
        gamma = torch.sqrt(self.widths[i] ** 2 + self.widths[j] ** 2)
        values = torch.erf(dist / (_SQRT2 * gamma))
        if self.base_smearing > 0.0:
            values = values - torch.erf(dist / (_SQRT2 * self.base_smearing))
        else:
            values = values - 1.0
        return COULOMB_CONSTANT * values / dist

    def matvec(self, q: torch.Tensor) -> torch.Tensor:
        """``A q`` for charges [N] or [N, C] (differentiable in every input)."""
        squeeze = q.ndim == 1
        q2 = q[:, None] if squeeze else q
        if self._cached is not None:
            phi = cached_matvec(self._cached, q2)
            return phi[:, 0] if squeeze else phi
        if self._merged is not None:
            if not self._frozen:
                _note_net_charge(q2.detach())
            i, j, _ = self.pairs
            phi = _reciprocal_space(self.positions, q2, self.cell, self._params, self.base_smearing)
            phi = COULOMB_CONSTANT * phi
            v2 = self._merged[:, None]
            phi = phi.index_add(0, i, v2 * q2[j]).index_add(0, j, v2 * q2[i]) + self.diagonal[:, None] * q2
            return phi[:, 0] if squeeze else phi
        phi = coulomb_potential_single(
            self.positions,
            q2,
            self.cell,
            self.pbc,
            self.base_smearing if self.base_smearing > 0.0 else None,
            self.accuracy,
            self.method,
        )
        i, j, _ = self.pairs
        if i.numel():
            v = self._correction[:, None]
            phi = phi.index_add(0, i, v * q2[j]).index_add(0, j, v * q2[i])
        phi = phi + self.diagonal[:, None] * q2
        return phi[:, 0] if squeeze else phi

    def apply(self, q: torch.Tensor) -> torch.Tensor:
        """``A q`` for [N, C] charges without autograd."""
        with torch.no_grad():
            return self.matvec(q)

    def constant_matvec(self, q: torch.Tensor) -> torch.Tensor:
        """``A q`` [N] or [N, C] with ``A`` held constant (for detached operators).

        Differentiable in ``q`` only, through the symmetry of ``A`` (its backward is another
        product, never a graph through the electrostatics); a zero ``q`` costs nothing.
        """
        squeeze = q.ndim == 1
        out = cached_matvec(self, q[:, None] if squeeze else q)
        return out[:, 0] if squeeze else out

    def detached(self, dtype: Optional[torch.dtype] = None) -> "GaussianCoulombOperator":
        """The same operator on detached inputs (for solves without autograd)."""
        dtype = dtype or self.positions.dtype
        return GaussianCoulombOperator(
            self.positions.detach().to(dtype),
            self.cell.detach().to(dtype),
            self.pbc,
            self.widths.detach().to(dtype),
            self.hardness.detach().to(dtype),
            self.accuracy,
            self.method,
            self.base_smearing,
            _pairs=self.pairs,
            _frozen=True,
            # the merged real-space values when no precision is gained by recomputing them
            _merged_values=(
                None if self._merged is None or dtype != self._merged.dtype else self._merged.detach()
            ),
        )

    def dense(self) -> torch.Tensor:
        """The full matrix [N, N] (columns are matrix-vector products with unit charges)."""
        n = self.positions.shape[0]
        eye = torch.eye(n, dtype=self.positions.dtype, device=self.positions.device)
        with torch.no_grad():
            a = self.detached().matvec(eye)
        return 0.5 * (a + a.T)


def _pair_list(
    positions: torch.Tensor, cell: torch.Tensor, cutoff: float, pbc: Tuple[bool, ...]
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Half neighbour list within ``cutoff``: indices i, j and integer cell shifts [M, 3]."""
    import numpy as np
    from vesin import NeighborList

    device = positions.device
    if positions.shape[0] < 2 and not any(pbc):
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return empty, empty, torch.zeros((0, 3), dtype=torch.int64, device=device)
    i, j, shifts = NeighborList(cutoff=cutoff, full_list=False).compute(
        points=positions.detach().cpu().double().numpy(),
        box=cell.detach().cpu().double().numpy(),
        periodic=list(pbc),
        quantities="ijS",
    )
    return (
        torch.as_tensor(i.astype(np.int64), device=device),
        torch.as_tensor(j.astype(np.int64), device=device),
        torch.as_tensor(np.asarray(shifts, dtype=np.int64).reshape(-1, 3), device=device),
    )


def _group_sums(x: torch.Tensor, group: torch.Tensor, n_groups: int) -> torch.Tensor:
    out = torch.zeros((n_groups,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    return out.index_add(0, group, x)


class SpectralPreconditioner:
    r"""Jacobi plus a k-space correction for the long-wavelength charge modes (periodic cells).

    A smooth charge mode :math:`q = e^{i\mathbf k\cdot\mathbf r}` is the vector
    :math:`y = D^{1/2} q` of the Jacobi-scaled QEq matrix :math:`D^{-1/2} A D^{-1/2}`, which
    acts on it like :math:`1 + x(k)`, :math:`x(k) = \rho\,\hat C(k)\,\langle 1/d\rangle`
    with :math:`\hat C(k) = 4\pi k_e e^{-s^2k^2/2}/k^2`: the Coulomb part grows as 1/k², so
    plain Jacobi-preconditioned CG needs iterations that grow with the box length. With
    cloud-in-cell spreading ``W`` onto a mesh of about one point per atom, the weighted
    spreading :math:`S = W D^{-1/2}/\langle 1/d\rangle^{1/2}` (so that
    :math:`(M_\mathrm{mesh}/N) S S^\top \approx 1` on smooth mesh functions) and the mesh
    filter :math:`H(k) = (1 + x(k))^{-1/2} - 1 \in (-1, 0]`, this operator applies

    .. math:: M^{-1} = D^{-1/2}\big(K^2 + \varepsilon\big) D^{-1/2}, \qquad
              K = 1 + (M_\mathrm{mesh}/N)\, S^\top H S,
              \qquad \varepsilon = 0.1 \min_k\, (1 + x(k))^{-1},

    so smooth modes see :math:`K^2 \approx (1 + x)^{-1}`, the inverse of their Coulomb
    stiffness, at every wavelength, and CG iterations do not grow with N. ``K`` is
    symmetric, so :math:`K^2` is positive semidefinite for any geometry and any spread of
    hardness, and the floor ε makes :math:`M^{-1}` positive definite by construction (its
    smallest eigenvalue is at least :math:`\varepsilon / \max_i D_{ii}`) without damping
    the correction; ε is a tenth of the smallest factor the correction applies, so it
    perturbs no mode by more than 10 %. It only affects convergence, never the solution.
    """

    def __init__(self, operator: "GaussianCoulombOperator") -> None:
        pos, cell = operator.positions, operator.cell
        n = pos.shape[0]
        dtype, device = pos.dtype, pos.device
        d = operator.diagonal
        self.inv_sqrt_d = 1.0 / torch.sqrt(d)
        volume = float(torch.abs(torch.linalg.det(cell)))
        spacing = (volume / n) ** (1.0 / 3.0)
        lengths = torch.linalg.norm(cell, dim=1)
        shape = [max(4, int(round(float(length) / spacing))) for length in lengths]
        self.shape = shape
        sizes = torch.tensor(shape, dtype=dtype, device=device)
        frac = torch.remainder(pos @ torch.linalg.inv(cell), 1.0) * sizes
        base = torch.floor(frac)
        t = frac - base
        base = base.to(torch.int64)
        idx, wts = [], []
        for cx in (0, 1):
            for cy in (0, 1):
                for cz in (0, 1):
                    ix = (base[:, 0] + cx) % shape[0]
                    iy = (base[:, 1] + cy) % shape[1]
                    iz = (base[:, 2] + cz) % shape[2]
                    idx.append((ix * shape[1] + iy) * shape[2] + iz)
                    w = (t[:, 0] if cx else 1 - t[:, 0]) * (t[:, 1] if cy else 1 - t[:, 1])
                    wts.append(w * (t[:, 2] if cz else 1 - t[:, 2]))
        index = torch.stack(idx, 1)  # [N, 8]
        weights = torch.stack(wts, 1)
        self.mesh_points = shape[0] * shape[1] * shape[2]
        # filter on the rfft grid
        freqs = [torch.fft.fftfreq(m, d=1.0 / m, dtype=dtype, device=device) for m in shape[:2]]
        freqs.append(torch.fft.rfftfreq(shape[2], d=1.0 / shape[2], dtype=dtype, device=device))
        grid = torch.stack(torch.meshgrid(*freqs, indexing="ij"), -1)
        kvec = 2.0 * math.pi * grid @ torch.linalg.inv(cell).T
        k2 = (kvec**2).sum(-1)
        width2 = 2.0 * float((operator.widths**2).mean())
        inv_d = float((1.0 / d).mean())
        # spreading weights of the Jacobi-scaled residual: a smooth *charge* mode q is
        # y = D^½ q in the scaled space, so W acts on D^-½ y; normalised so that
        # (M_mesh/N) S Sᵀ ≈ 1 on smooth mesh functions
        amplitude = self.inv_sqrt_d / math.sqrt(inv_d)
        self.spread, self.gather = assignment_matrices(index, weights * amplitude[:, None], self.mesh_points)
        rho = n / volume
        safe = torch.where(k2 > 0, k2, torch.ones_like(k2))
        coulomb = 4.0 * math.pi * COULOMB_CONSTANT * torch.exp(-0.5 * width2 * safe) / safe
        stiffness = torch.where(k2 > 0, 1.0 + rho * coulomb * inv_d, torch.ones_like(k2))
        # the square root of the target factor 1/(1 + x): K is applied twice
        self.filter = torch.rsqrt(stiffness) - 1.0
        self.floor = 0.1 / float(stiffness.max()) if stiffness.numel() else 1.0

    def _apply_k(self, y: torch.Tensor) -> torch.Tensor:
        """``K y = y + (M_mesh/N) Sᵀ H S y`` with ``S = W diag(a)`` (symmetric)."""
        n, c = y.shape
        grid = sparse_product(self.spread, y).T.reshape(c, *self.shape)
        filtered = torch.fft.rfftn(grid, dim=(1, 2, 3)) * self.filter
        smooth = torch.fft.irfftn(filtered, s=self.shape, dim=(1, 2, 3))
        return y + (self.mesh_points / n) * sparse_product(self.gather, smooth.reshape(c, -1).T)

    def __call__(self, r: torch.Tensor) -> torch.Tensor:
        y = r * self.inv_sqrt_d[:, None]
        y = self._apply_k(self._apply_k(y)) + self.floor * y
        return y * self.inv_sqrt_d[:, None]


class ConstrainedSolver:
    """Minimises ``½ xᵀAx − bᵀx`` subject to fixed sums of ``x`` over groups of atoms.

    Args:
        operator: a detached :class:`GaussianCoulombOperator` (no autograd inside solves).
        group: [N] int64 group index of every atom (0..G−1, every group non-empty).
        method: ``"cg"`` (matrix-free preconditioned conjugate gradient) or ``"dense"``.
        tol: relative residual ``‖P r‖ / ‖P r₀‖`` at which CG stops.
        max_iter: CG iteration limit; exceeding it raises :class:`ChargeEquilibrationError`.
    """

    def __init__(
        self,
        operator: GaussianCoulombOperator,
        group: torch.Tensor,
        method: str = "cg",
        tol: float = 1e-6,
        max_iter: int = 500,
        preconditioner: str = "auto",
    ) -> None:
        if method not in ("cg", "dense"):
            raise ValueError(f"unknown charge solver {method!r}; use 'cg' or 'dense'")
        if preconditioner not in ("auto", "jacobi", "spectral"):
            raise ValueError(f"unknown preconditioner {preconditioner!r}; use 'auto', 'jacobi' or 'spectral'")
        periodic = operator.pbc == (True, True, True)
        if preconditioner == "spectral" and not periodic:
            raise ValueError("the spectral preconditioner needs a fully periodic cell")
        if preconditioner == "auto":
            preconditioner = "spectral" if periodic and group.shape[0] >= 64 else "jacobi"
        self.preconditioner = preconditioner
        self.operator = operator
        self.group = group
        self.n_groups = int(group.max()) + 1 if group.numel() else 0
        self.method = method
        self.tol = float(tol)
        self.max_iter = int(max_iter)
        self.iterations = 0
        self.residual = 0.0
        self._lu: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        if method == "dense":
            n = group.shape[0]
            a = operator.dense()
            c = torch.zeros((n, self.n_groups), dtype=a.dtype, device=a.device)
            c[torch.arange(n, device=a.device), group] = 1.0
            kkt = torch.cat(
                [torch.cat([a, c], 1), torch.cat([c.T, torch.zeros_like(c.T[:, : self.n_groups])], 1)], 0
            )
            self._lu = torch.linalg.lu_factor(kkt)

    def solve(
        self, rhs: torch.Tensor, targets: Optional[torch.Tensor] = None, x0: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Solution [N] or [N, C] for right-hand sides ``rhs`` and group sums ``targets`` [G(, C)]."""
        squeeze = rhs.ndim == 1
        b = rhs[:, None] if squeeze else rhs
        dtype = self.operator.positions.dtype
        b = b.to(dtype)
        if targets is None:
            t = torch.zeros((self.n_groups, b.shape[1]), dtype=dtype, device=b.device)
        else:
            t = targets.to(dtype).reshape(self.n_groups, -1).expand(self.n_groups, b.shape[1])
        with torch.no_grad():
            if self.method == "dense":
                assert self._lu is not None
                sol = torch.linalg.lu_solve(*self._lu, torch.cat([b, t], 0))
                x = sol[: b.shape[0]]
                self.iterations, self.residual = 0, 0.0
            else:
                x = self._pcg(b, t, None if x0 is None else (x0[:, None] if x0.ndim == 1 else x0).to(dtype))
        return x[:, 0] if squeeze else x

    def _project(self, r: torch.Tensor) -> torch.Tensor:
        counts = _group_sums(torch.ones_like(r[:, :1]), self.group, self.n_groups)
        return r - (_group_sums(r, self.group, self.n_groups) / counts)[self.group]

    def _pcg(self, b: torch.Tensor, t: torch.Tensor, x0: Optional[torch.Tensor]) -> torch.Tensor:
        op, group, g = self.operator, self.group, self.n_groups
        m_inv = (1.0 / op.diagonal)[:, None].expand_as(b)
        w_sum = _group_sums(m_inv, group, g)
        if self.preconditioner == "spectral":
            apply_m = SpectralPreconditioner(op)
        else:

            def apply_m(r: torch.Tensor) -> torch.Tensor:
                return r / op.diagonal[:, None]

        # M⁻¹ r projected onto zero group sums in the M-metric:
        # z = M⁻¹r − U (CᵀU)⁻¹ Cᵀ M⁻¹ r with C the group indicator and U = M⁻¹C
        indicator = torch.zeros((b.shape[0], g), dtype=b.dtype, device=b.device)
        indicator[torch.arange(b.shape[0], device=b.device), group] = 1.0
        u = apply_m(indicator)
        ctu_inv = torch.linalg.inv(indicator.T @ u)

        def precondition(r: torch.Tensor) -> torch.Tensor:
            z = apply_m(r)
            return z - u @ (ctu_inv @ (indicator.T @ z))

        # feasible start: targets spread in proportion to 1/A_ii, or the shifted warm start
        x = m_inv * (t / w_sum)[group]
        if x0 is not None:
            x = x + x0 - m_inv * (_group_sums(x0, group, g) / w_sum)[group]
        # the residual lives in the quotient by group-constant vectors (those shift the
        # Lagrange multipliers only); keeping it projected stops a large constant part
        # from swamping the inner products with rounding errors
        x_start = m_inv * (t / w_sum)[group]
        a_start = op.matvec(x_start)
        r = self._project(b - (a_start if x0 is None else op.matvec(x)))
        norm0 = torch.linalg.norm(self._project(b - a_start), dim=0)
        # a right-hand side that is constant per group moves no charge: its projected norm
        # is rounding noise, so residuals are measured against at least 1e-12 of the data
        floor = 1e-12 * (torch.linalg.norm(b, dim=0) + torch.linalg.norm(a_start, dim=0))
        scale = torch.maximum(norm0, floor)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        z = precondition(r)
        p = z.clone()
        rz = (r * z).sum(0)
        res = torch.linalg.norm(r, dim=0) / scale
        res = torch.where(norm0 <= floor, torch.zeros_like(res), res)
        it = 0
        best, since_best = float(res.max()), 0
        while bool((res > self.tol).any()):
            if it >= self.max_iter or since_best >= 25:
                stalled = f"(stalled after {it} iterations)"
                why = f"in {self.max_iter} iterations" if it >= self.max_iter else stalled
                raise ChargeEquilibrationError(
                    f"charge equilibration (CG) did not converge {why}: relative residual "
                    f"{float(res.max()):.3g} > tol {self.tol:g}, best {best:.3g} "
                    f"(N={b.shape[0]}, pbc={list(op.pbc)}). Increase `max_iter`, or loosen `tol` "
                    "(the attainable residual is limited by the electrostatics `accuracy`), or "
                    "check for non-physical hardness/widths"
                )
            ap = op.matvec(p)
            pap = (p * ap).sum(0)
            active = res > self.tol
            alpha = torch.where(active & (pap > 0), rz / torch.where(pap > 0, pap, torch.ones_like(pap)), 0.0)
            if bool((active & (pap <= 0)).any()):
                raise ChargeEquilibrationError(
                    "charge equilibration matrix is not positive definite on the constrained "
                    f"subspace (pᵀAp = {float(pap.min()):.3g}); hardness or widths are non-physical"
                )
            x = x + alpha * p
            r = self._project(r - alpha * ap)
            z = precondition(r)
            rz_new = (r * z).sum(0)
            if bool(((rz_new < 0) & (res > self.tol)).any()):
                raise ChargeEquilibrationError(
                    f"the {self.preconditioner} preconditioner is not positive definite for this "
                    "structure; use preconditioner='jacobi'"
                )
            beta = torch.where(rz > 0, rz_new / torch.where(rz > 0, rz, torch.ones_like(rz)), 0.0)
            p = z + beta * p
            # keep the search direction on the constraint surface: rounding errors along
            # the group-constant directions would otherwise grow (A need not be positive
            # definite there, e.g. the jellium mode of a periodic cell)
            p = p - m_inv * (_group_sums(p, group, g) / w_sum)[group]
            rz = rz_new
            res = torch.linalg.norm(r, dim=0) / scale
            res = torch.where(norm0 <= floor, torch.zeros_like(res), res)
            it += 1
            if float(res.max()) < 0.5 * best:
                best, since_best = float(res.max()), 0
            else:
                since_best += 1
        self.iterations = it
        self.residual = float(res.max()) if res.numel() else 0.0
        logger.debug("QEq CG converged in %d iterations (residual %.2e)", it, self.residual)
        return x


class _Solve(torch.autograd.Function):
    """``y = B x`` (constrained inverse, zero group sums); linear, symmetric, differentiable."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, solver: ConstrainedSolver) -> torch.Tensor:  # type: ignore[override]
        ctx.solver = solver
        if not bool(x.detach().any()):
            return torch.zeros_like(x)  # B 0 = 0 (e.g. the gradient of a stationary energy)
        return solver.solve(x).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return _Solve.apply(grad, ctx.solver), None


class _NewtonCorrection(torch.autograd.Function):
    """Value zero (the residual vanishes at the solution); derivative ``B P``."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, solver: ConstrainedSolver) -> torch.Tensor:  # type: ignore[override]
        ctx.solver = solver
        return torch.zeros_like(g)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return _Solve.apply(grad, ctx.solver), None


def solve_qeq(
    positions: torch.Tensor,
    electronegativity: torch.Tensor,
    hardness: torch.Tensor,
    widths: torch.Tensor,
    cell: Optional[torch.Tensor] = None,
    pbc=(False, False, False),
    total_charge: float | torch.Tensor = 0.0,
    *,
    groups: Optional[torch.Tensor] = None,
    group_charges: Optional[torch.Tensor] = None,
    solver: str = "auto",
    tol: float = 1e-8,
    max_iter: int = 500,
    accuracy: float = 1e-6,
    method: str = "auto",
    base_smearing: float = 0.0,
    newton_steps: int = 1,
    initial_guess: Optional[torch.Tensor] = None,
    preconditioner: str = "auto",
) -> Dict[str, torch.Tensor]:
    r"""Equilibrated charges and QEq energy of one structure, differentiable in every input.

    Minimises :math:`\sum_i \chi_i q_i + \tfrac12 q^\top A q` (see the module docs) subject to
    :math:`\sum_i q_i = Q`, or to one fixed sum per group of atoms.

    Args:
        positions: [N, 3] Å.
        electronegativity: [N] χ_i, V (eV/e); put external potentials here (a field
            ``E`` enters as ``χ_i − E·r_i``, an electrode potential ``V`` as ``χ_i − V``).
        hardness: [N] J_i > 0, eV/e².
        widths: [N] Gaussian standard deviations σ_i > 0, Å.
        cell: [3, 3] Å (``None`` for open boundaries).
        pbc: three booleans.
        total_charge: Q, e (used when ``groups`` is ``None``).
        groups: [N] int64 group of every atom (0..G−1), each with a fixed charge sum.
        group_charges: [G] the charge sum of each group, e.
        solver: ``"dense"``, ``"cg"`` or ``"auto"`` (dense up to 256 atoms).
        tol: relative residual of the CG solve (the dense solve is exact).
        max_iter: CG iteration limit (a :class:`ChargeEquilibrationError` beyond it).
        accuracy: relative accuracy of the electrostatics.
        method: electrostatics method for periodic cells.
        base_smearing: common Gaussian width of the engine sum, Å (0: point charges).
        newton_steps: Newton steps after the solve that carry derivatives (1: exact first
            derivatives; 2: exact second derivatives of the charges).
        initial_guess: [N] charges to start CG from (e.g. the previous MD step's).
        preconditioner: CG preconditioner: ``"jacobi"``, ``"spectral"`` (Jacobi plus a
            k-space correction of long-wavelength modes, periodic cells) or ``"auto"``
            (spectral for periodic cells of 64 atoms or more).

    Returns:
        ``charges`` [N] e, ``energy`` [] eV, ``chemical_potential`` [G] V (the Lagrange
        multiplier of each group), ``iterations`` and ``residual`` (CG diagnostics).
    """
    n = positions.shape[0]
    dtype, device = positions.dtype, positions.device
    if electronegativity.shape != (n,):
        raise ValueError(f"`electronegativity` must have shape [{n}], got {tuple(electronegativity.shape)}")
    if bool((hardness.detach() <= 0).any()):
        raise ValueError("hardness J must be > 0 eV/e² for every atom")
    if cell is None:
        cell = torch.zeros(3, 3, dtype=dtype, device=device)
    if groups is None:
        groups = torch.zeros(n, dtype=torch.int64, device=device)
        group_charges = torch.as_tensor(total_charge, dtype=dtype, device=device).reshape(1)
    else:
        groups = groups.to(torch.int64)
        if group_charges is None:
            raise ValueError("`group_charges` is required with `groups`")
        n_groups = int(groups.max()) + 1 if n else 0
        present = torch.bincount(groups, minlength=n_groups)
        if bool((present == 0).any()):
            raise ValueError("every group index 0..G−1 must contain at least one atom")
        group_charges = torch.as_tensor(group_charges, dtype=dtype, device=device).reshape(n_groups)
    if solver == "auto":
        solver = "dense" if n <= 256 else "cg"
    op = GaussianCoulombOperator(positions, cell, pbc, widths, hardness, accuracy, method, base_smearing)
    frozen = ConstrainedSolver(op.detached(torch.float64), groups, solver, tol, max_iter, preconditioner)
    q0 = frozen.solve(
        -electronegativity.detach().to(torch.float64),
        group_charges.detach().to(torch.float64),
        x0=None if initial_guess is None else initial_guess.detach().to(torch.float64),
    ).to(dtype)
    # A q0 with the derivatives of A in positions, cell, hardness and widths
    a_q0 = op.matvec(q0)
    q = q0
    for step in range(int(newton_steps)):
        residual = (a_q0 if step == 0 else op.matvec(q)) + electronegativity
        q = q - _NewtonCorrection.apply(residual, frozen)
    # The energy is stationary in q on the constraint surface, so its first derivatives
    # are those at fixed charges: E(q0) with q0 a constant (no backward solve). The term
    # −½ δqᵀA δq, δq = q − q0 (zero in value, carrying ∂q*), has zero value and first
    # derivatives and restores the second derivatives: d²E = ∂²E(q0) − ∂q*ᵀ A ∂q*, the
    # exact Hessian of E(q*(θ), θ) (∂²E/∂θ∂q = −A ∂q*/∂θ at the solution).
    energy = (electronegativity * q0).sum() + 0.5 * (q0 * a_q0).sum()
    if newton_steps > 0 and q.requires_grad:
        dq = q - q0
        energy = energy - 0.5 * (dq * frozen.operator.constant_matvec(dq).to(dtype)).sum()
    grad = (a_q0 + electronegativity).detach()
    counts = torch.bincount(groups, minlength=frozen.n_groups).to(dtype)
    mu = _group_sums(grad[:, None], groups, frozen.n_groups)[:, 0] / counts
    return {
        "charges": q,
        "energy": energy,
        "chemical_potential": mu,
        "iterations": torch.tensor(frozen.iterations),
        "residual": torch.tensor(frozen.residual),
    }
