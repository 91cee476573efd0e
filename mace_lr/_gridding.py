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
interpolation are products with the sparse [mesh, n_atoms] assignment matrix and its
transpose (CSR, p³ weights per atom) over all atoms of the batch; the FFTs run once per
distinct mesh shape (the Python loop is over shapes, not graphs), a few channels at a
time.

**Gradients.** The two products and the weight gradient they share, :math:`P_{is} =
\sum_c h_{ic} M_{f_{is}c}` (a sampled dense product), are autograd Functions whose
backward passes are the same three operations, so nothing of size [n_atoms·p³, C] is
saved and every order of derivative (forces, stress, force training) is exact. The
weight gradients of a convolution's assignment and interpolation are paired into one
sampled product of 2C channels. Under TorchScript the same sums run as
index_add/index_select stencils (in p chunks).
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional, Tuple

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


def _csr(
    crow: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, rows: int, columns: int
) -> torch.Tensor:
    """A CSR matrix (no invariant check: the stencil builds valid ones)."""
    with warnings.catch_warnings():
        # "Sparse CSR tensor support is in beta state": the products with dense matrices
        # used here are tested against the index_add/index_select stencil
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support", category=UserWarning)
        return torch.sparse_csr_tensor(crow, cols, values, (rows, columns), check_invariants=False)


class _Stencil:
    """The constant index structure of one assignment: atom i gives weight ``W[i, s]`` to
    mesh row ``flat[i, s]`` (s over the p³ stencil points); both CSR orientations.

    Atom-major (interpolation, ``[n_atoms, mesh]``) rows hold the p³ points of an atom;
    mesh-major (assignment, ``[mesh, n_atoms]``) rows are sorted by mesh point once
    (``perm``) and reused by every assignment of the call and of its gradients.
    """

    def __init__(self, flat: torch.Tensor, total: int, repeats: bool):
        n_atoms, points = flat.shape
        #: an atom's stencil visits a mesh row more than once (a mesh count below p)
        self.repeats = repeats
        self.flat = flat
        device = flat.device
        index_dtype = flat.dtype
        self.n_atoms, self.points, self.total = n_atoms, points, total
        self.crow = torch.arange(n_atoms + 1, device=device, dtype=index_dtype) * points
        self.cols = flat.reshape(-1).to(index_dtype)
        self.perm = torch.argsort(self.cols, stable=True)
        counts = torch.bincount(self.cols, minlength=total)
        crow_t = torch.zeros(total + 1, dtype=torch.int64, device=device)
        crow_t[1:] = torch.cumsum(counts, 0)
        self.crow_t = crow_t.to(index_dtype)
        self.cols_t = torch.div(self.perm, points, rounding_mode="floor").to(index_dtype)
        #: the weights of the forward pass (``keep``), whose two matrices are built once:
        #: the forward products and their gradients use them twice each
        self.kept: Optional[torch.Tensor] = None
        self._kept: Dict[str, torch.Tensor] = {}

    def keep(self, weights: torch.Tensor) -> None:
        """Build the matrices of ``weights`` (which must not change) once, on first use."""
        self.kept, self._kept = weights, {}

    def pattern(self, dtype: torch.dtype) -> torch.Tensor:
        """The interpolation matrix's sparsity pattern (any values) in ``dtype``."""
        if self.kept is not None and self.kept.dtype == dtype:
            return self.interpolation(self.kept)
        values = torch.zeros(self.cols.shape[0], dtype=dtype, device=self.cols.device)
        return _csr(self.crow, self.cols, values, self.n_atoms, self.total)

    def interpolation(self, weights: torch.Tensor) -> torch.Tensor:
        """``[n_atoms, mesh]`` CSR of ``weights`` [n_atoms, p³]."""
        if weights is self.kept and "interpolation" in self._kept:
            return self._kept["interpolation"]
        matrix = _csr(self.crow, self.cols, weights.reshape(-1), self.n_atoms, self.total)
        if weights is self.kept:
            self._kept["interpolation"] = matrix
        return matrix

    def assignment(self, weights: torch.Tensor) -> torch.Tensor:
        """``[mesh, n_atoms]`` CSR of ``weights`` [n_atoms, p³] (the transpose)."""
        if weights is self.kept and "assignment" in self._kept:
            return self._kept["assignment"]
        values = weights.reshape(-1).index_select(0, self.perm)
        matrix = _csr(self.crow_t, self.cols_t, values, self.total, self.n_atoms)
        if weights is self.kept:
            self._kept["assignment"] = matrix
        return matrix


