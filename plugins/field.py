r"""Field-coupled energy U(R, ℰ): the applied field as an equivariant l = 1 input.

Each atom carries K equivariant vectors :math:`\mathbf u_{ik}` (l = 1, odd parity) built
from its neighbourhood in the base model's graph, and from the base model's own 1o
features when it has them,

.. math:: \mathbf u_{ik} = \sum_{j \in \mathcal N(i)} R_k(r_{ij}, Z_j)\,\mathbf r_{ij}
          \;+\; \sum_c W_{kc}\,\mathbf v_{ic},

with a learned radial function :math:`R_k` (Bessel basis, smooth cutoff at the base model's
r_max, weights per neighbour element). The field enters through the invariants
:math:`x_{ik} = ℰ\cdot\mathbf u_{ik}` and :math:`|ℰ|^2`; the block energy is a polynomial in
the field whose coefficients are functions of the atom's invariant features :math:`s_i`:

.. math:: U = -\sum_i \Big[\sum_k \sum_{n=1}^{n_{\max}} \frac{c_{ikn}(s_i)}{n}\, x_{ik}^n
          + \tfrac12\, a_i(s_i)\, |ℰ|^2\Big] .

``order`` (n_max, default 3) sets the highest power of the field: 1 gives learned atomic
dipoles, 2 adds an anisotropic, geometry-dependent polarizability, 3 the first
hyperpolarizability. U vanishes at ℰ = 0 for any geometry, so the block never changes
zero-field energies and forces; its coefficient layers start at zero, so the model equals
its base at every field until trained (identity at initialisation).

Every response is a derivative of this one energy (the wrapper takes them by autograd):
dipole μ = −∂U/∂ℰ, Born charges Z_i = ∂F_i/∂ℰ, polarizability α = −∂²U/∂ℰ². Because the
vectors are built from relative positions only, U is translation invariant at every
field, so Σ_i Z_i = 0 for this block (the charge blocks add Q·I). The block's own dipole,
reported as ``dipole`` and ``atomic_dipoles``, is the closed-form −∂U/∂ℰ at the applied
field: a local, single-valued quantity, also in periodic cells.
"""

import logging
import math
from typing import Any, Dict, Sequence

import torch

from mace_lr import LongRangeBlock
from mace_lr.nn import (
    bessel_wavenumbers,
    feature_vectors,
    neighbour_vectors,
    scalar_feature_indices,
    vector_feature_indices,
)

logger = logging.getLogger(__name__)


