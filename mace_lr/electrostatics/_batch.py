r"""Batched electrostatics: one engine call for a whole batch of graphs (private).

Graphs never interact. What is batched:

* open boundaries (``pbc = [F, F, F]``): all open graphs of a batch are evaluated as one
  padded pair computation ``[G, n_max, n_max]`` (a batched matrix product), in chunks of
  consecutive graphs so that at most ``max_elements`` pair entries exist at once; a graph
  too large for one chunk on its own goes through the row-chunked single-structure sum;
* fully periodic cells: graphs with the same Ewald parameters (same cell on the engine's
  0.05 Å grid and the same number of atoms — a batch of copies of one box, the usual MD
  and training case) share one reciprocal-space evaluation (one structure-factor product
  for the whole group) and one real-space scatter; the neighbour lists are still built per
  graph (vesin runs on the CPU). P3M cells (more than 200 atoms) and slabs are evaluated
  one graph at a time: at those sizes one graph is already a large computation.

The results equal the per-graph :func:`coulomb_potential` calls to rounding.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from .._geometry import cell_volume
from ._engine import (
    _cached_parameters,
    _note_net_charge,
    _open_potential,
    _real_space,
    _reciprocal_space,
    coulomb_potential_single,
    validate_inputs,
)
from ._kernels import COINCIDENT_R2, COULOMB_CONSTANT, half_space_grid

#: Largest number of pair entries (graphs × n_max²) held at once by the open-boundary sum.
MAX_PAIR_ELEMENTS = 2_000_000


# the scripted functions below write COINCIDENT_R2 and COULOMB_CONSTANT as literals
assert COINCIDENT_R2 == 1e-12 and COULOMB_CONSTANT == 14.399645


def open_potential_padded(
    positions: torch.Tensor, charges: torch.Tensor, counts: torch.Tensor, n_max: int, smearing: float
) -> torch.Tensor:
    """Open-boundary potential of consecutive graphs as one padded pair computation.

    Args:
        positions: [n_atoms, 3] Å, graph after graph.
        charges: [n_atoms, n_channels] e.
        counts: [n_graphs] int64 atoms per graph (sum = n_atoms).
        n_max: largest entry of ``counts``.
        smearing: Gaussian width σ, Å (0: point charges).

    Returns:
        [n_atoms, n_channels], in units where the Coulomb constant is 1 (e/Å).
    """
    device = positions.device
    n_graphs = counts.shape[0]
    n_atoms = positions.shape[0]
    starts = torch.cumsum(counts, 0) - counts
    graph = torch.repeat_interleave(torch.arange(n_graphs, device=device), counts)
    local = torch.arange(n_atoms, device=device) - starts[graph]
    pos = positions.new_zeros((n_graphs, n_max, 3)).index_put((graph, local), positions)
    q = charges.new_zeros((n_graphs, n_max, charges.shape[1])).index_put((graph, local), charges)
    slots = torch.arange(n_max, device=device)
    real = slots[None, :] < counts[:, None]  # [G, n]
    valid = real[:, :, None] & real[:, None, :] & (slots[:, None] != slots[None, :])[None]
    diff = pos[:, :, None, :] - pos[:, None, :, :]
    # coincident Gaussian sites: distances clamped at 1e-6 Å (_kernels.COINCIDENT_R2; a
    # literal here because TorchScript does not read module globals)
    r2 = torch.clamp((diff * diff).sum(-1), min=1e-12)
    r = torch.sqrt(torch.where(valid, r2, torch.ones_like(r2)))
    if smearing > 0.0:
        kernel = torch.erf(r / (math.sqrt(2.0) * smearing)) / r
    else:
        kernel = 1.0 / r
    v = torch.where(valid, kernel, torch.zeros_like(r))
    phi = torch.bmm(v, q)  # [G, n, C]
    return phi[graph, local]


def _open_chunks(counts: List[int], max_elements: int) -> List[Tuple[int, int, int]]:
    """Consecutive graph ranges ``(g0, g1, n_max)`` with ``(g1 - g0) n_max² <= max_elements``.

    A range with ``n_max = -1`` is one graph too large for a padded chunk.
    """
    chunks: List[Tuple[int, int, int]] = []
    g0, n_max = 0, 0
    for g, n in enumerate(counts):
        if n * n > max_elements:
            if g > g0:
                chunks.append((g0, g, n_max))
            chunks.append((g, g + 1, -1))
            g0, n_max = g + 1, 0
            continue
        wider = max(n_max, n)
        if (g + 1 - g0) * wider * wider > max_elements and g > g0:
            chunks.append((g0, g, n_max))
            g0, wider = g, n
        n_max = wider
    if len(counts) > g0:
        chunks.append((g0, len(counts), n_max))
    return chunks


def _open_batch(
    positions: torch.Tensor,
    charges: torch.Tensor,
    bounds: List[int],
    graphs: List[int],
    smearing: float,
    max_elements: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Potential (k_e = 1) of the open graphs ``graphs``; returns (atom index, potential)."""
    device = positions.device
    counts = [bounds[g + 1] - bounds[g] for g in graphs]
    if all(graphs[k + 1] == graphs[k] + 1 for k in range(len(graphs) - 1)):
        first, last = bounds[graphs[0]], bounds[graphs[-1] + 1]
        atoms = torch.arange(first, last, device=device)
        pos, q = positions[first:last], charges[first:last]  # views: no gather in the graph
    else:  # graph after graph
        atoms = torch.cat([torch.arange(bounds[g], bounds[g + 1], device=device) for g in graphs])
        pos, q = positions[atoms], charges[atoms]
    parts = []
    offsets = np.concatenate([[0], np.cumsum(counts)]).tolist()
    for g0, g1, n_max in _open_chunks(counts, max_elements):
        a, b = offsets[g0], offsets[g1]
        if n_max < 0:
            parts.append(_open_potential(pos[a:b], q[a:b], smearing))
        else:
            cnt = torch.as_tensor(counts[g0:g1], dtype=torch.int64, device=device)
            parts.append(open_potential_padded(pos[a:b], q[a:b], cnt, n_max, smearing))
    return atoms, torch.cat(parts, 0)