class _Assign(torch.autograd.Function):
    r"""Mesh values :math:`M_{mc} = \sum_{is:\,f_{is}=m} W_{is} h_{ic}` ([mesh, C])."""

    @staticmethod
    def forward(ctx, weights: torch.Tensor, values: torch.Tensor, stencil: _Stencil) -> torch.Tensor:  # type: ignore[override]
        ctx.stencil = stencil
        ctx.save_for_backward(weights, values)
        return stencil.assignment(weights) @ values

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        weights, values = ctx.saved_tensors
        grad_w = grad_v = None
        if ctx.needs_input_grad[0]:
            grad_w = _Pair.apply(grad, values, ctx.stencil)
        if ctx.needs_input_grad[1]:
            grad_v = _Interpolate.apply(weights, grad, ctx.stencil)
        return grad_w, grad_v, None


class _Interpolate(torch.autograd.Function):
    r"""Values at the atoms :math:`\phi_{ic} = \sum_s W_{is} M_{f_{is}c}` ([n_atoms, C])."""

    @staticmethod
    def forward(ctx, weights: torch.Tensor, mesh: torch.Tensor, stencil: _Stencil) -> torch.Tensor:  # type: ignore[override]
        ctx.stencil = stencil
        ctx.save_for_backward(weights, mesh)
        return stencil.interpolation(weights) @ mesh

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        weights, mesh = ctx.saved_tensors
        grad_w = grad_m = None
        if ctx.needs_input_grad[0]:
            grad_w = _Pair.apply(mesh, grad, ctx.stencil)
        if ctx.needs_input_grad[1]:
            grad_m = _Assign.apply(weights, grad, ctx.stencil)
        return grad_w, grad_m, None


class _AssignPaired(torch.autograd.Function):
    r""":class:`_Assign` of a convolution whose result is interpolated by
    :class:`_InterpolatePaired` with the same weights: the weight gradients of both,
    :math:`P(M_\phi, \bar\phi) + P(\bar M, h)`, are one :class:`_Pair` of 2C channels
    (its cost is mostly per stencil point, not per channel).

    Returns the mesh values and two zero slots ([mesh, C] and [n_atoms, C]) that
    :class:`_InterpolatePaired` takes; its backward returns, as their gradients, the field
    it interpolated and the gradient of its result, which this backward pairs with its own.
    """

    @staticmethod
    def forward(ctx, weights: torch.Tensor, values: torch.Tensor, stencil: _Stencil):  # type: ignore[override]
        ctx.stencil = stencil
        ctx.save_for_backward(weights, values)
        mesh = stencil.assignment(weights) @ values
        zero = values.new_zeros((1, 1))
        return (
            mesh,
            zero.expand(stencil.total, values.shape[1]),
            zero.expand(stencil.n_atoms, values.shape[1]),
        )

    @staticmethod
    def backward(ctx, grad: torch.Tensor, field: torch.Tensor, grad_phi: torch.Tensor):  # type: ignore[override]
        weights, values = ctx.saved_tensors
        grad_w = grad_v = None
        if ctx.needs_input_grad[0]:
            grad_w = _Pair.apply(
                torch.cat([field, grad], dim=1), torch.cat([grad_phi, values], dim=1), ctx.stencil
            )
        if ctx.needs_input_grad[1]:
            grad_v = _Interpolate.apply(weights, grad, ctx.stencil)
        return grad_w, grad_v, None


