r"""The QEq Coulomb operator of Gaussian charges and its spectral preconditioner (private).

``GaussianCoulombOperator`` applies the matrix ``A`` of :mod:`._qeq` (hardness, Gaussian
self-energies and the Coulomb interaction of per-atom widths) to charge vectors, and
assembles it densely for small systems; ``SpectralPreconditioner`` approximates its
inverse for the conjugate-gradient solver. Equations in the docstring of :mod:`._qeq`.
"""

from __future__ import annotations

import logging
import math
from typing import Optional, Sequence, Tuple

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
