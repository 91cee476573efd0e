r"""B-spline meshes of fixed spacing: learned k-space filters of per-atom values.

Shared by the blocks that move features through k-space (``mesh``, ``attention``); exposed
to block authors through :mod:`mace_lr.nn`. One call of :func:`mesh_convolution` computes,
for every atom i of every graph and every channel c,

.. math:: \phi_{ic} = \frac{1}{V} \sum_{\mathbf k} f_c(\mathbf k)\, \hat h_c(\mathbf k)\,
          e^{i\mathbf k\cdot\mathbf r_i},
   \qquad \hat h_c(\mathbf k) = \sum_j h_{jc}\, e^{-i\mathbf k\cdot\mathbf r_j},
   \qquad f_c(k) = c(k) \sum_b A_{bc}\, e^{-s_b^2 k^2/2},

with :math:`c(k) = 1` (a sum of Gaussians; k = 0 kept) or :math:`c(k) = 4\pi/k^2` (Coulomb;
k = 0 dropped). In real space :math:`\phi_{ic} = \sum_j\sum_{\mathbf n} g_c(\mathbf r_i -
\mathbf r_j + \mathbf n)\, h_{jc}` with :math:`g_c(\mathbf r) = \sum_b A_{bc}\,
e^{-r^2/2s_b^2}/(2\pi s_b^2)^{3/2}` for the Gaussian filter.

The values are spread to the mesh with cardinal B-splines of order p, Fourier
transformed, filtered (the filter is divided by the spline transform
:math:`U(\mathbf k)^2`, :math:`U = \prod_a \operatorname{sinc}^p(\pi m_a/n_a)`), transformed
back and interpolated with the same splines. Everything is differentiable (positions,
cell, values, widths, amplitudes), so forces, stress and parameter gradients are exact
gradients of the mesh result.

**Discretisation error.** The mesh result differs from the exact sum by the aliasing of
the splines: relative to the field, about :math:`(h/\sigma)^p` times a constant that
falls with p, for spacing h and smallest Gaussian width σ (:func:`mesh_spacing_for`
inverts the measured law). It shows as a residual of exact symmetries the mesh breaks
(rotating an open molecule on the mesh; a supercell whose mesh is not the cell's mesh).

**Geometry.** Mesh counts are even, ``2·ceil(L/(2h))`` per direction, from the cell
length L of periodic directions and from the atoms' extent plus ``2·padding`` for open
directions (molecules, the vacuum direction of slabs): every periodic image across an
open direction is at least ``2·padding`` away. The mesh origin is the atoms' centroid, so
translations are exact. When a cell length is an even multiple of h, an m×m×m supercell
has the same mesh points and E(supercell) = m³E(cell) to rounding.

**Batching.** Every graph has its own mesh in one flat buffer. Spreading and
interpolation are scatter/gather operations over all atoms of the batch (in p chunks, so
the [n_atoms, p³, C] stencil is never held at once); the FFTs run once per distinct mesh
shape (the Python loop is over shapes, not graphs).
"""

from __future__ import annotations

import math
from typing import Dict, List, Tuple

import torch

# Relative error of the mesh field of a Gaussian of width σ on a mesh of spacing h with
# splines of order p, fitted as err ≈ C_p (h/σ)^p (tests/test_gridding.py measures it).
_ERROR_CONSTANTS: Dict[int, float] = {4: 0.02, 5: 0.006, 6: 0.004, 7: 0.002, 8: 0.0015}