class _InterpolatePaired(torch.autograd.Function):
    """:class:`_Interpolate` whose weight gradient :class:`_AssignPaired` computes."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        weights: torch.Tensor,
        mesh: torch.Tensor,
        field_slot: torch.Tensor,
        grad_slot: torch.Tensor,
        stencil: _Stencil,
    ) -> torch.Tensor:
        ctx.stencil = stencil
        ctx.save_for_backward(weights, mesh)
        return stencil.interpolation(weights) @ mesh

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        weights, mesh = ctx.saved_tensors
        grad_m = None
        if ctx.needs_input_grad[1]:
            grad_m = _Assign.apply(weights, grad, ctx.stencil)
        # the weight gradient P(mesh, grad) is paired with the assignment's
        field = mesh if ctx.needs_input_grad[2] else None
        grad_phi = grad if ctx.needs_input_grad[3] else None
        return None, grad_m, field, grad_phi, None


class _Pair(torch.autograd.Function):
    r"""Stencil products :math:`P_{is} = \sum_c h_{ic} M_{f_{is}c}` ([n_atoms, p³]): the
    weight gradient of both :class:`_Assign` and :class:`_Interpolate`.
    """

    @staticmethod
    def forward(ctx, mesh: torch.Tensor, values: torch.Tensor, stencil: _Stencil) -> torch.Tensor:  # type: ignore[override]
        ctx.stencil = stencil
        ctx.save_for_backward(mesh, values)
        if stencil.repeats:
            # sampled_addmm wants distinct columns per row: gather the stencil in chunks
            n_atoms, points = stencil.n_atoms, stencil.points
            chunk = max(1, (1 << 22) // max(1, points * mesh.shape[1]))
            parts = []
            for i in range(0, n_atoms, chunk):
                rows = stencil.flat[i : i + chunk]
                picked = mesh.index_select(0, rows.reshape(-1)).view(rows.shape[0], points, -1)
                parts.append(torch.bmm(picked, values[i : i + chunk, :, None]).squeeze(2))
            return torch.cat(parts) if parts else values.new_zeros((0, points))
        # the values of the pattern are not read (beta = 0)
        pattern = stencil.pattern(values.dtype)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support", category=UserWarning)
            out = torch.sparse.sampled_addmm(pattern, values, mesh.t(), beta=0.0)
        return out.values().reshape(stencil.n_atoms, stencil.points)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        mesh, values = ctx.saved_tensors
        grad_m = grad_v = None
        if ctx.needs_input_grad[0]:
            grad_m = _Assign.apply(grad, values, ctx.stencil)
        if ctx.needs_input_grad[1]:
            grad_v = _Interpolate.apply(grad, mesh, ctx.stencil)
        return grad_m, grad_v, None


def _mesh_layout(counts: torch.Tensor) -> Tuple[List[List[int]], List[List[int]], torch.Tensor, int]:
    """Graphs grouped by mesh shape, their mesh counts, each graph's offset in the flat
    mesh buffer [G] and the buffer's length (mesh points of all graphs).
    """
    counts_list: List[List[int]] = counts.tolist()
    groups, order_list = _shape_groups(counts_list)
    sizes = counts.prod(dim=1)
    order_t = torch.tensor(order_list, dtype=torch.int64, device=counts.device)
    sorted_sizes = sizes[order_t]
    sorted_offsets = torch.cumsum(sorted_sizes, 0) - sorted_sizes
    offsets = torch.zeros_like(sizes).index_copy(0, order_t, sorted_offsets)
    return groups, counts_list, offsets, int(sizes.sum())


def _stencil(
    x: torch.Tensor,
    counts: torch.Tensor,
    batch: torch.Tensor,
    offsets: torch.Tensor,
    order: int,
    index_dtype: torch.dtype = torch.int64,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mesh rows ``flat`` [n_atoms, p³] (``index_dtype``) and weights ``W`` [n_atoms, p³]
    of every atom's stencil, point (a, b, c) at ``a·p² + b·p + c``.
    """
    n_atoms = x.shape[0]
    p = order
    base, w = bspline_weights(x, p)
    n = counts[batch].to(index_dtype)  # [N, 3]
    ks = torch.arange(p, device=x.device, dtype=index_dtype)
    idx = torch.remainder(base.to(index_dtype)[:, :, None] - ks, n[:, :, None])  # [N, 3, p]
    start = offsets.to(index_dtype)[batch][:, None]
    row = (idx[:, 0] * (n[:, 1] * n[:, 2])[:, None] + start)[:, :, None, None]
    plane = (idx[:, 1, :, None] * n[:, 2, None, None] + idx[:, 2, None, :])[:, None]  # [N, 1, p, p]
    flat = (row + plane).reshape(n_atoms, p * p * p)
    weights = (w[:, 0, :, None, None] * w[:, 1, None, :, None] * w[:, 2, None, None, :]).reshape(
        n_atoms, p * p * p
    )
    return flat, weights


