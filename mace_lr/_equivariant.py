r"""Equivariant atomic vectors from the base model's graph (private, shared by blocks).

Blocks that need l = 1 quantities per atom (the field block's coupling vectors, the
Wannier block's centroid displacements) build them the same way: a learned radial
function of each neighbour (Bessel basis, smooth cutoff at the base model's r_max,
weights chosen by the neighbour's element) times the bond vector,

.. math:: \mathbf u_{ik} = \sum_{j \in \mathcal N(i)} R_k(r_{ij}, Z_j)\,\mathbf r_{ij},
          \qquad R_k(r, Z) = \sum_b w_{kb}(Z)\, \frac{\sin(k_b r)}{k_b r}\, f_\mathrm{cut}(r),

with :math:`\mathbf r_{ij} = \mathbf r_j - \mathbf r_i` (Å). They rotate with the structure,
are unchanged by translations and vanish smoothly as neighbours leave the cutoff.
"""

from __future__ import annotations

import math
from typing import Dict

import torch


def bessel_wavenumbers(num_basis: int, r_max: float) -> torch.Tensor:
    """Wavenumbers ``k_b = b π / r_max`` (b = 1 … num_basis), 1/Å."""
    return torch.arange(1, num_basis + 1, dtype=torch.get_default_dtype()) * math.pi / r_max


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
    r = torch.linalg.norm(vec, dim=-1)
    x = (r / r_max).clamp(max=1.0)
    # smooth polynomial envelope (value and first two derivatives vanish at r_max)
    envelope = 1.0 - 10.0 * x**3 + 15.0 * x**4 - 6.0 * x**5
    k = bessel_k.to(positions.dtype)
    basis = torch.sin(k[None, :] * r[:, None]) / (k[None, :] * r[:, None]).clamp(min=1e-9)
    basis = basis * envelope[:, None]
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
