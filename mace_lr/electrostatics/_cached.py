r"""The QEq matrix at fixed geometry, with all that does not depend on the charges precomputed (private).

A conjugate-gradient solve applies the same matrix tens of times. The engine's P3M
potential recomputes the B-spline charge-assignment weights, the mesh indices and the
influence function on every call, and the real-space part needs a neighbour list. Here
all of that is built once per geometry, so a product is

.. math:: A q = \big(D - k_e\,\tfrac{\sqrt{2/\pi}}{s}\big) q
          + R\,q + W^\top \mathcal F^{-1}\big[G\,\mathcal F[W q]\big]
          + b\,\mathbf 1 \textstyle\sum_i q_i,

with ``W`` the sparse P3M assignment matrix (B-splines of order p on the engine's
mesh), ``G`` the engine's influence function (the split-width Coulomb kernel
``4π e^{-s²k²/2}/k²`` divided by the squared assignment transfer function, times
``k_e/V``), ``R`` the sparse symmetric real-space matrix (the Ewald short-range kernel
and the Gaussian-width pair correction, merged on one pair list) and ``b`` the uniform
background term of a net charge. The self term ``k_e √(2/π)/s`` of the split Gaussian
and the diagonal ``D`` are folded into one vector. It is the same matrix as
:meth:`GaussianCoulombOperator.matvec` through the engine, to rounding (tested), and
symmetric, so its autograd function returns ``A g`` for an incoming gradient ``g``.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from typing import Optional

import torch

from .._geometry import cell_volume
from ._kernels import COULOMB_CONSTANT, EwaldParameters

_INFLUENCE_CACHE: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()


def _csr(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape, rows_only: bool = False):
    """CSR matrix from COO triplets without duplicates (one sort, no coalescing).

    ``rows_only``: the triplets are already in increasing column order, so a stable sort
    on the rows alone leaves the columns of every row sorted.
    """
    if rows_only:
        key = rows.to(torch.int32) if shape[0] < 2**31 else rows
        order = torch.sort(key, stable=True).indices
    else:
        key = rows * shape[1] + cols
        if shape[0] * shape[1] < 2**31:
            key = key.to(torch.int32)
        order = torch.sort(key).indices
    counts = torch.bincount(rows, minlength=shape[0])
    crow = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    return _csr_tensor(crow, cols[order], values[order], shape)


def _csr_tensor(crow: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape) -> torch.Tensor:
    if values.numel() < 2**31 and max(shape) < 2**31:
        # 32-bit indices: the CPU sparse kernels convert int64 ones on every product
        crow, cols = crow.to(torch.int32), cols.to(torch.int32)
    with warnings.catch_warnings():
        # "Sparse CSR tensor support is in beta state": products with dense matrices are
        # all this module uses, and they are tested here
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support", category=UserWarning)
        return torch.sparse_csr_tensor(crow, cols, values, shape, check_invariants=False)


def _influence(cell: torch.Tensor, ns: torch.Tensor, params: EwaldParameters) -> torch.Tensor:
    """The engine's P3M influence function on the rfft grid (cached per cell and mesh).

    Point-charge P3M: the split-width Coulomb kernel ``4π e^{-s²k²/2}/k²`` divided by
    ``U²(k)``, the squared Fourier transform of the order-p assignment function.
    """
    from torchpme.lib import generate_kvectors_for_mesh

    key = (cell.cpu().numpy().tobytes(), tuple(ns.tolist()), params.split, params.interpolation_nodes)
    key = key + (cell.dtype, str(cell.device))
    cached = _INFLUENCE_CACHE.get(key)
    if cached is not None:
        _INFLUENCE_CACHE.move_to_end(key)
        return cached
    dtype = cell.dtype
    split = params.split
    kvec = generate_kvectors_for_mesh(cell, ns)
    k2 = (kvec**2).sum(-1)
    spacing = (torch.linalg.norm(cell, dim=1) / ns.to(dtype)).reshape(1, 1, 1, 3)
    u2 = torch.prod(torch.sinc(kvec * spacing / (2.0 * math.pi)), dim=-1) ** (2 * params.interpolation_nodes)
    safe_k2 = torch.where(k2 == 0, torch.ones_like(k2), k2)
    kernel = torch.where(
        k2 == 0, torch.zeros_like(k2), 4.0 * math.pi * torch.exp(-0.5 * split**2 * safe_k2) / safe_k2
    )
    safe_u2 = torch.where(u2 == 0, torch.ones_like(u2), u2)
    influence = torch.where(u2 == 0, torch.zeros_like(u2), kernel / safe_u2)
    _INFLUENCE_CACHE[key] = influence
    if len(_INFLUENCE_CACHE) > 4:
        _INFLUENCE_CACHE.popitem(last=False)
    return influence


def sparse_product(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``matrix @ x`` for a CSR matrix and dense [K, C] ``x`` (one column: the faster
    matrix-vector kernel, which copies neither operand nor result).
    """
    if x.shape[1] == 1:
        return (matrix @ x[:, 0])[:, None]
    return matrix @ x