def bspline_weights(x: torch.Tensor, order: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cardinal B-spline weights of mesh coordinates.

    Args:
        x: [n_atoms, 3] mesh coordinates (fractional coordinate × mesh count).
        order: spline order p (p mesh points per direction).

    Returns:
        ``base`` [n_atoms, 3] int64 and ``weights`` [n_atoms, 3, p]: the atom gives weight
        ``weights[i, a, k]`` to mesh point ``base[i, a] - k`` along direction a. The
        weights sum to one and are C^{p-2} in x.
    """
    floor = torch.floor(x)
    w = (x - floor).unsqueeze(-1)
    ks = torch.arange(order, dtype=x.dtype, device=x.device)
    u = w + ks  # [n, 3, p], u in [k, k+1)
    a = torch.zeros_like(u)
    a[..., 0] = 1.0
    for n in range(2, order + 1):
        shifted = torch.cat([torch.zeros_like(a[..., :1]), a[..., :-1]], dim=-1)
        a = (u * a + (n - u) * shifted) / (n - 1)
    return floor.to(torch.int64), a


def mesh_geometry(
    positions: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    batch: torch.Tensor,
    ptr: torch.Tensor,
    spacing: float,
    padding: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Box, mesh counts and mesh coordinates of every atom.

    Args:
        positions: [n_atoms, 3] Å.
        cell: [G, 3, 3] Å, rows are lattice vectors (ignored along open directions).
        pbc: [G, 3] bool (all True, all False, or two True: a slab).
        batch: [n_atoms] int64 graph index.
        ptr: [G + 1] int64 atom offsets.
        spacing: mesh spacing h, Å.
        padding: vacuum added on each side of the atoms along open directions, Å.

    Returns:
        ``box`` [G, 3, 3] Å (rows: periodic lattice vectors, or n·h along open axes),
        ``counts`` [G, 3] int64 (even), ``x`` [n_atoms, 3] mesh coordinates.
    """
    num_graphs = ptr.shape[0] - 1
    dtype = positions.dtype
    periodic = pbc.to(torch.bool)
    n_periodic = periodic.sum(dim=1)
    if bool((n_periodic == 1).any()):
        raise ValueError(
            "mesh: pbc must be all True (bulk), all False (open) or two periodic directions "
            "(slab); one periodic direction (a wire) is not supported"
        )
    natoms = (ptr[1:] - ptr[:-1]).to(dtype).clamp(min=1.0)
    sums = torch.zeros((num_graphs, 3), dtype=dtype, device=positions.device).index_add(0, batch, positions)
    centroid = sums / natoms[:, None]
    rel = positions - centroid[batch]
    # unit vector of each open direction: the slab normal (a × b normalised) for a slab,
    # the Cartesian axis for an open structure
    normals = torch.cross(cell.roll(-1, dims=1), cell.roll(-2, dims=1), dim=-1)
    norm = torch.linalg.norm(normals, dim=-1, keepdim=True)
    normals = normals / torch.where(norm > 0, norm, torch.ones_like(norm))
    eye = torch.eye(3, dtype=dtype, device=positions.device).expand(num_graphs, 3, 3)
    axes = torch.where((n_periodic == 0)[:, None, None], eye, normals)  # [G, 3, 3]
    along = torch.einsum("nd,nad->na", rel.detach(), axes.detach()[batch]).abs()
    dev = torch.zeros((num_graphs, 3), dtype=dtype, device=positions.device)
    dev = dev.scatter_reduce(0, batch[:, None].expand(-1, 3), along, "amax")
    open_length = 2.0 * (dev + padding)
    lengths = torch.linalg.norm(cell.detach(), dim=-1)
    need = torch.where(periodic, lengths, open_length)
    counts = 2 * torch.ceil(need / (2.0 * spacing) - 1e-6).to(torch.int64)
    counts = counts.clamp(min=2)
    open_box = axes * (counts.to(dtype) * spacing)[:, :, None]
    box = torch.where(periodic[:, :, None], cell, open_box)
    frac = torch.linalg.solve(box[batch].transpose(1, 2), rel.unsqueeze(-1)).squeeze(-1)
    x = frac * counts[batch].to(dtype)
    return box, counts, x


def _sinc_power(m: torch.Tensor, n: int, power: int) -> torch.Tensor:
    """sinc(π m / n)^power (the B-spline transform along one direction)."""
    arg = math.pi * m / n
    safe = torch.where(arg == 0, torch.ones_like(arg), arg)
    return torch.where(arg == 0, torch.ones_like(arg), torch.sin(safe) / safe) ** power


def _kspace_filter(
    box: torch.Tensor,
    n0: int,
    n1: int,
    n2: int,
    widths: torch.Tensor,
    amplitudes: torch.Tensor,
    order: int,
    coulomb: bool,
) -> torch.Tensor:
    """Filter on the rfft grid [gs, C or 1, n0, n1, n2//2+1], divided by U(k)²."""
    device, dtype = box.device, box.dtype
    m0 = torch.fft.fftfreq(n0, d=1.0 / n0, device=device, dtype=dtype)
    m1 = torch.fft.fftfreq(n1, d=1.0 / n1, device=device, dtype=dtype)
    m2 = torch.fft.rfftfreq(n2, d=1.0 / n2, device=device, dtype=dtype)
    grid = torch.stack(torch.meshgrid([m0, m1, m2], indexing="ij"), dim=-1)  # [n0, n1, n2h, 3]
    recip = 2.0 * math.pi * torch.linalg.inv(box).transpose(1, 2)  # [gs, 3, 3], rows b_j
    kvec = torch.einsum("xyzj,gjd->gxyzd", grid, recip)
    k2 = (kvec * kvec).sum(-1)  # [gs, n0, n1, n2h]
    u = (
        _sinc_power(m0, n0, 2 * order)[:, None, None]
        * _sinc_power(m1, n1, 2 * order)[None, :, None]
        * _sinc_power(m2, n2, 2 * order)[None, None, :]
    )
    if coulomb:
        safe = torch.where(k2 > 0, k2, torch.ones_like(k2))
        u = u * torch.where(k2 > 0, safe / (4.0 * math.pi), torch.full_like(k2, math.inf))
    basis = torch.exp(-0.5 * k2.unsqueeze(1) * (widths * widths)[None, :, None, None, None])  # [gs, B, ...]
    shape = basis.shape
    f = (amplitudes.transpose(0, 1) @ basis.reshape(shape[0], shape[1], -1)).reshape(
        shape[0], amplitudes.shape[1], shape[2], shape[3], shape[4]
    )  # [gs, C, n0, n1, n2h]
    return f / u.unsqueeze(-4)


def _shape_groups(counts_list: List[List[int]]) -> Tuple[List[List[int]], List[int]]:
    """Graphs grouped by mesh shape (sorted shapes) and the graph order that stores them."""
    key_base = 1 << 20
    groups: Dict[int, List[int]] = {}
    for g in range(len(counts_list)):
        c = counts_list[g]
        k = (c[0] * key_base + c[1]) * key_base + c[2]
        if k in groups:
            groups[k].append(g)
        else:
            groups[k] = [g]
    out: List[List[int]] = []
    order_list: List[int] = []
    for k in sorted(groups.keys()):
        out.append(groups[k])
        order_list.extend(groups[k])
    return out, order_list


def mesh_convolution(
    positions: torch.Tensor,
    values: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    batch: torch.Tensor,
    ptr: torch.Tensor,
    widths: torch.Tensor,
    amplitudes: torch.Tensor,
    spacing: float,
    order: int,
    padding: float,
    coulomb: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""Gaussian-mixture (or Coulomb) filtered field of per-atom values at every atom.

    Args:
        positions: [n_atoms, 3] Å.
        values: [n_atoms, C] per-atom channel values h (any unit u).
        cell: [G, 3, 3] Å, rows are lattice vectors.
        pbc: [G, 3] bool.
        batch: [n_atoms] int64 graph index.
        ptr: [G + 1] int64 atom offsets.
        widths: [B] Å, Gaussian widths s_b.
        amplitudes: [B, C] (or [B, 1], shared by all channels) A_bc, unit a.
        spacing: mesh spacing h, Å.
        order: B-spline order p (2 … 10).
        padding: vacuum on each side of the atoms along open directions, Å.
        coulomb: multiply the filter by 4π/k² and drop k = 0.

    Returns:
        ``phi`` [n_atoms, C] in u·a/Å³ (Gaussian) or u·a/Å (Coulomb), and ``box``
        [G, 3, 3] Å, the periodic box used for each graph.
    """
    box, counts, x = mesh_geometry(positions, cell, pbc, batch, ptr, spacing, padding)
    device = positions.device
    counts_list: List[List[int]] = counts.tolist()
    groups, order_list = _shape_groups(counts_list)
    sizes = counts.prod(dim=1)
    order_t = torch.tensor(order_list, dtype=torch.int64, device=device)
    sorted_sizes = sizes[order_t]
    sorted_offsets = torch.cumsum(sorted_sizes, 0) - sorted_sizes
    offsets = torch.zeros_like(sizes).index_copy(0, order_t, sorted_offsets)
    total = int(sizes.sum())
    n_atoms, nchan = values.shape[0], values.shape[1]
    p = order

    # stencil: p chunks along the first mesh axis, p² points each
    base, w = bspline_weights(x, p)
    n = counts[batch]  # [N, 3]
    ks = torch.arange(p, device=device)
    idx = torch.remainder(base[:, :, None] - ks, n[:, :, None])  # [N, 3, p]
    plane = idx[:, 1, :, None] * n[:, 2, None, None] + idx[:, 2, None, :]  # [N, p, p]
    w12 = (w[:, 1, :, None] * w[:, 2, None, :]).reshape(n_atoms, p * p)
    row = n[:, 1] * n[:, 2]
    start = offsets[batch]
    chunks: List[Tuple[torch.Tensor, torch.Tensor]] = []
    for a in range(p):
        flat = ((idx[:, 0, a] * row + start)[:, None, None] + plane).reshape(-1)
        chunks.append((flat, w[:, 0, a, None] * w12))  # [N p²], [N, p²]

    mesh = torch.zeros((total, nchan), dtype=values.dtype, device=device)
    for flat, wa in chunks:
        mesh.index_add_(0, flat, torch.bmm(wa[:, :, None], values[:, None, :]).reshape(-1, nchan))

    volume = torch.linalg.det(box).abs()
    out_parts: List[torch.Tensor] = []
    begin = 0
    for members in groups:
        gs = len(members)
        c = counts_list[members[0]]
        n0, n1, n2 = c[0], c[1], c[2]
        # channels first, so that the FFTs run over contiguous memory
        block = mesh[begin : begin + gs * n0 * n1 * n2].reshape(gs, n0 * n1 * n2, nchan)
        block = block.transpose(1, 2).reshape(gs, nchan, n0, n1, n2)
        begin += gs * n0 * n1 * n2
        member_t = torch.tensor(members, dtype=torch.int64, device=device)
        filt = _kspace_filter(box[member_t], n0, n1, n2, widths, amplitudes, p, coulomb)
        rho = torch.fft.rfftn(block, dim=[2, 3, 4])
        field = torch.fft.irfftn(rho * filt, s=[n0, n1, n2], dim=[2, 3, 4])
        field = field * (float(n0 * n1 * n2) / volume[member_t])[:, None, None, None, None]
        out_parts.append(field.reshape(gs, nchan, n0 * n1 * n2).transpose(1, 2).reshape(-1, nchan))
    field_mesh = torch.cat(out_parts, dim=0)

    phi = torch.zeros((n_atoms, nchan), dtype=values.dtype, device=device)
    for flat, wa in chunks:
        picked = field_mesh.index_select(0, flat).reshape(n_atoms, p * p, nchan)
        phi = phi + torch.bmm(wa[:, None, :], picked).squeeze(1)
    return phi, box


def mesh_spacing_for(smearing: float, order: int, accuracy: float) -> float:
    r"""Mesh spacing h (Å) whose discretisation error is about ``accuracy``.

    Inverts the measured law err ≈ C_p (h/σ)^p for the relative error of the mesh field of
    a Gaussian of width σ (``smearing``, the narrowest of the filter) with splines of order
    p: :math:`h = \sigma\,(\text{accuracy}/C_p)^{1/p}`.
    """
    if not 0 < accuracy < 1:
        raise ValueError(f"mesh accuracy must be in (0, 1), got {accuracy}")
    if order not in _ERROR_CONSTANTS:
        raise ValueError(f"mesh accuracy control needs order in {sorted(_ERROR_CONSTANTS)}, got {order}")
    return smearing * (accuracy / _ERROR_CONSTANTS[order]) ** (1.0 / order)
