r"""Mesh — a learned k-space filter of atom features on a mesh of fixed spacing (P³M-like).

Each atom's invariant features give C channel values :math:`h_{ic}`. They are spread to a
periodic mesh with B-spline weights of order p, Fourier transformed, multiplied by a
learned rotation-invariant filter and transformed back; the result is interpolated to
the atoms with the same weights (physics.md, "Nonlocal architectures"):

.. math:: \phi_{ic} = \frac{1}{V} \sum_{\mathbf k} f_c(|\mathbf k|)\,
          \hat h_c(\mathbf k)\, e^{i\mathbf k\cdot\mathbf r_i},
   \qquad \hat h_c(\mathbf k) = \sum_j h_{jc}\, e^{-i\mathbf k\cdot\mathbf r_j},

   f_c(k) = e^{-\sigma^2 k^2/2} \sum_b w_{cb}\, e^{-(s_b^2-\sigma^2) k^2/2},
   \quad \sigma = s_1 < s_2 < \dots < s_B = s_{\max} .

In real space the filter is a sum of normalised Gaussians of widths :math:`s_b` (Å), so
its reach is finite (a few :math:`s_{\max}`) and the k = 0 term is kept (it is the
integral of the kernel). The block energy is an MLP of :math:`(h_i, \phi_i)` per atom,
summed per graph, times the straight-through coupling γ = max(a, 0) (``coupling_init``,
default 0): the block is exactly silent at initialisation and its parameters still get
gradients.

Geometry (all differentiable, so forces, stress and field derivatives are exact):

* Mesh counts per direction are ``2·ceil(L/(2h))`` for mesh spacing h (Å): always even,
  chosen from the cell lengths of periodic directions and from the atoms' extent plus a
  vacuum padding of ``3.5·s_max + p·h`` per side for open directions (open molecules and
  the vacuum direction of slabs), so that no atom sees another atom's periodic image
  through the kernel (its tail is below e^{-24} there). The box length of an open
  direction is exactly ``n·h``.
* The mesh origin is the atoms' centroid. Translating the structure therefore moves the
  mesh with it (exact translation invariance), and the centroid's dependence on the
  positions is part of the autograd graph. A rotation of a periodic cell together with
  its atoms leaves every fractional coordinate unchanged (exact); a rotation of an open
  molecule changes how it sits on the mesh, which changes the energy by the mesh
  discretisation error (measured in ``tests/test_mesh.py``).
* Supercells: when a cell length is an even multiple of the spacing, an m×m×m
  supercell has exactly m times the counts and the same mesh points (the centroid
  moves by (m−1)/2 lattice vectors, a whole number of mesh steps because counts are
  even), so E(supercell) = m³ E(cell) to rounding. Otherwise the two meshes differ and
  the identity holds to the discretisation error.
* Discretisation: the mesh density of a smooth field is corrected by the B-spline
  transform (the filter is divided by :math:`U(\mathbf k)^2`,
  :math:`U = \prod_a \operatorname{sinc}^p(\pi m_a/n_a)`); the error falls like
  :math:`(h/2\pi\sigma)^p`. ``spacing ≤ σ/2`` and ``order ≥ 6`` give ~1e-6 relative.

Batching: every graph has its own mesh in one flat buffer; spreading and interpolation
are single scatter/gather operations over all atoms of the batch, and the FFTs run once
per distinct mesh shape (graphs of equal shape share one batched FFT; the Python loop is
over shapes, not graphs).

With ``kernel="coulomb"``, :meth:`MeshBlock.mesh_potential` applies
:math:`k_e\,4\pi/k^2\, e^{-\sigma^2k^2/2}` (k = 0 excluded) instead of the learned filter:
the k-space potential of Gaussian charges of width σ, which is the whole Coulomb
potential of those charges once σ is the Ewald splitting width (the reference test).
"""

import logging
import math
from typing import Any, Dict, List, Sequence, Tuple

import torch

from mace_lr import LongRangeBlock
from mace_lr.electrostatics import COULOMB_CONSTANT
from mace_lr.nn import graph_sum, scalar_feature_indices, straight_through_coupling

logger = logging.getLogger(__name__)


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