def _assign_indexed(flat: torch.Tensor, weights: torch.Tensor, values: torch.Tensor, total: int, order: int):
    """Mesh values [total, C] by ``index_add`` in p chunks (the TorchScript path)."""
    n_atoms, nchan = values.shape[0], values.shape[1]
    p2 = order * order
    flat_c = flat.view(n_atoms, order, p2)
    w_c = weights.view(n_atoms, order, p2)
    mesh = torch.zeros((total, nchan), dtype=values.dtype, device=values.device)
    for a in range(order):
        contrib = torch.bmm(w_c[:, a, :, None], values[:, None, :]).reshape(-1, nchan)
        mesh.index_add_(0, flat_c[:, a].reshape(-1), contrib)
    return mesh


def _interpolate_indexed(flat: torch.Tensor, weights: torch.Tensor, mesh: torch.Tensor, order: int):
    """Values at the atoms [n_atoms, C] by ``index_select`` in p chunks (TorchScript path)."""
    n_atoms, nchan = flat.shape[0], mesh.shape[1]
    p2 = order * order
    flat_c = flat.view(n_atoms, order, p2)
    w_c = weights.view(n_atoms, order, p2)
    phi = torch.zeros((n_atoms, nchan), dtype=mesh.dtype, device=mesh.device)
    for a in range(order):
        picked = mesh.index_select(0, flat_c[:, a].reshape(-1)).reshape(n_atoms, p2, nchan)
        phi = phi + torch.bmm(w_c[:, a, None, :], picked).squeeze(1)
    return phi


