r"""Charge equilibration for deployed models: dense, TorchScript-compilable (private).

One dense solve per structure of the QEq system of :mod:`._qeq` (matrix ``A``, one
Lagrange multiplier for the total charge), in float64, derivatives by autograd through
:func:`torch.linalg.solve` (the same derivatives as the implicit ones of the eager
solver). The Coulomb matrix of Gaussian charges with per-atom widths σ_i:

* open boundaries: the exact pair kernel
  :math:`A_{ij} = k_e \operatorname{erf}(r_{ij}/\sqrt2\gamma_{ij})/r_{ij}`,
  :math:`\gamma_{ij}^2 = \sigma_i^2 + \sigma_j^2`;
* periodic cells: a purely reciprocal sum — the Gaussian pair kernel factorises in
  k-space, :math:`e^{-\gamma_{ij}^2k^2/2} = f_i(k) f_j(k)` with
  :math:`f_i = e^{-\sigma_i^2k^2/2}`, so no real-space part or neighbour list is needed:

  .. math:: A_{ij} = \frac{8\pi k_e}{V}\sum_{k>0}\frac{f_i f_j}{k^2}\cos k\cdot(r_i - r_j)
            - \frac{2\pi k_e}{V}(\sigma_i^2 + \sigma_j^2 - s_0^2),

  cut at :math:`k_c = \sqrt{2(\ln(1/\epsilon) + 3/2)}/(\sqrt2\sigma_\mathrm{min})`. The
  last term is the k = 0 limit that makes the sum equal the eager engine's convention
  (Ewald sum of width :math:`s_0` plus the lattice sum of the width correction); it
  cancels for neutral cells.

Both diagonals carry the hardness and the Gaussian self-energy
:math:`J_i + k_e/(\sqrt\pi\sigma_i)` (periodic: the k-sum holds the self-energy). Cost
O(n² K) per periodic cell and O(n³) for the solve: small and medium structures.
"""

import math
from typing import List, Tuple

import torch

from .._geometry import cell_volume
from ._graph import half_space_indices