class FieldBlock(LongRangeBlock):
    """Field-coupled energy block (learned U(R, ℰ), polynomial in the field).

    Args:
        feature_irreps: irreps of the base model's ``node_feats``.
        atomic_numbers: elements of the base model.
        r_max: base-model cutoff, Å (the radial functions vanish smoothly there).
        num_vectors: K, equivariant vectors per atom (default 4).
        order: highest power of the field in the energy (1, 2, 3, ...; default 3).
        num_basis: Bessel functions in the radial basis (default 6).
        hidden: width of the coefficient network's hidden layer (default 32).
    """

    name = "field"
    #: without an applied field in the data only response losses can train the coupling
    optional_inputs = ("external_field",)

    def __init__(
        self,
        feature_irreps: str,
        atomic_numbers: Sequence[int],
        r_max: float,
        num_vectors: int = 4,
        order: int = 3,
        num_basis: int = 6,
        hidden: int = 32,
        **config: Any,
    ) -> None:
        if config:
            raise TypeError(f"unknown field-block option(s): {', '.join(sorted(config))}")
        if int(order) < 1:
            raise ValueError(f"field block `order` must be >= 1, got {order}")
        if int(num_vectors) < 1 or int(num_basis) < 1:
            raise ValueError("field block `num_vectors` and `num_basis` must be >= 1")
        super().__init__(
            feature_irreps,
            atomic_numbers,
            r_max,
            num_vectors=int(num_vectors),
            order=int(order),
            num_basis=int(num_basis),
            hidden=int(hidden),
        )
        self.num_vectors = int(num_vectors)
        self.order = int(order)
        self.num_basis = int(num_basis)
        n_elements = len(self.atomic_numbers)
        scalars = scalar_feature_indices(feature_irreps)
        if not scalars:
            raise ValueError(f"feature irreps {feature_irreps!r} have no invariant (0e) channels")
        vectors = vector_feature_indices(feature_irreps)
        self.register_buffer("scalar_index", torch.tensor(scalars, dtype=torch.int64), persistent=False)
        self.register_buffer("vector_index", torch.tensor(vectors, dtype=torch.int64), persistent=False)
        self.num_feature_vectors = len(vectors) // 3
        self.register_buffer("bessel_k", bessel_wavenumbers(self.num_basis, self.r_max))
        # radial weights of each neighbour element: [n_elements] -> [K, num_basis]
        self.radial = torch.nn.Linear(n_elements, self.num_vectors * self.num_basis, bias=False)
        torch.nn.init.normal_(self.radial.weight, std=1.0 / math.sqrt(self.num_basis))
        # mixes the base model's 1o channels into the K vectors; a base without 1o features
        # gets no (dead) mixing parameters
        self.vector_mix: torch.nn.Module = (
            torch.nn.Linear(self.num_feature_vectors, self.num_vectors, bias=False)
            if self.num_feature_vectors > 0
            else torch.nn.Identity()
        )
        # coefficients c_ikn and a_i from the invariant features; the last layer starts at zero
        self.coefficients = torch.nn.Sequential(
            torch.nn.Linear(len(scalars), hidden),
            torch.nn.SiLU(),
            torch.nn.Linear(hidden, self.num_vectors * self.order + 1),
        )
        torch.nn.init.zeros_(self.coefficients[2].weight)
        torch.nn.init.zeros_(self.coefficients[2].bias)

    def atomic_vectors(self, ctx: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Equivariant vectors u_ik [n_atoms, K, 3], Å."""
        positions = ctx["positions"]
        weights = self.radial(ctx["node_attrs"].to(positions.dtype))
        u = neighbour_vectors(ctx, weights, self.bessel_k, self.r_max)
        if self.num_feature_vectors > 0:
            v = feature_vectors(ctx["node_feats"], self.vector_index, positions.dtype)
            u = u + self.vector_mix(v).transpose(1, 2)
        return u

    def forward(self, ctx: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        positions = ctx["positions"]
        dtype = positions.dtype
        num_graphs = ctx["ptr"].shape[0] - 1
        field = ctx["external_field"].to(dtype)[ctx["batch"]]  # [n_atoms, 3]
        u = self.atomic_vectors(ctx)
        coeff = self.coefficients(ctx["node_feats"][:, self.scalar_index].to(dtype))
        c = coeff[:, : self.num_vectors * self.order].view(-1, self.num_vectors, self.order)
        a = coeff[:, -1]
        x = (u * field[:, None, :]).sum(-1)  # [n_atoms, K]
        # energy terms Σ_n c_n x^n / n and their x-derivatives Σ_n c_n x^(n-1)
        powers = [torch.ones_like(x)]
        for _ in range(self.order):
            powers.append(powers[-1] * x)
        p = torch.stack(powers, dim=-1)  # [n_atoms, K, order + 1]: x^0 ... x^order
        inv_n = 1.0 / torch.arange(1, self.order + 1, dtype=dtype, device=positions.device)
        poly = (c * p[..., 1:] * inv_n).sum(-1)  # [n_atoms, K]
        dpoly = (c * p[..., :-1]).sum(-1)  # [n_atoms, K]
        field_sq = (field * field).sum(-1)
        node_energy = -(poly.sum(-1) + 0.5 * a * field_sq)
        atomic_dipoles = (dpoly[:, :, None] * u).sum(1) + a[:, None] * field
        energy = torch.zeros(num_graphs, dtype=dtype, device=positions.device).index_add(
            0, ctx["batch"], node_energy
        )
        dipole = torch.zeros((num_graphs, 3), dtype=dtype, device=positions.device)
        dipole = dipole.index_add(0, ctx["batch"], atomic_dipoles)
        return {"energy": energy, "dipole": dipole, "atomic_dipoles": atomic_dipoles}