def assignment_matrices(index: torch.Tensor, weights: torch.Tensor, mesh_points: int):
    """Spreading ``W`` [mesh, N] and interpolation ``Wᵀ`` [N, mesh] CSR matrices.

    Args:
        index: [N, P] mesh point of each of an atom's P assignment nodes (distinct per atom).
        weights: [N, P] their weights.
        mesh_points: number of mesh points.
    """
    n, nodes = index.shape
    device = index.device
    # Wᵀ: P entries per atom, sorted within each row
    cols, perm = torch.sort(index, dim=1)
    vals = torch.gather(weights, 1, perm)
    crow = torch.arange(n + 1, device=device) * nodes
    gather = _csr_tensor(crow, cols.reshape(-1), vals.reshape(-1), (n, mesh_points))
    # W: the same entries, atom-major, sorted by mesh point
    atoms = torch.arange(n, device=device).repeat_interleave(nodes)
    spread = _csr(cols.reshape(-1), atoms, vals.reshape(-1), (mesh_points, n), rows_only=True)
    return spread, gather


class CachedOperator:
    """``A q`` for one fixed periodic geometry (no autograd in the inputs).

    Args:
        positions: [N, 3] Å (detached).
        cell: [3, 3] Å (detached).
        params: the engine's P3M parameters for this cell.
        base_smearing: common width ``s0`` of the engine sum, Å.
        pair_i, pair_j: half pair list [M].
        pair_values: [M] real-space matrix elements, eV/e² (Ewald short range plus the
            width correction).
        diagonal: [N] ``J_i + k_e/(√π σ_i)``.
    """

    def __init__(
        self,
        positions: torch.Tensor,
        cell: torch.Tensor,
        params: EwaldParameters,
        base_smearing: float,
        pair_i: torch.Tensor,
        pair_j: torch.Tensor,
        pair_values: torch.Tensor,
        diagonal: torch.Tensor,
    ) -> None:
        if params.method != "p3m":
            raise ValueError("the cached operator is built for P3M parameters")
        from ._engine import _p3m_calculator

        n = positions.shape[0]
        dtype, device = positions.dtype, positions.device
        self.n = n
        rows = torch.cat([pair_i, pair_j])
        cols = torch.cat([pair_j, pair_i])
        self.real = _csr(rows, cols, torch.cat([pair_values, pair_values]), (n, n))
        split = params.split
        volume = float(cell_volume(cell))
        # self term of the split Gaussian and the background of a net charge; the
        # real-space kernel of charges of width s0 integrates to 2π s0² less than 1/r
        self.diagonal = diagonal - COULOMB_CONSTANT * math.sqrt(2.0 / math.pi) / split
        self.background = COULOMB_CONSTANT * 2.0 * math.pi * (base_smearing**2 - split**2) / volume

        # the engine's mesh and B-spline weights, computed once
        calc = _p3m_calculator(params, dtype, device)
        ns = calc.mesh_shape(cell)
        interp = calc.mesh_interpolator
        interp.update(cell, ns)
        interp.compute_weights(positions)
        w = interp.interpolation_weights  # [p, N, 3]
        weights = w[interp.x_shifts, :, 0] * w[interp.y_shifts, :, 1] * w[interp.z_shifts, :, 2]
        nx, ny, nz = (int(v) for v in ns.tolist())
        self.shape = (nx, ny, nz)
        self.mesh_points = nx * ny * nz
        flat = (interp.x_indices * ny + interp.y_indices) * nz + interp.z_indices  # [p³, N]
        self.spread, self.gather = assignment_matrices(flat.T, weights.T, self.mesh_points)
        self.filter = _influence(cell, ns, params) * (COULOMB_CONSTANT * self.mesh_points / volume)

    def apply(self, q: torch.Tensor) -> torch.Tensor:
        """``A q`` for charges [N, C]."""
        c = q.shape[1]
        rho = sparse_product(self.spread, q).T.reshape(c, *self.shape)
        spectrum = torch.fft.rfftn(rho, dim=(1, 2, 3)).mul_(self.filter)
        phi_mesh = torch.fft.irfftn(spectrum, s=self.shape, dim=(1, 2, 3))
        phi = sparse_product(self.gather, phi_mesh.reshape(c, self.mesh_points).T)
        phi = phi + sparse_product(self.real, q) + self.diagonal[:, None] * q
        return phi + self.background * q.sum(0, keepdim=True)


class _SymmetricMatvec(torch.autograd.Function):
    """``A q`` with the constant symmetric ``A``: the backward is another product."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, op: CachedOperator) -> torch.Tensor:  # type: ignore[override]
        ctx.op = op
        if not bool(q.any()):
            # A 0 = 0: the zero-valued δq of the energy's second-derivative term and its
            # zero first-order gradient skip two products (the graph is kept by apply)
            return torch.zeros_like(q)
        return op.apply(q)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return _SymmetricMatvec.apply(grad, ctx.op), None


def cached_matvec(op, q: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``A q`` for [N, C] charges, differentiable in ``q`` (A itself is constant).

    ``op`` is any constant symmetric operator with ``apply`` ([N, C] → [N, C], no
    autograd) and a ``diagonal`` giving its working dtype.
    """
    work = op.diagonal.dtype
    out = _SymmetricMatvec.apply(q.to(work), op)
    return out.to(dtype or q.dtype)