def _ewald_group(
    positions: torch.Tensor,
    charges: torch.Tensor,
    cells: torch.Tensor,
    params,
    smearing: float,
) -> torch.Tensor:
    """Ewald k-space potential of G graphs of n atoms sharing the same parameters.

    Args:
        positions: [G, n, 3] Å.
        charges: [G, n, C] e.
        cells: [G, 3, 3] Å.
        params: the group's Ewald parameters (``EwaldParameters``, method ``"ewald"``).
        smearing: Gaussian width σ of the charges, Å (0: point charges).

    Returns:
        [G, n, C] (k_e = 1), self and background terms removed as in the engine.
    """
    kcut, split = params.kcut, params.split
    cells_d = cells.detach().cpu().double()
    grid = half_space_grid(torch.linalg.norm(cells_d, dim=-1).amax(0).numpy(), kcut)
    # each graph keeps exactly the k-vectors its own evaluation would: |k| < kcut, decided
    # in float64 on the detached cell
    recip_d = 2.0 * math.pi * np.linalg.inv(cells_d.numpy()).transpose(0, 2, 1)  # [G, 3, 3]
    kd = np.einsum("ki,gij->gkj", grid, recip_d)
    inside = torch.as_tensor(np.einsum("gkj,gkj->gk", kd, kd) < kcut * kcut, device=positions.device)
    any_inside = inside.any(0)
    grid_t = torch.as_tensor(grid[any_inside.cpu().numpy()], dtype=cells.dtype, device=cells.device)
    inside = inside[:, any_inside]
    recip = 2.0 * math.pi * torch.linalg.inv(cells).transpose(-1, -2)
    kvec = torch.einsum("ki,gij->gkj", grid_t, recip)  # [G, K, 3]
    k2 = (kvec * kvec).sum(-1)
    green = torch.where(inside, torch.exp(-0.5 * split * split * k2) / k2, torch.zeros_like(k2))
    volume = cell_volume(cells)  # [G]
    kr = torch.bmm(positions, kvec.transpose(1, 2))  # [G, n, K]
    cos, sin = torch.cos(kr), torch.sin(kr)
    s_re = torch.bmm(cos.transpose(1, 2), charges)  # [G, K, C]
    s_im = torch.bmm(sin.transpose(1, 2), charges)
    g = green[:, :, None]
    phi = torch.bmm(cos, g * s_re) + torch.bmm(sin, g * s_im)
    phi = phi * (8.0 * math.pi / volume)[:, None, None]
    phi = phi - charges * (2.0 / (math.sqrt(2.0 * math.pi) * split))
    q_tot = charges.sum(1, keepdim=True)
    phi = phi - q_tot * ((2.0 * math.pi * split**2) / volume)[:, None, None]
    if smearing > 0.0:
        phi = phi + q_tot * ((2.0 * math.pi * smearing**2) / volume)[:, None, None]
    return phi


