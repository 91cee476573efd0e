r"""Mesh — a learned k-space filter of atom features on a mesh of fixed spacing (P³M-like).

Each atom's invariant features give C channel values :math:`h_{ic}`. They are spread to a
periodic mesh with B-spline weights of order p, Fourier transformed, multiplied by a
learned rotation-invariant filter and transformed back; the result is interpolated to
the atoms with the same weights (physics.md, "Nonlocal architectures"):

.. math:: \phi_{ic} = \frac{1}{V} \sum_{\mathbf k} f_c(|\mathbf k|)\,
          \hat h_c(\mathbf k)\, e^{i\mathbf k\cdot\mathbf r_i},
   \qquad \hat h_c(\mathbf k) = \sum_j h_{jc}\, e^{-i\mathbf k\cdot\mathbf r_j},

   f_c(k) = \lambda \sum_b w_{cb}\, (2\pi s_b^2)^{3/2} e^{-s_b^2 k^2/2},
   \quad \sigma = s_1 < s_2 < \dots < s_B = s_{\max} .

In real space the filter is a sum of Gaussians :math:`\lambda w_{cb} e^{-r^2/2s_b^2}` of
widths :math:`s_b` (Å) peaking at λ w (λ = ``feature_scale``; unit-integral Gaussians made
φ from 8 Å away ~1e-4 of the features and the block learned nothing in tutorial 6), so
its reach is finite (a few :math:`s_{\max}`) and the k = 0 term is kept (it is the
integral of the kernel). The block energy is an MLP of :math:`(h_i, \phi_i)` per atom
(with ``products``, also of :math:`h_i \odot \phi_i`, which makes the far field's effect
on an atom depend on the atom's own environment at first order), summed per graph, times the
straight-through coupling γ = max(a, 0) (``coupling_init``, default 1). The MLP's last
layer is zero-initialised, so the block is exactly silent at initialisation while the last
layer (and through it everything else) gets gradients.

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
  :math:`U = \prod_a \operatorname{sinc}^p(\pi m_a/n_a)`); what remains is the aliasing of
  the splines, which for the narrowest filter Gaussian (σ = ``smearing``) is about
  :math:`C_p (h/\sigma)^p` of the field (C_4 ≈ 0.02 … C_8 ≈ 0.0015, measured). It is the
  residual of the exact symmetries the mesh breaks (rotating an open molecule on the
  mesh, a supercell whose counts are not multiples). At the defaults (h = 1 Å, σ = 2 Å,
  p = 4) a 2×2×2 supercell of a 5 Å cell (6 → 10 points per direction) is off by 9e-7;
  ``accuracy=ε`` chooses h = σ (ε/C_p)^{1/p} instead of ``spacing``: with ``order=6,
  accuracy=1e-6`` (h = 0.50 Å at σ = 2 Å; ~8× the mesh points and 3.4× the stencil of the
  defaults) the same check on a non-commensurate mesh gives ≤ 1.2e-9 (tested at 1e-8).

Batching: every graph has its own mesh in one flat buffer; spreading and interpolation
are scatter/gather operations over all atoms of the batch, and the FFTs run once per
distinct mesh shape (graphs of equal shape share one batched FFT; the Python loop is over
shapes, not graphs). The mesh machinery is :func:`mace_lr.nn.mesh_convolution`, shared
with the ``attention`` block.

With ``kernel="coulomb"``, :meth:`MeshBlock.mesh_potential` applies
:math:`k_e\,4\pi/k^2\, e^{-\sigma^2k^2/2}` (k = 0 excluded) instead of the learned filter:
the k-space potential of Gaussian charges of width σ, which is the whole Coulomb
potential of those charges once σ is the Ewald splitting width (the reference test). For
open and slab structures the dipole term of a vacuum surrounding is added (the box sum
without k = 0 is that of a conducting surrounding), for neutral charges.
"""

import logging
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from mace_lr import LongRangeBlock
from mace_lr.electrostatics import COULOMB_CONSTANT
from mace_lr.nn import (
    bspline_weights,
    graph_sum,
    mesh_convolution,
    mesh_geometry,
    mesh_spacing_for,
    scalar_feature_indices,
    straight_through_coupling,
)

__all__ = ["MeshBlock", "bspline_weights"]

logger = logging.getLogger(__name__)


