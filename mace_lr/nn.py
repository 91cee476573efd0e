r"""The block author's kit: public building blocks for long-range blocks.

Everything a block needs from mace-lr besides :class:`mace_lr.LongRangeBlock` and the
:mod:`mace_lr.electrostatics` engine. The built-in blocks are written with these names
only, so a third-party block can do whatever they do.

Feature selection (the base model's ``node_feats`` are e3nn-ordered irreps):

* :func:`scalar_feature_indices` — columns of the invariant (0e) channels;
* :func:`vector_feature_indices` — columns of the vector (1o) channels, [channel, xyz];
* :func:`feature_vectors` — the 1o channels as [n_atoms, 3, C].

Equivariant geometry from the base model's graph:

* :func:`bessel_wavenumbers` and :func:`neighbour_vectors` — learned l = 1 vectors per
  atom, :math:`\mathbf u_{ik} = \sum_j R_k(r_{ij}, Z_j)\,\mathbf r_{ij}` (Å);
* :class:`NeighbourHarmonics` — learned harmonics of every degree l ≤ l_max per atom,
  :math:`h^l_{ic} = \sum_j R_{cl}(r_{ij}, Z_j)\,Y^l(\hat{\mathbf r}_{ij})` (irreps
  ``C×0e + C×1o + C×2e …``), for blocks that need l ≥ 2 geometry the base features lack.

Identity at initialisation and per-structure sums:

* :func:`straight_through_coupling` — the gate γ = max(a, 0) that starts a block silent;
* :func:`graph_sum` — per-graph sums of per-atom values (energies, dipoles, charges).

Molecular topology:

* :func:`bonded_fragments` — the covalently bonded fragments (connected components of
  the bond graph, distances below 1.2 × the summed covalent radii :data:`COVALENT_RADII`)
  on the base model's edges, for blocks that give each molecule its own charge.

Per-element options and positive parameters:

* :func:`element_values` — a user mapping element → number (symbols or atomic numbers)
  as one value per element of the base model, with clear errors;
* :func:`element_number` — the atomic number of a symbol or number;
* :func:`softplus_inverse` — the raw value of a parameter kept positive by softplus.

Learned k-space filters on a B-spline mesh of fixed spacing (the ``mesh`` and
``attention`` blocks):

* :func:`mesh_convolution` — Gaussian-mixture (or Coulomb) filtered field of per-atom
  values at every atom, batched over graphs, differentiable in everything;
* :func:`mesh_geometry` and :func:`bspline_weights` — its box, mesh counts and splines;
* :func:`mesh_spacing_for` — the spacing that reaches a requested relative accuracy.
"""

from __future__ import annotations

import torch

from ._block import straight_through_coupling
from ._elements import element_number, element_values, softplus_inverse
from ._equivariant import NeighbourHarmonics, bessel_wavenumbers, feature_vectors, neighbour_vectors
from ._fragments import COVALENT_RADII, bonded_fragments
from ._gridding import bspline_weights, mesh_convolution, mesh_geometry, mesh_spacing_for
from ._mace_adapter import scalar_feature_indices, vector_feature_indices

__all__ = [
    "COVALENT_RADII",
    "NeighbourHarmonics",
    "bessel_wavenumbers",
    "bonded_fragments",
    "bspline_weights",
    "element_number",
    "element_values",
    "feature_vectors",
    "graph_sum",
    "mesh_convolution",
    "mesh_geometry",
    "mesh_spacing_for",
    "neighbour_vectors",
    "scalar_feature_indices",
    "softplus_inverse",
    "straight_through_coupling",
    "vector_feature_indices",
]


def graph_sum(values: torch.Tensor, batch: torch.Tensor, num_graphs: int) -> torch.Tensor:
    r"""Sum per-atom values over the atoms of each graph.

    .. math:: S_g = \sum_{i:\, \mathrm{batch}_i = g} x_i

    Args:
        values: [n_atoms, ...] per-atom values (any trailing shape, any unit).
        batch: [n_atoms] int64, graph index of each atom (``ctx["batch"]``).
        num_graphs: number of graphs G (``ctx["ptr"].shape[0] - 1``).

    Returns:
        [G, ...] per-graph sums, same dtype and device as ``values``; graphs without
        atoms sum to zero. Differentiable in ``values``.
    """
    out = torch.zeros((num_graphs,) + values.shape[1:], dtype=values.dtype, device=values.device)
    return out.index_add(0, batch, values)
