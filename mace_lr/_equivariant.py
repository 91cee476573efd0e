r"""Equivariant atomic vectors and harmonics from the base model's graph (private, shared by blocks).

Blocks that need l = 1 quantities per atom (the field block's coupling vectors, the
Wannier block's centroid displacements) build them the same way: a learned radial
function of each neighbour (Bessel basis, smooth cutoff at the base model's r_max,
weights chosen by the neighbour's element) times the bond vector,

.. math:: \mathbf u_{ik} = \sum_{j \in \mathcal N(i)} R_k(r_{ij}, Z_j)\,\mathbf r_{ij},
          \qquad R_k(r, Z) = \sum_b w_{kb}(Z)\, \frac{\sin(k_b r)}{k_b r}\, f_\mathrm{cut}(r),

with :math:`\mathbf r_{ij} = \mathbf r_j - \mathbf r_i` (Å). They rotate with the structure,
are unchanged by translations and vanish smoothly as neighbours leave the cutoff.

:class:`NeighbourHarmonics` is the same construction for every degree l ≤ l_max, with the
unit bond direction's real spherical harmonics (e3nn convention, component normalisation)
in place of the bond vector,

.. math:: h^{l}_{ic,m} = \sum_{j \in \mathcal N(i)} R_{cl}(r_{ij}, Z_j)\,
          Y^{l}_{m}(\hat{\mathbf r}_{ij}),

irreps ``C×0e + C×1o + C×2e + …`` (parity (-1)^l). Degree 2 carries what no vector of a
site with a mirror plane or a two-fold axis can: the orientation of a plane of bonds
(e.g. the H–C–H plane of a terminal CH₂ group, whose 1o features all lie on its C₂ axis).
"""

from __future__ import annotations

import math
from typing import Dict

import mace  # noqa: F401  (mace sets an environment variable e3nn needs)
import torch
from e3nn import o3


def bessel_wavenumbers(num_basis: int, r_max: float) -> torch.Tensor:
    """Wavenumbers ``k_b = b π / r_max`` (b = 1 … num_basis), 1/Å."""
    return torch.arange(1, num_basis + 1, dtype=torch.get_default_dtype()) * math.pi / r_max


def radial_basis(r: torch.Tensor, bessel_k: torch.Tensor, r_max: float) -> torch.Tensor:
    """Bessel basis ``sin(k_b r)/(k_b r) f_cut(r)`` [n_edges, num_basis] of distances r (Å)."""
    x = (r / r_max).clamp(max=1.0)
    # smooth polynomial envelope (value and first two derivatives vanish at r_max)
    envelope = 1.0 - 10.0 * x**3 + 15.0 * x**4 - 6.0 * x**5
    k = bessel_k.to(r.dtype)
    basis = torch.sin(k[None, :] * r[:, None]) / (k[None, :] * r[:, None]).clamp(min=1e-9)
    return basis * envelope[:, None]


def neighbour_vectors(
    ctx: Dict[str, torch.Tensor], element_weights: torch.Tensor, bessel_k: torch.Tensor, r_max: float
) -> torch.Tensor:
    """Equivariant vectors ``u_ik`` [n_atoms, K, 3] Å.

    Args:
        ctx: block context (``positions``, ``edge_index``, ``shifts``).
        element_weights: [n_atoms, K * num_basis] radial weights ``w_kb(Z_j)`` of each atom
            as a neighbour (e.g. a bias-free linear map of ``node_attrs``).
        bessel_k: [num_basis] wavenumbers, 1/Å.
        r_max: cutoff, Å.
    """
    positions = ctx["positions"]
    sender = ctx["edge_index"][0]
    receiver = ctx["edge_index"][1]
    vec = positions[receiver] - positions[sender] + ctx["shifts"]
    basis = radial_basis(torch.linalg.norm(vec, dim=-1), bessel_k, r_max)
    num_basis = bessel_k.shape[0]
    num_vectors = element_weights.shape[1] // num_basis
    w = element_weights.to(positions.dtype)[receiver].view(-1, num_vectors, num_basis)
    radial = (w * basis[:, None, :]).sum(-1)  # [n_edges, K]
    contrib = radial[:, :, None] * vec[:, None, :]
    u = torch.zeros((positions.shape[0], w.shape[1], 3), dtype=positions.dtype, device=positions.device)
    return u.index_add(0, sender, contrib)


def feature_vectors(node_feats: torch.Tensor, vector_index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The base model's 1o feature channels as [n_atoms, 3, C] (e3nn stores [C, xyz])."""
    v = node_feats[:, vector_index].to(dtype)
    return v.view(node_feats.shape[0], -1, 3).transpose(1, 2)


class NeighbourHarmonics(torch.nn.Module):
    """Learned local harmonics ``h^l_ic`` [n_atoms, C·(l_max+1)²] (e3nn irreps order, 1/Å⁰).

    Args:
        num_elements: number of elements (width of ``node_attrs``).
        channels: C per degree.
        l_max: highest degree (≥ 0).
        r_max: cutoff, Å (the base model's, so the graph's edges are the neighbours).
        num_basis: Bessel functions of the radial weights (default 8).

    The radial weights ``R_cl(r, Z)`` are a bias-free linear map of the neighbour's one-hot
    element, start random (unit variance of the sum over the basis) and are trained.
    """

    def __init__(
        self, num_elements: int, channels: int, l_max: int, r_max: float, num_basis: int = 8
    ) -> None:
        super().__init__()
        if int(l_max) < 0 or int(channels) < 1 or int(num_basis) < 1:
            raise ValueError(
                f"need l_max >= 0, channels >= 1, num_basis >= 1; got {l_max}, {channels}, {num_basis}"
            )
        self.l_max = int(l_max)
        self.channels = int(channels)
        self.num_basis = int(num_basis)
        self.r_max = float(r_max)
        self.register_buffer("bessel_k", bessel_wavenumbers(self.num_basis, self.r_max))
        self.harmonics = o3.SphericalHarmonics(
            list(range(self.l_max + 1)), normalize=True, normalization="component"
        )
        self.radial = torch.nn.Linear(
            int(num_elements), self.channels * (self.l_max + 1) * self.num_basis, bias=False
        )
        torch.nn.init.normal_(self.radial.weight, std=self.num_basis**-0.5)

    def forward(self, ctx: Dict[str, torch.Tensor]) -> torch.Tensor:
        positions = ctx["positions"]
        sender = ctx["edge_index"][0]
        receiver = ctx["edge_index"][1]
        vec = positions[receiver] - positions[sender] + ctx["shifts"]
        basis = radial_basis(torch.linalg.norm(vec, dim=-1), self.bessel_k, self.r_max)
        c = self.channels
        weights = self.radial(ctx["node_attrs"].to(positions.dtype))[receiver]
        radial = (weights.view(-1, c * (self.l_max + 1), self.num_basis) * basis[:, None, :]).sum(-1)
        y = self.harmonics(vec)  # [n_edges, (l_max+1)^2]
        parts = []
        for deg in range(self.l_max + 1):
            r_l = radial[:, deg * c : (deg + 1) * c]  # [n_edges, C]
            y_l = y[:, deg * deg : (deg + 1) * (deg + 1)]  # [n_edges, 2l+1]
            parts.append((r_l[:, :, None] * y_l[:, None, :]).reshape(-1, c * (2 * deg + 1)))
        contrib = torch.cat(parts, dim=1)
        out = torch.zeros(
            (positions.shape[0], contrib.shape[1]), dtype=positions.dtype, device=positions.device
        )
        return out.index_add(0, sender, contrib)