def _periodic_group(
    positions: torch.Tensor,
    charges: torch.Tensor,
    cell: torch.Tensor,
    bounds: List[int],
    graphs: List[int],
    smearing: float,
    accuracy: float,
    method: str,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Potential (k_e = 1) of bulk graphs sharing one parameter set; (atom index, potential)."""
    device = positions.device
    n = bounds[graphs[0] + 1] - bounds[graphs[0]]
    atoms = torch.cat([torch.arange(bounds[g], bounds[g + 1], device=device) for g in graphs])
    params = _cached_parameters(cell[graphs[0]], n, smearing, accuracy, method)
    pos, q = positions[atoms], charges[atoms]
    _note_net_charge(q)
    periodic = (True, True, True)
    real = torch.cat(
        [
            _real_space(pos[k * n : (k + 1) * n], q[k * n : (k + 1) * n], cell[g], params, smearing, periodic)
            for k, g in enumerate(graphs)
        ],
        0,
    )
    if params.method != "ewald" or len(graphs) == 1:
        kspace = [
            _reciprocal_space(pos[k * n : (k + 1) * n], q[k * n : (k + 1) * n], cell[g], params, smearing)
            for k, g in enumerate(graphs)
        ]
        return atoms, real + torch.cat(kspace, 0)
    cells = cell[torch.as_tensor(graphs, device=cell.device)]
    g_count = len(graphs)
    kspace = _ewald_group(pos.reshape(g_count, n, 3), q.reshape(g_count, n, -1), cells, params, smearing)
    return atoms, real + kspace.reshape(len(graphs) * n, -1)


def coulomb_potential_batched(
    positions: torch.Tensor,
    charges: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    ptr: torch.Tensor,
    smearing: Optional[float] = None,
    accuracy: float = 1e-6,
    method: str = "auto",
    max_elements: int = MAX_PAIR_ELEMENTS,
) -> torch.Tensor:
    """Potential (V) of every graph of a batch; see the public ``coulomb_potential_batch``."""
    bounds = [int(b) for b in ptr.tolist()]
    n_graphs = len(bounds) - 1
    flags = torch.as_tensor(pbc).reshape(-1, 3).tolist()
    if len(flags) != n_graphs or cell.ndim != 3 or cell.shape[0] != n_graphs:
        raise ValueError(
            f"`cell` {list(cell.shape)} and `pbc` [{len(flags)}, 3] must have one row per graph "
            f"of `ptr` ({n_graphs} graphs): cell [n_graphs, 3, 3], pbc [n_graphs, 3]"
        )
    if bounds and (bounds[0] != 0 or bounds[-1] != positions.shape[0]):
        raise ValueError(
            f"`ptr` must run from 0 to n_atoms={positions.shape[0]}, got {bounds[0]}..{bounds[-1]}"
        )
    if n_graphs == 0 or positions.shape[0] == 0:
        validate_inputs(positions, charges, None, (False, False, False))
        return torch.zeros_like(charges)
    validate_inputs(positions, charges, None, (False, False, False))
    sigma = float(smearing) if smearing is not None else 0.0
    if sigma < 0:
        raise ValueError(f"`smearing` must be >= 0 Å or None, got {smearing}")
    if not (0.0 < accuracy < 1.0):
        raise ValueError(f"`accuracy` must be in (0, 1), got {accuracy}")
    squeeze = charges.ndim == 1
    q = charges[:, None] if squeeze else charges
    open_graphs: List[int] = []
    bulk: Dict[tuple, List[int]] = {}
    pieces: List[Tuple[torch.Tensor, torch.Tensor]] = []
    cell_np: Optional[np.ndarray] = None  # read only when a graph is periodic
    for g, flag in enumerate(flags):
        a, b = bounds[g], bounds[g + 1]
        n = b - a
        if n == 0:
            continue
        flag_t = tuple(bool(f) for f in flag)
        if flag_t == (False, False, False):
            open_graphs.append(g)
        elif flag_t == (True, True, True):
            validate_inputs(positions[a:b], q[a:b], cell[g], flag_t)
            if cell_np is None:
                cell_np = cell.detach().cpu().double().numpy()
            key = (tuple(np.round(cell_np[g].reshape(-1) / 0.05).astype(int)), n)
            bulk.setdefault(key, []).append(g)
        else:
            phi_g = coulomb_potential_single(
                positions[a:b], q[a:b], cell[g], flag_t, smearing, accuracy, method
            )
            pieces.append((torch.arange(a, b, device=positions.device), phi_g / COULOMB_CONSTANT))
    if open_graphs:
        pieces.append(_open_batch(positions, q, bounds, open_graphs, sigma, max_elements))
    for graphs in bulk.values():
        pieces.append(_periodic_group(positions, q, cell, bounds, graphs, sigma, accuracy, method))
    if len(pieces) == 1 and pieces[0][0].shape[0] == positions.shape[0]:
        atoms, phi = pieces[0]
        if bool((atoms == torch.arange(positions.shape[0], device=atoms.device)).all()):
            out = phi * COULOMB_CONSTANT
            return out[:, 0] if squeeze else out
    out = torch.zeros_like(q)
    for atoms, phi in pieces:
        out = out.index_put((atoms,), phi)
    out = out * COULOMB_CONSTANT
    return out[:, 0] if squeeze else out


def coulomb_potential_open(
    positions: torch.Tensor,
    charges: torch.Tensor,
    ptr: torch.Tensor,
    smearing: float = 0.0,
    max_elements: int = MAX_PAIR_ELEMENTS,
) -> torch.Tensor:
    """Potential (V) of open-boundary graphs, TorchScript-compilable (no Python callbacks).

    The same padded pair computation as :func:`coulomb_potential_batched` uses for open
    graphs, in chunks of ``max(1, max_elements // n_max²)`` graphs (one graph larger than
    the budget is evaluated whole).

    Args:
        positions: [n_atoms, 3] Å, graph after graph.
        charges: [n_atoms, n_channels] e.
        ptr: [n_graphs + 1] int64 atom offsets.
        smearing: Gaussian width σ, Å (0: point charges).
        max_elements: bound on graphs × n_max² pair entries per chunk.

    Returns:
        [n_atoms, n_channels] V.
    """
    counts = ptr[1:] - ptr[:-1]
    n_graphs = counts.shape[0]
    if n_graphs == 0 or positions.shape[0] == 0:
        return torch.zeros_like(charges)
    n_max = int(counts.max())
    per_chunk = max(1, max_elements // max(1, n_max * n_max))
    parts: List[torch.Tensor] = []
    for g0 in range(0, n_graphs, per_chunk):
        g1 = min(n_graphs, g0 + per_chunk)
        a = int(ptr[g0])
        b = int(ptr[g1])
        cnt = counts[g0:g1]
        parts.append(open_potential_padded(positions[a:b], charges[a:b], cnt, int(cnt.max()), smearing))
    return torch.cat(parts, 0) * 14.399645  # COULOMB_CONSTANT, eV·Å/e²
