r"""Response quantities and their losses: polarization modulo the polarization quantum.

In a periodic cell the polarization is multivalued: moving one atom of charge z by a
lattice vector :math:`\mathbf a_k`, or choosing another branch of the Berry phase, changes
P by :math:`z e\,\mathbf a_k/Ω`. Two polarizations are the same physical state when they
differ by a vector of the lattice of quanta :math:`\{\sum_k n_k e\,\mathbf a_k / Ω\}`, so
a loss must compare them at the minimum image in polarization space
(physics.md, "Field-coupled energy"). Directions that are not periodic (slab normal,
molecules) have no quantum and are compared as they are.

The model's own dipole (:class:`~mace_lr.LongRangeMACE` ``dipole``, ``polarization =
dipole / Ω``) is single-valued along a simulation; its branch is set by the positions as
given (atoms are not wrapped into the cell).
"""

from __future__ import annotations

import itertools
from typing import Optional

import torch

from ._geometry import cell_volume

__all__ = [
    "centroid_minimum_image",
    "dipole_minimum_image",
    "polarization_minimum_image",
    "polarization_loss",
    "polarization_quantum",
]


def polarization_quantum(cell: torch.Tensor) -> torch.Tensor:
    """The quanta e·a_k/Ω [n_graphs, 3 (k), 3 (xyz)], e/Å², of cells [n_graphs, 3, 3]."""
    cell = cell.view(-1, 3, 3)
    return cell / cell_volume(cell).abs().view(-1, 1, 1)


def _minimum_image(delta: torch.Tensor, basis: torch.Tensor, pbc: torch.Tensor) -> torch.Tensor:
    """``delta`` [G, 3] minus the integer combination of the periodic rows of ``basis``
    [G, 3, 3] that makes it shortest (graphs without periodic rows are left as they are).
    """
    out = delta.clone()
    for g in range(delta.shape[0]):
        periodic = [k for k in range(3) if bool(pbc[g, k])]
        if not periodic:
            continue
        rows = basis[g, periodic].detach()  # [m, 3]
        # coefficients of delta in the periodic rows (least squares for m < 3)
        coef = torch.linalg.lstsq(rows.T, delta[g].detach()[:, None]).solution[:, 0]
        start = torch.round(coef)
        best, best_norm = None, None
        # rounding is the minimum image only for orthogonal cells; search the neighbours
        for offset in itertools.product((-1.0, 0.0, 1.0), repeat=len(periodic)):
            n = start + torch.tensor(offset, dtype=delta.dtype, device=delta.device)
            cand = delta[g] - n @ rows
            norm = float((cand.detach() ** 2).sum())
            if best_norm is None or norm < best_norm:
                best, best_norm = cand, norm
        out[g] = best
    return out


def _check_shapes(delta: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
    if delta.dim() != 2 or delta.shape[-1] != 3:
        raise ValueError(f"polarization differences must have shape [n_graphs, 3], got {tuple(delta.shape)}")
    cell = cell.view(-1, 3, 3).to(delta.dtype)
    if cell.shape[0] != delta.shape[0]:
        raise ValueError(f"{delta.shape[0]} polarizations but {cell.shape[0]} cells")
    return cell


def polarization_minimum_image(
    delta: torch.Tensor, cell: torch.Tensor, pbc: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """The shortest vector equal to ``delta`` modulo the polarization quanta.

    Args:
        delta: polarization differences [n_graphs, 3], e/Å².
        cell: cells [n_graphs, 3, 3], Å, rows are lattice vectors.
        pbc: periodic directions [n_graphs, 3] (default: all periodic). Only periodic
            lattice vectors carry a quantum.

    Returns:
        ``delta − Σ_k n_k e a_k/Ω`` with the integers n_k that make it shortest
        [n_graphs, 3]; differentiable in ``delta`` (the n_k are constants).
    """
    cell = _check_shapes(delta, cell)
    if pbc is None:
        pbc = torch.ones((delta.shape[0], 3), dtype=torch.bool, device=delta.device)
    return _minimum_image(delta, polarization_quantum(cell), pbc.view(-1, 3).to(torch.bool))


def dipole_minimum_image(
    delta: torch.Tensor, cell: torch.Tensor, pbc: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Dipole differences per cell [n_graphs, 3] e·Å at the minimum image modulo e·a_k.

    The cell dipole Ω P of a periodic structure is defined modulo e times each periodic
    lattice vector. Structures without periodic directions (or with a zero cell, as mace
    stores molecules) are returned unchanged.
    """
    cell = _check_shapes(delta, cell)
    nonzero = cell.detach().abs().sum(-1) > 0
    pbc = nonzero if pbc is None else pbc.view(-1, 3).to(torch.bool) & nonzero
    return _minimum_image(delta, cell, pbc)


def centroid_minimum_image(delta: torch.Tensor, cells: torch.Tensor, pbc: torch.Tensor) -> torch.Tensor:
    """Position differences per atom [n, 3] Å reduced by the nearest lattice vector.

    A Wannier centroid (or any point) in a periodic cell is defined modulo the lattice;
    a reference file may hold it in another image. Rounding the fractional coordinates
    along the periodic directions gives the minimum image whenever the true difference is
    shorter than half of every cell height (centroids sit a fraction of an Å from
    their atom).

    Args:
        delta: differences [n, 3], Å.
        cells: the cell of each row [n, 3, 3], Å (rows are lattice vectors; zeros for molecules).
        pbc: periodic directions of each row [n, 3].
    """
    if delta.dim() != 2 or delta.shape[-1] != 3 or cells.shape != (delta.shape[0], 3, 3):
        raise ValueError(
            f"centroid differences [n, 3] need cells [n, 3, 3], "
            f"got {tuple(delta.shape)} and {tuple(cells.shape)}"
        )
    flags = pbc.view(-1, 3).to(torch.bool) & (cells.detach().abs().sum(-1) > 0)
    rows = flags.any(-1)
    if not bool(rows.any()):
        return delta
    cell = cells[rows].detach()
    frac = torch.einsum("ni,nij->nj", delta[rows].detach(), torch.linalg.pinv(cell))
    shift = torch.round(frac) * flags[rows].to(delta.dtype)
    out = delta.clone()
    out[rows] = delta[rows] - torch.einsum("nj,nji->ni", shift, cell)
    return out


def polarization_loss(
    pred: torch.Tensor,
    ref: torch.Tensor,
    cell: torch.Tensor,
    pbc: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Mean squared polarization error at the minimum image, (e/Å²)².

    Args:
        pred: predicted polarizations [n_graphs, 3], e/Å².
        ref: reference polarizations [n_graphs, 3], e/Å², on any branch.
        cell: cells [n_graphs, 3, 3], Å (rows are lattice vectors).
        pbc: periodic directions [n_graphs, 3] (default: all periodic).
        weight: optional per-structure weights [n_graphs].
    """
    diff = polarization_minimum_image(pred - ref, cell, pbc)
    sq = (diff**2).sum(-1)
    if weight is not None:
        sq = sq * weight.view(-1).to(sq.dtype)
    return sq.mean()