class MeshBlock(LongRangeBlock):
    """Learned mesh (P³M-like) nonlocal block.

    Args:
        feature_irreps: irreps of the base model's ``node_feats``.
        atomic_numbers: elements of the base model.
        r_max: base-model cutoff, Å.
        channels: number C of mesh channels (default 8).
        spacing: mesh spacing h, Å (default 0.75).
        smearing: smallest Gaussian width σ of the filter, Å (default 1.5).
        max_width: largest Gaussian width s_max of the filter, Å: the reach (default 6.0).
        num_basis: number B of Gaussian widths, log-spaced from σ to s_max (default 6).
        order: B-spline order p (default 6).
        hidden: width of the energy MLP's hidden layer (default 32).
        coupling_init: initial coupling parameter ``a`` (0: identity at init).
    """

    name = "mesh"

    def __init__(
        self,
        feature_irreps: str,
        atomic_numbers: Sequence[int],
        r_max: float,
        channels: int = 8,
        spacing: float = 0.75,
        smearing: float = 1.5,
        max_width: float = 6.0,
        num_basis: int = 6,
        order: int = 6,
        hidden: int = 32,
        coupling_init: float = 0.0,
        **config: Any,
    ) -> None:
        if config:
            raise TypeError(f"unknown mesh option(s): {', '.join(sorted(config))}")
        if spacing <= 0:
            raise ValueError(f"mesh `spacing` must be > 0 Å, got {spacing}")
        if smearing <= 0 or max_width < smearing:
            raise ValueError(
                f"mesh filter widths need 0 < smearing <= max_width, got smearing={smearing}, "
                f"max_width={max_width}"
            )
        if not 2 <= int(order) <= 10:
            raise ValueError(f"mesh `order` must be between 2 and 10, got {order}")
        if int(channels) < 1 or int(num_basis) < 1:
            raise ValueError(f"mesh `channels` and `num_basis` must be >= 1, got {channels}, {num_basis}")
        super().__init__(
            feature_irreps,
            atomic_numbers,
            r_max,
            channels=int(channels),
            spacing=float(spacing),
            smearing=float(smearing),
            max_width=float(max_width),
            num_basis=int(num_basis),
            order=int(order),
            hidden=int(hidden),
            coupling_init=float(coupling_init),
        )
        self.channels = int(channels)
        self.spacing = float(spacing)
        self.smearing = float(smearing)
        self.max_width = float(max_width)
        self.order = int(order)
        self.coulomb_constant = float(COULOMB_CONSTANT)
        self.padding = 3.5 * self.max_width + self.order * self.spacing
        scalars: List[int] = scalar_feature_indices(feature_irreps)
        if not scalars:
            raise ValueError(f"feature irreps {feature_irreps!r} have no invariant (0e) channels")
        self.register_buffer("scalar_index", torch.tensor(scalars, dtype=torch.int64), persistent=False)
        if int(num_basis) == 1:
            widths = [self.smearing]
        else:
            ratio = math.log(self.max_width / self.smearing) / (int(num_basis) - 1)
            widths = [self.smearing * math.exp(ratio * b) for b in range(int(num_basis))]
        self.register_buffer("widths", torch.tensor(widths), persistent=False)
        self.embed = torch.nn.Linear(len(scalars), self.channels)
        self.filter_weights = torch.nn.Parameter(
            torch.eye(int(num_basis), self.channels) + 0.1 * torch.randn(int(num_basis), self.channels)
        )
        self.readout = torch.nn.Sequential(
            torch.nn.Linear(2 * self.channels, hidden),
            torch.nn.SiLU(),
            torch.nn.Linear(hidden, 1),
        )
        self.coupling = torch.nn.Parameter(torch.tensor(float(coupling_init)))

    # ------------------------------------------------------------------ geometry
    def mesh_geometry(
        self,
        positions: torch.Tensor,
        cell: torch.Tensor,
        pbc: torch.Tensor,
        batch: torch.Tensor,
        ptr: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Box, mesh counts and mesh coordinates of every atom.

        Args:
            positions: [n_atoms, 3] Å.
            cell: [G, 3, 3] Å, rows are lattice vectors (ignored along open directions).
            pbc: [G, 3] bool.
            batch: [n_atoms] int64 graph index.
            ptr: [G + 1] int64 atom offsets.

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
        centroid = graph_sum(positions, batch, num_graphs) / natoms[:, None]
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
        open_length = 2.0 * (dev + self.padding)
        lengths = torch.linalg.norm(cell.detach(), dim=-1)
        need = torch.where(periodic, lengths, open_length)
        counts = 2 * torch.ceil(need / (2.0 * self.spacing) - 1e-6).to(torch.int64)
        counts = counts.clamp(min=2 * ((self.order + 1) // 2 + 1))
        open_box = axes * (counts.to(dtype) * self.spacing)[:, :, None]
        box = torch.where(periodic[:, :, None], cell, open_box)
        frac = torch.linalg.solve(box[batch].transpose(1, 2), rel.unsqueeze(-1)).squeeze(-1)
        x = frac * counts[batch].to(dtype)
        return box, counts, x

    # ------------------------------------------------------------------ mesh maps
    def _stencil(
        self, x: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor, batch: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Flat mesh indices [N·p³] and B-spline weights [N, p³] of every atom's stencil."""
        base, w = bspline_weights(x, self.order)
        n = counts[batch]  # [N, 3]
        p = self.order
        ks = torch.arange(p, device=x.device)
        idx = torch.remainder(base[:, :, None] - ks, n[:, :, None])  # [N, 3, p]
        flat = (
            (idx[:, 0, :, None, None] * n[:, 1, None, None, None] + idx[:, 1, None, :, None])
            * n[:, 2, None, None, None]
            + idx[:, 2, None, None, :]
            + offsets[batch][:, None, None, None]
        )
        weights = w[:, 0, :, None, None] * w[:, 1, None, :, None] * w[:, 2, None, None, :]
        return flat.reshape(-1), weights.reshape(-1, p * p * p)

    def mesh_potential(
        self,
        positions: torch.Tensor,
        values: torch.Tensor,
        cell: torch.Tensor,
        pbc: torch.Tensor,
        batch: torch.Tensor,
        ptr: torch.Tensor,
        kernel: str = "learned",
    ) -> torch.Tensor:
        r"""Filtered field of per-atom values at every atom (the mesh part of the block).

        Args:
            positions: [n_atoms, 3] Å.
            values: [n_atoms, C] per-atom channel values (any unit u).
            cell: [G, 3, 3] Å, rows are lattice vectors.
            pbc: [G, 3] bool.
            batch: [n_atoms] int64 graph index.
            ptr: [G + 1] int64 atom offsets.
            kernel: ``"learned"`` (the block's filter f_c, C = ``channels``) or
                ``"coulomb"`` (:math:`k_e 4\pi/k^2 e^{-\sigma^2k^2/2}`, k = 0 excluded, any C;
                with charges in e the result is a potential in V that includes each
                charge's own smeared field :math:`k_e\sqrt{2/\pi}\,q_i/\sigma`).

        Returns:
            [n_atoms, C] :math:`\phi_{ic}` in u/Å³ (learned) or V (coulomb).
        """
        box, counts, x = self.mesh_geometry(positions, cell, pbc, batch, ptr)
        num_graphs = ptr.shape[0] - 1
        sizes = counts.prod(dim=1)
        counts_list: List[List[int]] = counts.tolist()
        # graphs with equal mesh shapes are stored next to each other
        key_base = 1 << 20
        keys: List[int] = [(c[0] * key_base + c[1]) * key_base + c[2] for c in counts_list]
        groups: Dict[int, List[int]] = {}
        for g in range(num_graphs):
            k = keys[g]
            if k in groups:
                groups[k].append(g)
            else:
                groups[k] = [g]
        order_list: List[int] = []
        for k in sorted(groups.keys()):
            order_list.extend(groups[k])
        order_t = torch.tensor(order_list, dtype=torch.int64, device=positions.device)
        sorted_sizes = sizes[order_t]
        sorted_offsets = torch.cumsum(sorted_sizes, 0) - sorted_sizes
        offsets = torch.zeros_like(sizes).index_copy(0, order_t, sorted_offsets)
        total = int(sizes.sum())
        nchan = values.shape[1]

        index, weights = self._stencil(x, counts, offsets, batch)
        contrib = (weights[:, :, None] * values[:, None, :]).reshape(-1, nchan)
        mesh = torch.zeros((total, nchan), dtype=values.dtype, device=values.device)
        mesh.index_add_(0, index, contrib)

        volume = torch.linalg.det(box).abs()
        out_parts: List[torch.Tensor] = []
        start = 0
        for k in sorted(groups.keys()):
            members = groups[k]
            gs = len(members)
            c = counts_list[members[0]]
            n0, n1, n2 = c[0], c[1], c[2]
            block = mesh[start : start + gs * n0 * n1 * n2].reshape(gs, n0, n1, n2, nchan)
            start += gs * n0 * n1 * n2
            member_t = torch.tensor(members, dtype=torch.int64, device=positions.device)
            gbox = box[member_t]
            filt = self._kspace_filter(gbox, n0, n1, n2, kernel, values.dtype)  # [gs, n0, n1, n2h, C|1]
            rho = torch.fft.rfftn(block, dim=[1, 2, 3])
            field = torch.fft.irfftn(rho * filt, s=[n0, n1, n2], dim=[1, 2, 3])
            scale = float(n0 * n1 * n2) / volume[member_t]
            out_parts.append((field * scale[:, None, None, None, None]).reshape(-1, nchan))
        field_mesh = torch.cat(out_parts, dim=0)

        picked = field_mesh.index_select(0, index).reshape(weights.shape[0], weights.shape[1], nchan)
        phi = (weights[:, :, None] * picked).sum(1)
        return phi

    def _kspace_filter(
        self, box: torch.Tensor, n0: int, n1: int, n2: int, kernel: str, dtype: torch.dtype
    ) -> torch.Tensor:
        """Filter on the rfft grid [gs, n0, n1, n2//2+1, C or 1], divided by U(k)²."""
        device = box.device
        m0 = torch.fft.fftfreq(n0, d=1.0 / n0, device=device, dtype=dtype)
        m1 = torch.fft.fftfreq(n1, d=1.0 / n1, device=device, dtype=dtype)
        m2 = torch.fft.rfftfreq(n2, d=1.0 / n2, device=device, dtype=dtype)
        grid = torch.stack(torch.meshgrid([m0, m1, m2], indexing="ij"), dim=-1)  # [n0, n1, n2h, 3]
        recip = 2.0 * math.pi * torch.linalg.inv(box).transpose(1, 2)  # [gs, 3, 3], rows b_j
        kvec = torch.einsum("xyzj,gjd->gxyzd", grid, recip)
        k2 = (kvec * kvec).sum(-1)  # [gs, n0, n1, n2h]
        p = self.order
        u = (
            self._sinc_power(m0, n0, 2 * p)[:, None, None]
            * self._sinc_power(m1, n1, 2 * p)[None, :, None]
            * self._sinc_power(m2, n2, 2 * p)[None, None, :]
        )
        if kernel == "coulomb":
            safe = torch.where(k2 > 0, k2, torch.ones_like(k2))
            f = torch.where(
                k2 > 0,
                self.coulomb_constant * 4.0 * math.pi / safe * torch.exp(-0.5 * self.smearing**2 * k2),
                torch.zeros_like(k2),
            )
            return (f / u).unsqueeze(-1)
        if kernel != "learned":
            raise ValueError(f"mesh kernel must be 'learned' or 'coulomb', got '{kernel}'")
        widths = self.widths.to(dtype)
        basis = torch.exp(-0.5 * k2.unsqueeze(-1) * widths**2)  # [gs, n0, n1, n2h, B]
        f = basis @ self.filter_weights.to(dtype)
        return f / u.unsqueeze(-1)

    @staticmethod
    def _sinc_power(m: torch.Tensor, n: int, power: int) -> torch.Tensor:
        """sinc(π m / n)^power (the B-spline transform along one direction)."""
        arg = math.pi * m / n
        safe = torch.where(arg == 0, torch.ones_like(arg), arg)
        return torch.where(arg == 0, torch.ones_like(arg), torch.sin(safe) / safe) ** power

    # ------------------------------------------------------------------ block
    def gamma(self) -> torch.Tensor:
        """Coupling γ = max(a, 0), with the gradient of ``a`` passed straight through."""
        return straight_through_coupling(self.coupling)

    def forward(self, ctx: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        positions = ctx["positions"]
        dtype = positions.dtype
        h = self.embed(ctx["node_feats"][:, self.scalar_index]).to(dtype)
        phi = self.mesh_potential(positions, h, ctx["cell"], ctx["pbc"], ctx["batch"], ctx["ptr"])
        per_atom = self.readout(torch.cat([h, phi], dim=-1)).squeeze(-1)
        num_graphs = ctx["ptr"].shape[0] - 1
        energy = self.gamma().to(dtype) * graph_sum(per_atom, ctx["batch"], num_graphs)
        return {"energy": energy, "features": phi}
