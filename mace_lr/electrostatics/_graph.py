r"""Deployable electrostatics: Ewald on the base model's graph, TorchScript-compilable (private).

What a scripted (``torch.jit.script``) model runs, without Python callbacks, and what a
block with ``method="graph"`` runs eagerly too (the same code, so both give the same
numbers to rounding):

* open boundaries (``pbc = [F, F, F]``): the exact padded pair sum of
  :func:`coulomb_potential_open`;
* fully periodic cells: the Ewald sum with its real-space part evaluated on the edges of
  the base model's graph (``edge_index`` and the strained ``shifts``: every pair closer
  than the base cutoff ``r_max``, as mace's ASE and LAMMPS interfaces provide it) and its
  reciprocal part as a direct structure-factor sum over the half space of k-vectors.

The splitting width ``s`` follows the eager engine's Ewald choice
(:func:`mace_lr.electrostatics._kernels.choose_parameters`), capped so that the real-space
cutoff :math:`r_c = s\sqrt{2(\ln(1/\epsilon) + 3/2)}` fits inside the graph
(:math:`r_c \le r_\mathrm{max}`), and never below the charges' own width σ: at ``s = σ``
the real-space part vanishes and the whole sum is reciprocal. The reciprocal cutoff is
:math:`k_c = \sqrt{2(\ln(1/\epsilon) + 3/2)}/s`, as in the eager engine, so the requested
accuracy holds. The reciprocal sum costs O(N·K) with K ∝ V k_c³ (O(N²) at fixed density):
fine for deployment of cells of a few thousand atoms; the P3M mesh of the eager engine
(torch-pme) is not scripted. Slabs (``pbc = [T, T, F]``) are not supported here.
"""

from __future__ import annotations

import math
from typing import List, Tuple

import torch

from .._geometry import cell_volume
from ._batch import coulomb_potential_open

# TorchScript does not read module globals: the functions below write these as literals
# (checked against _kernels.COULOMB_CONSTANT and COINCIDENT_R2 in the tests)
_KE = 14.399645  # written as a literal below


def graph_ewald_parameters(
    cell: torch.Tensor, n_atoms: int, smearing: float, accuracy: float, cutoff: float
) -> Tuple[float, float, float]:
    """Ewald split ``s`` (Å), real-space cutoff ``r_c ≤ cutoff`` (Å) and k-cutoff (1/Å).

    Args:
        cell: [3, 3] Å, rows are lattice vectors (read detached, in float64).
        n_atoms: atoms in the cell.
        smearing: Gaussian width σ of the charges, Å (0: point charges).
        accuracy: requested relative accuracy ε.
        cutoff: largest real-space cutoff the graph supports (the base model's r_max), Å.
    """
    cell_d = cell.detach().to(torch.float64)
    volume = float(cell_volume(cell_d))
    heights = 1.0 / torch.linalg.norm(torch.linalg.inv(cell_d), dim=0)  # face distances
    width = math.sqrt(2.0 * (math.log(1.0 / accuracy) + 1.5))
    split = (volume * volume / max(n_atoms, 1)) ** (1.0 / 6.0) / math.sqrt(2.0 * math.pi)
    split = min(split, 0.5 * float(heights.min()))
    split = min(split, cutoff / width)
    split = max(split, smearing)
    if split <= 0.0:
        raise ValueError("point charges need a graph cutoff > 0 for the real-space Ewald part")
    rcut = 0.0 if split <= smearing else split * width
    return split, rcut, width / split


def half_space_indices(cell: torch.Tensor, kcut: float) -> torch.Tensor:
    """Integer k-indices n ≠ 0, one of each ±n pair, with ``|n · 2π cell⁻ᵀ| < kcut``.

    Args:
        cell: [3, 3] Å (read detached, in float64).
        kcut: reciprocal cutoff, 1/Å.

    Returns:
        [K, 3] float64 indices (n_x > 0, or n_x = 0 < n_y, or n_x = n_y = 0 < n_z).
    """
    cell_d = cell.detach().to(torch.float64)
    lengths = torch.linalg.norm(cell_d, dim=1)
    nmax: List[int] = [int(math.ceil(kcut * float(length) / (2.0 * math.pi))) for length in lengths]
    axes = [torch.arange(-n, n + 1, dtype=torch.float64, device=cell.device) for n in nmax]
    grid = torch.cartesian_prod(axes[0], axes[1], axes[2])
    x, y, z = grid[:, 0], grid[:, 1], grid[:, 2]
    keep = (x > 0) | ((x == 0) & (y > 0)) | ((x == 0) & (y == 0) & (z > 0))
    recip = 2.0 * math.pi * torch.linalg.inv(cell_d).transpose(0, 1)
    k = grid @ recip
    keep = keep & ((k * k).sum(-1) < kcut * kcut)
    return grid[keep]