def _filter_mesh(
    mesh: torch.Tensor,
    groups: List[List[int]],
    counts_list: List[List[int]],
    box: torch.Tensor,
    widths: torch.Tensor,
    amplitudes: torch.Tensor,
    order: int,
    coulomb: bool,
) -> torch.Tensor:
    """The filtered field [total, C] of mesh values [total, C] (FFT once per mesh shape)."""
    device = mesh.device
    nchan = mesh.shape[1]
    volume = torch.linalg.det(box).abs()
    out_parts: List[torch.Tensor] = []
    begin = 0
    for members in groups:
        gs = len(members)
        c = counts_list[members[0]]
        n0, n1, n2 = c[0], c[1], c[2]
        points = n0 * n1 * n2
        block = mesh[begin : begin + gs * points].view(gs, points, nchan)
        begin += gs * points
        member_t = torch.tensor(members, dtype=torch.int64, device=device)
        filt = _kspace_filter(box[member_t], n0, n1, n2, widths, amplitudes, order, coulomb)
        scale = (float(points) / volume[member_t])[:, None, None, None, None]
        # a few channels at a time (about 2^20 mesh values): one large batched FFT is
        # slower than a loop over cache-sized ones
        # (split, not slices: their gradients are one concatenation, not a zero-filled
        # copy of the whole block per chunk)
        step = max(1, min(nchan, (1 << 20) // (gs * points)))
        # channels first, so that the FFTs run over contiguous memory
        parts = block.transpose(1, 2).reshape(gs, nchan, n0, n1, n2).split(step, dim=1)
        filters = [filt] * len(parts) if filt.shape[1] == 1 else filt.split(step, dim=1)
        fields: List[torch.Tensor] = []
        for part, f_part in zip(parts, filters):
            rho = torch.fft.rfftn(part, dim=[2, 3, 4])
            field = torch.fft.irfftn(rho * f_part, s=[n0, n1, n2], dim=[2, 3, 4]) * scale
            fields.append(field.reshape(gs, part.shape[1], points).transpose(1, 2))
        # back to channels last: one copy (the concatenation, or the reshape of one chunk)
        field = fields[0] if len(fields) == 1 else torch.cat(fields, dim=2)
        out_parts.append(field.reshape(-1, nchan))
    return out_parts[0] if len(out_parts) == 1 else torch.cat(out_parts, dim=0)


@torch.jit.unused
def _convolve_sparse(
    x: torch.Tensor,
    values: torch.Tensor,
    counts: torch.Tensor,
    batch: torch.Tensor,
    offsets: torch.Tensor,
    total: int,
    groups: List[List[int]],
    counts_list: List[List[int]],
    box: torch.Tensor,
    widths: torch.Tensor,
    amplitudes: torch.Tensor,
    order: int,
    coulomb: bool,
) -> torch.Tensor:
    """Eager path: assignment and interpolation as CSR products (:class:`_Assign`,
    :class:`_Interpolate`), whose gradients recompute the stencil products instead of
    saving [n_atoms·p³, C] of them.
    """
    # atoms in mesh order (by the mesh cell they are in), so that neighbouring rows of both
    # products touch neighbouring mesh rows (cache reuse on large meshes)
    n = counts[batch]
    cell = torch.remainder(torch.floor(x.detach()).to(torch.int64), n)
    key = (cell[:, 0] * n[:, 1] + cell[:, 1]) * n[:, 2] + cell[:, 2] + offsets[batch]
    atom_order = torch.argsort(key)
    inverse = torch.empty_like(atom_order)
    inverse[atom_order] = torch.arange(atom_order.shape[0], device=atom_order.device)
    index_dtype = torch.int32 if total * 2 < 2**31 and x.shape[0] * order**3 < 2**31 else torch.int64
    flat, weights = _stencil(
        x.index_select(0, atom_order), counts, batch.index_select(0, atom_order), offsets, order, index_dtype
    )
    stencil = _Stencil(flat, total, min(min(c) for c in counts_list) < order)
    stencil.keep(weights)
    mesh, field_slot, grad_slot = _AssignPaired.apply(weights, values.index_select(0, atom_order), stencil)
    field = _filter_mesh(mesh, groups, counts_list, box, widths, amplitudes, order, coulomb)
    phi = _InterpolatePaired.apply(weights, field, field_slot, grad_slot, stencil)
    return phi.index_select(0, inverse)


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
    groups, counts_list, offsets, total = _mesh_layout(counts)
    if torch.jit.is_scripting():
        flat, weights = _stencil(x, counts, batch, offsets, order)
        mesh = _assign_indexed(flat, weights, values, total, order)
        field = _filter_mesh(mesh, groups, counts_list, box, widths, amplitudes, order, coulomb)
        phi = _interpolate_indexed(flat, weights, field, order)
    else:
        phi = _convolve_sparse(
            x,
            values,
            counts,
            batch,
            offsets,
            total,
            groups,
            counts_list,
            box,
            widths,
            amplitudes,
            order,
            coulomb,
        )
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
