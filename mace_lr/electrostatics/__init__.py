"""Electrostatics engine shared by every charge-based block.

Energies and potentials of point or Gaussian-smeared charges for fully periodic cells
(Ewald for small cells, P3M through torch-pme for large ones), open boundaries (exact
pair sum) and slabs (2D-periodic with a vacuum correction). Units: Å, e, eV, V.

:func:`coulomb_potential_graph` is the TorchScript-compilable engine deployed models run
(open boundaries, and Ewald whose real-space part runs on the base model's graph edges);
:func:`solve_qeq_graph` is the TorchScript-compilable dense QEq solver.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._batch import coulomb_potential_batched, coulomb_potential_open
from ._engine import cache_info, coulomb_potential_single
from ._graph import coulomb_potential_graph
from ._kernels import COULOMB_CONSTANT
from ._qeq import ChargeEquilibrationError, GaussianCoulombOperator, solve_qeq
from ._qeq_batch import solve_qeq_open_batch
from ._qeq_dispatch import solve_qeq_batch
from ._qeq_graph import solve_qeq_graph

__all__ = [
    "COULOMB_CONSTANT",
    "ChargeEquilibrationError",
    "GaussianCoulombOperator",
    "cache_info",
    "coulomb_energy",
    "coulomb_potential",
    "coulomb_potential_batch",
    "coulomb_potential_graph",
    "coulomb_potential_open",
    "solve_qeq",
    "solve_qeq_batch",
    "solve_qeq_graph",
    "solve_qeq_open_batch",
]


def coulomb_potential(
    positions: torch.Tensor,
    charges: torch.Tensor,
    cell: Optional[torch.Tensor],
    pbc,
    smearing: Optional[float] = None,
    accuracy: float = 1e-6,
    method: str = "auto",
) -> torch.Tensor:
    r"""Electrostatic potential at every atom, excluding each charge's own field.

    .. math:: \phi_i = k_e \sum_{j,\mathbf{n}}{}' q_j\, v(|\mathbf{r}_j + \mathbf{n} - \mathbf{r}_i|),
              \quad v(r) = \operatorname{erf}(r/\sqrt{2}\sigma)/r

    so that the energy is :math:`E = \tfrac12 \sum_i q_i \phi_i` and
    :math:`\phi_i = \partial E/\partial q_i` (the matrix-vector product a charge solver needs).

    Args:
        positions: [n_atoms, 3] Å.
        charges: [n_atoms] or [n_atoms, n_channels] e.
        cell: [3, 3] Å, rows are lattice vectors (``None`` or zeros for open boundaries).
        pbc: three booleans: all True (bulk), all False (open) or ``[True, True, False]``
            (slab, vacuum along z; the first two lattice vectors must lie in the xy-plane).
        smearing: Gaussian width σ, Å; ``None`` for point charges.
        accuracy: requested relative accuracy of periodic sums.
        method: ``"auto"``, ``"ewald"`` or ``"p3m"`` (periodic and slab cells).

    Returns:
        Potential in V, same shape as ``charges``.
    """
    return coulomb_potential_single(positions, charges, cell, pbc, smearing, accuracy, method)


def coulomb_energy(
    positions: torch.Tensor,
    charges: torch.Tensor,
    cell: Optional[torch.Tensor],
    pbc,
    smearing: Optional[float] = None,
    accuracy: float = 1e-6,
    method: str = "auto",
) -> torch.Tensor:
    r"""Coulomb energy of point or Gaussian charges, eV.

    .. math:: E = \frac{k_e}{2} \sum_{i \ne j} q_i q_j
              \frac{\operatorname{erf}(r_{ij}/\sqrt{2}\sigma)}{r_{ij}}

    (periodic: over all images, with a neutralising background for net charge).
    Arguments as in :func:`coulomb_potential`; multi-channel charges give one energy per
    channel. Differentiable with respect to positions, cell and charges.
    """
    phi = coulomb_potential(positions, charges, cell, pbc, smearing, accuracy, method)
    return 0.5 * (charges * phi).sum(0)


def coulomb_potential_batch(
    positions: torch.Tensor,
    charges: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    ptr: torch.Tensor,
    smearing: Optional[float] = None,
    accuracy: float = 1e-6,
    method: str = "auto",
) -> torch.Tensor:
    r"""Potential of every structure of a batch, each structure on its own.

    Atoms of graph g are ``ptr[g]:ptr[g+1]``; charges of different graphs never interact.
    One call for the whole batch: all open-boundary graphs are one padded pair computation
    (chunked so that memory stays bounded), bulk graphs with the same cell size and atom
    count share one Ewald reciprocal-space evaluation; P3M cells and slabs are evaluated
    graph by graph. Equal to :func:`coulomb_potential` per graph to rounding.

    Args:
        positions: [n_atoms, 3] Å.
        charges: [n_atoms] or [n_atoms, n_channels] e.
        cell: [n_graphs, 3, 3] Å, rows are lattice vectors.
        pbc: [n_graphs, 3] bool; each graph as in :func:`coulomb_potential`.
        ptr: [n_graphs + 1] int64 atom offsets.
        smearing: Gaussian width σ, Å; ``None`` for point charges.
        accuracy: requested relative accuracy of periodic sums.
        method: ``"auto"``, ``"ewald"`` or ``"p3m"`` (periodic and slab cells).

    Returns:
        Potential in V, same shape as ``charges``.
    """
    return coulomb_potential_batched(positions, charges, cell, pbc, ptr, smearing, accuracy, method)