def reciprocal_potential(
    positions: torch.Tensor,
    charges: torch.Tensor,
    cell: torch.Tensor,
    smearing: float,
    split: float,
    kcut: float,
    max_elements: int = 4_000_000,
) -> torch.Tensor:
    r"""Reciprocal Ewald potential of one cell, self and background terms removed (k_e = 1).

    .. math:: \phi_i = \frac{8\pi}{V}\sum_{k>0}\frac{e^{-s^2k^2/2}}{k^2}
              \operatorname{Re}\,e^{-ik\cdot r_i}S(k) - \frac{2 q_i}{\sqrt{2\pi}\,s}
              - \frac{2\pi (s^2 - \sigma^2)}{V} Q

    Args:
        positions: [n, 3] Å.
        charges: [n, C] e.
        cell: [3, 3] Å (differentiable).
        smearing: σ, Å.
        split: s, Å.
        kcut: 1/Å.
        max_elements: bound on n × K entries held at once.

    Returns:
        [n, C] e/Å.
    """
    grid = half_space_indices(cell, kcut).to(cell.dtype)
    recip = 2.0 * math.pi * torch.linalg.inv(cell).transpose(0, 1)
    kvec = grid @ recip  # [K, 3], differentiable in the cell
    volume = cell_volume(cell)
    phi = torch.zeros_like(charges)
    chunk = max(1, max_elements // max(positions.shape[0], 1))
    for start in range(0, kvec.shape[0], chunk):
        k = kvec[start : start + chunk]
        k2 = (k * k).sum(-1)
        green = torch.exp(-0.5 * split * split * k2) / k2
        kr = positions @ k.transpose(0, 1)
        cos, sin = torch.cos(kr), torch.sin(kr)
        s_re = cos.transpose(0, 1) @ charges  # [K, C]
        s_im = sin.transpose(0, 1) @ charges
        phi = phi + cos @ (green[:, None] * s_re) + sin @ (green[:, None] * s_im)
    phi = phi * (8.0 * math.pi / volume)
    phi = phi - charges * (2.0 / (math.sqrt(2.0 * math.pi) * split))
    q_tot = charges.sum(0, keepdim=True)
    return phi - q_tot * (2.0 * math.pi * (split * split - smearing * smearing) / volume)


def _short_range_slope(r: float, smearing: float, split: float) -> Tuple[float, float]:
    """``v_sr(r)`` and ``dv_sr/dr`` at the cutoff (floats), as the eager engine's kernel."""
    a_split = math.sqrt(2.0) * split
    f = -math.erf(r / a_split)
    df = -2.0 / (math.sqrt(math.pi) * a_split) * math.exp(-((r / a_split) ** 2))
    if smearing > 0.0:
        a_sigma = math.sqrt(2.0) * smearing
        f += math.erf(r / a_sigma)
        df += 2.0 / (math.sqrt(math.pi) * a_sigma) * math.exp(-((r / a_sigma) ** 2))
    else:
        f += 1.0
    return f / r, df / r - f / (r * r)


def edge_real_space_potential(
    positions: torch.Tensor,
    charges: torch.Tensor,
    edge_index: torch.Tensor,
    shifts: torch.Tensor,
    smearing: float,
    split: float,
    rcut: float,
) -> torch.Tensor:
    r"""Real-space Ewald potential summed over directed graph edges (k_e = 1).

    Shifted-force truncation at ``rcut`` (the eager engine's kernel):
    :math:`\phi_i = \sum_{(j \to i)} q_j\, v_\mathrm{sf}(r_{ij})`, with
    :math:`\mathbf r_{ij} = \mathbf R_i - \mathbf R_j + \mathbf S_{ji}` (mace's convention:
    ``edge_index[0]`` sends, ``edge_index[1]`` receives). Edges longer than ``rcut`` add 0.

    Args:
        positions: [n, 3] Å.
        charges: [n, C] e.
        edge_index: [2, E] int64.
        shifts: [E, 3] Å.
        smearing: σ, Å.
        split: s, Å.
        rcut: Å (> 0).
    """
    sender, receiver = edge_index[0], edge_index[1]
    vec = positions[receiver] - positions[sender] + shifts
    r = torch.sqrt(torch.clamp((vec * vec).sum(-1), min=1e-12))  # COINCIDENT_R2
    x_split = r / (math.sqrt(2.0) * split)
    if smearing > 0.0:
        x_sigma = r / (math.sqrt(2.0) * smearing)
        near = torch.erf(x_sigma) - torch.erf(x_split)
        far = torch.erfc(x_split) - torch.erfc(x_sigma)
        v = torch.where(r < 2.0 * smearing, near, far) / r
    else:
        v = torch.erfc(x_split) / r
    value, slope = _short_range_slope(rcut, smearing, split)
    v = v - value - (r - rcut) * slope
    v = torch.where(r < rcut, v, torch.zeros_like(v))
    return torch.zeros_like(charges).index_add(0, receiver, v[:, None] * charges[sender])


def coulomb_potential_graph(
    positions: torch.Tensor,
    charges: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    ptr: torch.Tensor,
    edge_index: torch.Tensor,
    shifts: torch.Tensor,
    smearing: float,
    accuracy: float,
    cutoff: float,
) -> torch.Tensor:
    """Potential (V) of every graph of a batch, TorchScript-compilable; see the module docs.

    Args:
        positions: [n_atoms, 3] Å (strained).
        charges: [n_atoms, n_channels] e.
        cell: [n_graphs, 3, 3] Å (strained).
        pbc: [n_graphs, 3] bool, each row all True or all False.
        ptr: [n_graphs + 1] int64 atom offsets.
        edge_index: [2, n_edges] int64, the base model's graph (every pair within ``cutoff``).
        shifts: [n_edges, 3] Å, periodic image shifts of the edges (strained).
        smearing: Gaussian width σ, Å (0: point charges).
        accuracy: requested relative accuracy of periodic sums, in (0, 1).
        cutoff: cutoff of the graph, Å (the base model's r_max).

    Returns:
        [n_atoms, n_channels] V.
    """
    if not (0.0 < accuracy < 1.0):
        raise ValueError("`accuracy` must be in (0, 1)")
    n_graphs = ptr.shape[0] - 1
    flags = pbc.view(n_graphs, 3)
    periodic = flags.all(-1)
    if bool((flags.any(-1) & ~periodic).any()):
        raise ValueError("the graph electrostatics engine handles open and fully periodic cells, not slabs")
    if not bool(periodic.any()):
        return coulomb_potential_open(positions, charges, ptr, smearing)
    counts = ptr[1:] - ptr[:-1]
    batch = torch.repeat_interleave(torch.arange(n_graphs, device=ptr.device), counts)
    phi = torch.zeros_like(charges)
    if not bool(periodic.all()):  # open graphs of a mixed batch, evaluated together (in V)
        atoms = torch.nonzero(~periodic[batch]).view(-1)
        open_counts = torch.where(periodic, torch.zeros_like(counts), counts)
        open_ptr = torch.cat([ptr[:1], torch.cumsum(open_counts, 0)])
        phi_open = coulomb_potential_open(positions[atoms], charges[atoms], open_ptr, smearing)
        phi = phi.index_put((atoms,), phi_open)
    real_edges = periodic[batch[edge_index[0]]]
    for g in range(n_graphs):
        if not bool(periodic[g]):
            continue
        a, b = int(ptr[g]), int(ptr[g + 1])
        if b == a:
            continue
        split, rcut, kcut = graph_ewald_parameters(cell[g], b - a, smearing, accuracy, cutoff)
        pos, q = positions[a:b], charges[a:b]
        phi_g = reciprocal_potential(pos, q, cell[g], smearing, split, kcut)
        if rcut > 0.0:
            mine = torch.nonzero(real_edges & (batch[edge_index[0]] == g)).view(-1)
            phi_g = phi_g + edge_real_space_potential(
                pos, q, edge_index[:, mine] - a, shifts[mine], smearing, split, rcut
            )
        atoms_g = torch.arange(a, b, device=positions.device)
        phi = phi.index_put((atoms_g,), phi_g * 14.399645)  # COULOMB_CONSTANT, eV·Å/e²
    return phi