class MeshBlock(LongRangeBlock):
    r"""Learned mesh (P³M-like) nonlocal block.

    Args:
        feature_irreps: irreps of the base model's ``node_feats``.
        atomic_numbers: elements of the base model.
        r_max: base-model cutoff, Å.
        channels: number C of mesh channels (default 8).
        spacing: mesh spacing h, Å (default 1.0).
        smearing: smallest Gaussian width σ of the filter, Å (default 2.0).
        max_width: largest Gaussian width s_max of the filter, Å: the reach (default 6.0).
        num_basis: number B of Gaussian widths, log-spaced from σ to s_max (default 6).
        order: B-spline order p (default 4; 5 or 6 are ~2× and ~3.4× slower and 10× more accurate).
        accuracy: if given, the spacing is chosen for this relative discretisation error
            of the mesh field (:func:`mace_lr.nn.mesh_spacing_for` at ``smearing`` and
            ``order``; must be given with order 4 … 8) and ``spacing`` is ignored. Default
            None (use ``spacing``).
        padding: vacuum on each side of open structures (and of slabs along the normal),
            Å (default None: ``3.5·max_width + order·spacing``, images' kernel tail below
            e^{-24}; ``√(2 ln(1/ε))·max_width/2 + order·spacing/2`` keeps it below ε).
        feature_scale: real-space peak of each filter Gaussian per unit weight
            (default 0.1; a constant, like attention's).
        hidden: width of the energy MLP's hidden layer (default 32).
        products: give the energy MLP the products :math:`h_{ic}\phi_{ic}` besides
            :math:`(h_i, \phi_i)` (default False): the non-additive part of the energy
            (how an atom's own environment responds to the far field) is then first order
            in φ, which an MLP of :math:`(h, \phi)` reaches only through its curvature. In a
            direct fit of tutorial 6's quartets it started learning at epoch 9 instead of 13
            (one seed each), but it also carries the mesh discretisation error into the
            energy more strongly (rotating an open molecule: 5.2e-5 relative against ≤ 5e-5).
        coupling_init: initial coupling parameter ``a`` (default 1). Identity at init comes
            from the zero-initialised last readout layer, not from ``a``: with a = 0 the
            gate γ = max(a, 0) blocks every gradient but that of ``a``, and ``a`` drifted
            below 0 in the tutorial-6 fine-tune (the block stayed off).
    """

    name = "mesh"

    def __init__(
        self,
        feature_irreps: str,
        atomic_numbers: Sequence[int],
        r_max: float,
        channels: int = 8,
        spacing: float = 1.0,
        smearing: float = 2.0,
        max_width: float = 6.0,
        num_basis: int = 6,
        order: int = 4,
        accuracy: Optional[float] = None,
        padding: Optional[float] = None,
        feature_scale: float = 0.1,
        hidden: int = 32,
        coupling_init: float = 1.0,
        products: bool = False,
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
            accuracy=None if accuracy is None else float(accuracy),
            padding=None if padding is None else float(padding),
            feature_scale=float(feature_scale),
            hidden=int(hidden),
            coupling_init=float(coupling_init),
            products=bool(products),
        )
        self.channels = int(channels)
        self.spacing = (
            float(spacing)
            if accuracy is None
            else mesh_spacing_for(float(smearing), int(order), float(accuracy))
        )
        self.smearing = float(smearing)
        self.max_width = float(max_width)
        self.feature_scale = float(feature_scale)
        self.products = bool(products)
        self.order = int(order)
        self.coulomb_constant = float(COULOMB_CONSTANT)
        if padding is not None and padding <= 0:
            raise ValueError(f"mesh `padding` must be > 0 Å, got {padding}")
        self.padding = 3.5 * self.max_width + self.order * self.spacing if padding is None else float(padding)
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
            torch.nn.Linear((3 if products else 2) * self.channels, hidden),
            torch.nn.SiLU(),
            torch.nn.Linear(hidden, 1),
        )
        torch.nn.init.zeros_(self.readout[2].weight)
        torch.nn.init.zeros_(self.readout[2].bias)
        self.coupling = torch.nn.Parameter(torch.tensor(float(coupling_init)))

    # ------------------------------------------------------------------ mesh
    def mesh_geometry(
        self,
        positions: torch.Tensor,
        cell: torch.Tensor,
        pbc: torch.Tensor,
        batch: torch.Tensor,
        ptr: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Box [G, 3, 3] Å, even mesh counts [G, 3] and mesh coordinates [n_atoms, 3]
        (:func:`mace_lr.nn.mesh_geometry` at this block's spacing and padding).
        """
        return mesh_geometry(positions, cell, pbc, batch, ptr, self.spacing, self.padding)

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
            [n_atoms, C] :math:`\phi_{ic}` in u (learned) or V (coulomb).
        """
        dtype = values.dtype
        if kernel == "coulomb":
            widths = torch.full((1,), self.smearing, dtype=dtype, device=values.device)
            amplitudes = torch.full((1, 1), self.coulomb_constant, dtype=dtype, device=values.device)
        elif kernel == "learned":
            widths = self.widths.to(dtype)
            # each basis Gaussian peaks at feature_scale in real space (not unit integral),
            # so that φ carries features from s_max away at O(1), not O(1/(2π s_max²)^{3/2})
            peak = (2.0 * math.pi * widths * widths) ** 1.5 * self.feature_scale
            amplitudes = self.filter_weights.to(dtype) * peak[:, None]
        else:
            raise ValueError(f"mesh kernel must be 'learned' or 'coulomb', got '{kernel}'")
        phi, box = mesh_convolution(
            positions,
            values,
            cell,
            pbc,
            batch,
            ptr,
            widths,
            amplitudes,
            self.spacing,
            self.order,
            self.padding,
            kernel == "coulomb",
        )
        if kernel == "coulomb":
            volume = torch.linalg.det(box).abs()
            phi = phi + self._vacuum_correction(positions, values, pbc, batch, ptr, box, volume)
        return phi

    def _vacuum_correction(
        self,
        positions: torch.Tensor,
        values: torch.Tensor,
        pbc: torch.Tensor,
        batch: torch.Tensor,
        ptr: torch.Tensor,
        box: torch.Tensor,
        volume: torch.Tensor,
    ) -> torch.Tensor:
        """Potential [N, C] V of the dipole term that turns the box sum into open boundaries.

        The k-space sum without k = 0 is the energy in a conducting surrounding; vacuum
        around the box adds k_e 2π M²/(3V) (open) or k_e 2π M_n²/V (slab, M_n along the
        slab normal), M the dipole of the box (neutral charges).
        """
        num_graphs = ptr.shape[0] - 1
        dtype = positions.dtype
        natoms = (ptr[1:] - ptr[:-1]).to(dtype).clamp(min=1.0)
        centroid = graph_sum(positions, batch, num_graphs) / natoms[:, None]
        rel = positions - centroid[batch]
        n_periodic = pbc.to(torch.bool).sum(dim=1)
        # open: all three directions with weight 1/3; slab: the normal (last box row
        # along the open direction) with weight 1
        open_dir = (~pbc.to(torch.bool)).to(dtype)  # [G, 3]
        normal = box / torch.linalg.norm(box, dim=-1, keepdim=True)  # [G, 3, 3]
        proj = torch.einsum("nd,nad->na", rel, normal[batch]) * open_dir[batch]  # [N, 3]
        weight = torch.where(
            n_periodic == 0, torch.full_like(natoms, 1.0 / 3.0), torch.where(n_periodic == 2, 1.0, 0.0)
        )
        dipole = graph_sum(values[:, :, None] * proj[:, None, :], batch, num_graphs)  # [G, C, 3]
        scale = self.coulomb_constant * 4.0 * math.pi * weight / volume  # [G]
        return scale[batch][:, None] * (dipole[batch] * proj[:, None, :]).sum(-1)

    # ------------------------------------------------------------------ block
    def gamma(self) -> torch.Tensor:
        """Coupling γ = max(a, 0), with the gradient of ``a`` passed straight through."""
        return straight_through_coupling(self.coupling)

    def forward(self, ctx: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        positions = ctx["positions"]
        dtype = positions.dtype
        h = self.embed(ctx["node_feats"][:, self.scalar_index]).to(dtype)
        phi = self.mesh_potential(positions, h, ctx["cell"], ctx["pbc"], ctx["batch"], ctx["ptr"])
        inputs = [h, phi, h * phi] if self.products else [h, phi]
        per_atom = self.readout(torch.cat(inputs, dim=-1)).squeeze(-1)
        num_graphs = ctx["ptr"].shape[0] - 1
        energy = self.gamma().to(dtype) * graph_sum(per_atom, ctx["batch"], num_graphs)
        return {"energy": energy, "features": phi}