def _open_matrix(positions: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """Pair part of ``A`` for an open structure (k_e = 1), [n, n], zero diagonal."""
    n = positions.shape[0]
    diff = positions[:, None, :] - positions[None, :, :]
    off = ~torch.eye(n, dtype=torch.bool, device=positions.device)
    r = torch.sqrt(
        torch.where(off, torch.clamp((diff * diff).sum(-1), min=1e-12), torch.ones_like(diff[..., 0]))
    )
    gamma = torch.sqrt(widths[:, None] ** 2 + widths[None, :] ** 2)
    return torch.where(off, torch.erf(r / (math.sqrt(2.0) * gamma)) / r, torch.zeros_like(r))


def _periodic_matrix(
    positions: torch.Tensor,
    widths: torch.Tensor,
    cell: torch.Tensor,
    accuracy: float,
    base_smearing: float,
    max_elements: int = 4_000_000,
) -> torch.Tensor:
    """Coulomb part of ``A`` for a periodic cell (k_e = 1), [n, n], self-energies included."""
    n = positions.shape[0]
    sigma_min = float(widths.detach().min())
    kcut = math.sqrt(2.0 * (math.log(1.0 / accuracy) + 1.5)) / (math.sqrt(2.0) * sigma_min)
    grid = half_space_indices(cell, kcut).to(cell.dtype)
    kvec = grid @ (2.0 * math.pi * torch.linalg.inv(cell).transpose(0, 1))
    volume = cell_volume(cell)
    a = torch.zeros((n, n), dtype=positions.dtype, device=positions.device)
    chunk = max(1, max_elements // max(n, 1))
    for start in range(0, kvec.shape[0], chunk):
        k = kvec[start : start + chunk]
        k2 = (k * k).sum(-1)
        form = torch.exp(-0.5 * widths[:, None] ** 2 * k2[None, :])  # [n, K]
        kr = positions @ k.transpose(0, 1)
        c = form * torch.cos(kr) / torch.sqrt(k2)[None, :]
        s = form * torch.sin(kr) / torch.sqrt(k2)[None, :]
        a = a + c @ c.transpose(0, 1) + s @ s.transpose(0, 1)
    a = a * (8.0 * math.pi / volume)
    w2 = widths * widths
    return a - (2.0 * math.pi / volume) * (w2[:, None] + w2[None, :] - base_smearing * base_smearing)


def solve_qeq_graph(
    positions: torch.Tensor,
    electronegativity: torch.Tensor,
    hardness: torch.Tensor,
    widths: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    ptr: torch.Tensor,
    total_charge: torch.Tensor,
    accuracy: float,
    base_smearing: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""QEq energies and charges of a batch, one dense solve per structure (TorchScript).

    .. math:: \min_q\ \sum_i \chi_i q_i + \tfrac12 q^\mathsf{T} A q
              \quad\text{subject to}\quad \sum_i q_i = Q

    Args:
        positions: [N, 3] Å (strained).
        electronegativity: [N] χ_i, V.
        hardness: [N] J_i > 0, eV/e².
        widths: [N] Gaussian widths σ_i > 0, Å.
        cell: [G, 3, 3] Å (strained).
        pbc: [G, 3] bool, each row all True or all False.
        ptr: [G + 1] int64 atom offsets.
        total_charge: [G] e.
        accuracy: relative accuracy of the periodic k-sum, in (0, 1).
        base_smearing: the eager engine's common width s_0, Å (enters charged cells only).

    Returns:
        ``(energy [G] eV, charges [N] e)`` in the dtype of ``positions``.
    """
    if not (0.0 < accuracy < 1.0):
        raise ValueError("`accuracy` must be in (0, 1)")
    if bool((widths.detach() <= 0).any()) or bool((hardness.detach() <= 0).any()):
        raise ValueError("QEq widths and hardness must be > 0")
    n_graphs = ptr.shape[0] - 1
    flags = pbc.view(n_graphs, 3)
    if bool((flags.any(-1) & ~flags.all(-1)).any()):
        raise ValueError("the graph QEq solver handles open and fully periodic cells, not slabs")
    f64 = torch.float64
    energies: List[torch.Tensor] = []
    charges: List[torch.Tensor] = []
    for g in range(n_graphs):
        a0, b0 = int(ptr[g]), int(ptr[g + 1])
        n = b0 - a0
        if n == 0:
            energies.append(torch.zeros((), dtype=f64, device=positions.device))
            continue
        pos, sigma = positions[a0:b0].to(f64), widths[a0:b0].to(f64)
        chi = electronegativity[a0:b0].to(f64)
        if bool(flags[g].all()):
            coulomb = _periodic_matrix(pos, sigma, cell[g].to(f64), accuracy, base_smearing)
            diagonal = hardness[a0:b0].to(f64)
        else:
            coulomb = _open_matrix(pos, sigma)
            diagonal = hardness[a0:b0].to(f64) + 14.399645 / (math.sqrt(math.pi) * sigma)
        a = 14.399645 * coulomb + torch.diag_embed(diagonal)  # COULOMB_CONSTANT, eV·Å/e²
        a = 0.5 * (a + a.transpose(0, 1))
        ones = torch.ones((n, 1), dtype=f64, device=positions.device)
        system = torch.cat(
            [torch.cat([a, ones], 1), torch.cat([ones.transpose(0, 1), ones.new_zeros((1, 1))], 1)], 0
        )
        rhs = torch.cat([-chi, total_charge[g].to(f64).view(1)])
        q = torch.linalg.solve(system, rhs)[:n]
        energies.append((chi * q).sum() + 0.5 * (q * (a @ q)).sum())
        charges.append(q)
    dtype = positions.dtype
    if len(charges) == 0:
        return torch.stack(energies).to(dtype), positions.new_zeros(0)
    return torch.stack(energies).to(dtype), torch.cat(charges).to(dtype)
